"""Fleet: every job at once: how many in each state, who is running how fast, what failed."""

from panels import (mean, new_dashboard, peak, query, rate_without_falls, row, stat_panel, table_panel,
                    timeseries_panel)


def build():
    """The Fleet dashboard."""
    return (
        new_dashboard("trainmetrics / Fleet", "trainmetrics-fleet",
                      "All training jobs: states, throughput of running jobs, failures, top jobs, node peaks.",
                      ["fleet"])
        .with_row(row("Jobs"))
        .with_panel(stat_panel("Running jobs", "Jobs currently running.", "short",
                               query("count(job_id:trainer_job_running:max) or vector(0)")))
        .with_panel(stat_panel("Failed in the last hour", "Jobs that entered failed in the last hour.", "short",
                               query('count(max by (job_id) (max_over_time(trainer_job_state{state="failed"}[1h])) '
                                     '== 1) or vector(0)'), red_from=1))
        .with_panel(stat_panel("Completed in the last hour", "Jobs that completed in the last hour.", "short",
                               query('count(max by (job_id) (max_over_time(trainer_job_state{state="completed"}[1h])) '
                                     '== 1) or vector(0)')))
        .with_panel(stat_panel("Samples per second", "Throughput of all jobs together.", "short",
                               query("sum(job_id:trainer_samples:rate10s) or vector(0)")))
        .with_panel(timeseries_panel("Jobs by state", "Live jobs in each state.", "short",
                                     query("count by (state) (max by (job_id, state) (trainer_job_state) == 1)",
                                           "{{state}}")))
        .with_panel(timeseries_panel("Throughput of running jobs", "Samples per second per job: the mean over "
                                     "each point of its 10-second rates.", "short",
                                     query(f"{mean('job_id:trainer_samples:rate10s')} and on (job_id) "
                                           "job_id:trainer_job_running:max", "{{job_id}}")))
        .with_panel(table_panel("Top jobs by throughput", "The ten fastest jobs in the time range (peak of the "
                                "10-second samples/s: a 1-minute rate divided a job shorter than a minute's "
                                "samples by the whole minute).",
                                query("topk(10, max by (job_id) "
                                      "(max_over_time(job_id:trainer_samples:rate10s[$__range])))",
                                      "", instant=True, table_format=True),
                                columns={"Value": ("Peak samples/s", "short")}))
        .with_row(row("Goodput"))
        .with_panel(timeseries_panel("Where the fleet's time goes", "Every job's seconds per second in each "
                                     "phase (rank 0): step is goodput (the summary's goodput adds queued and "
                                     "paused).", "short",
                                     query("sum by (phase) "
                                           + rate_without_falls('trainer_phase_seconds_total{rank=~"0|"}'),
                                           "{{phase}}"), stacked=True, min_value=0))
        .with_panel(timeseries_panel("Goodput per job over 15 minutes", "Each running job's share of time in "
                                     "steps (TrainerGoodputLow below 50 %).", "percentunit",
                                     query("job_id:trainer_goodput:ratio_rate15m and on (job_id) "
                                           "job_id:trainer_job_running:max", "{{job_id}}"),
                                     min_value=0, max_value=1))
        .with_row(row("Nodes"))
        # The recorded 1-minute peaks' max over each point (peak()): read at the point alone, a point a minute and a
        # half or more apart (a day's range) left the spikes between two points out.
        .with_panel(timeseries_panel("Node CPU peak", "Peak CPU utilisation per node over each point (and the "
                                     "minute before it).", "percentunit",
                                     query(peak("instance:system_cpu_utilization_peak:max1m"), "{{instance}}"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("Node memory used", "Used memory share per node.", "percentunit",
                                     query("instance:system_memory_utilization:ratio", "{{instance}}"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("Node GPU peak", "Peak GPU utilisation per node over each point (and the "
                                     "minute before it).", "percentunit",
                                     query(peak("instance:hw_gpu_utilization_peak:max1m"), "{{instance}}"),
                                     min_value=0, max_value=1))
    )
