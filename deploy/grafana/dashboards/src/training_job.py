"""Training job: one job's state, learning curves, speed, data wait, checkpoints and the resources it uses."""

from grafana_foundation_sdk.models.common import BigValueTextMode

from panels import (alert_annotation, duration, finite_loss, label_variable, mean, new_dashboard, newest_counts,
                    newest_run, peak, query, rate_without_falls, row, stat_panel, timeseries_panel)

JOB = 'job_id="$job_id"'


def server_end_state(jobs: str) -> str:
    """The final state the job server gave a job (series without a heartbeat), where its end is after every run's
    last heartbeat in the range (a failed job resumed since runs again), or no run of the job was seen."""
    server = (f"unless on (job_id, instance, run_id) "
              f"last_over_time(trainer_heartbeat_timestamp_seconds{{{jobs}}}[$__range])")
    ended = f"max by (job_id) (last_over_time(trainer_job_end_timestamp_seconds{{{jobs}}}[$__range]) {server})"
    runs = f"max by (job_id) (last_over_time(trainer_heartbeat_timestamp_seconds{{{jobs}}}[$__range]))"
    return (f"max by (state) ((last_over_time(trainer_job_state{{{jobs},state=~\"completed|failed|cancelled\"}}"
            f"[$__range]) == 1 {server}) and on (job_id) ({ended} > on (job_id) {runs} or {ended} unless on (job_id) "
            f"{runs}))")


def build():
    """The Training job dashboard."""
    return (
        new_dashboard("trainmetrics / Training job", "trainmetrics-job",
                      "One training job: state, loss and accuracy, throughput, step time, data wait, "
                      "checkpoints, and the GPUs and processes it uses.", ["job"])
        # (From the state: every job has one, its trainer's or, while it has no process, the job server's.)
        .with_variable(label_variable("job_id", "Job", "label_values(trainer_job_state, job_id)"))
        .annotation(alert_annotation("Hangs", f'alertname=~"TrainerHang|TrainerRankStuck",{JOB}', "red"))
        .annotation(alert_annotation("Loss spikes", f'alertname="TrainerLossSpike",{JOB}', "orange"))
        .annotation(alert_annotation("Loss NaN", f'alertname="TrainerLossNaN",{JOB}', "purple"))
        .with_row(row("Job"))
        # The stats read each series' last sample in the time range, at its end (instant queries): a finished
        # job's final figures are in Prometheus for one scrape before its series go stale, which a range query's
        # points (whose last one the stat showed) mostly miss; and a range query showed every state the job
        # passed through side by side.
        # The job server's state first, while it publishes one (series without a heartbeat: no process of the
        # job runs): a paused job resumed (queued again) or cancelled read its last run's `paused` for good. Then
        # the end it gave a job (cancelled, failed) after the job's last run, in the range: it publishes that end
        # for 5 minutes only, and the stat went back to the last run's `paused` (or a killed one's `running`).
        .with_panel(stat_panel("State", "The job server's state of a job without a process (queued, paused, or "
                                        "ended by the server), else the lifecycle state its newest run last "
                                        "published; a killed process's last, running: the job API and the "
                                        "analytics say how it ended.", "none",
                               query(f"max by (state) (trainer_job_state{{{JOB}}} == 1 "
                                     f"unless on (job_id, instance, run_id) "
                                     f"trainer_heartbeat_timestamp_seconds{{{JOB}}}) or on () "
                                     f"{server_end_state(JOB)} or on () "
                                     f"max by (state) ((last_over_time(trainer_job_state{{{JOB}}}[$__range]) == 1) "
                                     f"{newest_run(JOB)}) or on () max by (state) (last_over_time("
                                     f"trainer_job_state{{{JOB}}}[$__range]) == 1)", "{{state}}", instant=True),
                               text_mode=BigValueTextMode.NAME))
        .with_panel(stat_panel("Steps", "Optimizer steps completed, as the job's newest run counts them (a killed "
                                        "run's steps past its checkpoint were thrown away).", "short",
                               query(newest_counts("trainer_steps_total", JOB), instant=True)))
        .with_panel(stat_panel("Samples", "Training samples processed, all ranks, as the job's newest run counts "
                                          "them.", "short",
                               query(f"sum({newest_counts('trainer_samples_total', JOB, 'rank')})", instant=True)))
        .with_panel(stat_panel("Eval accuracy", "Accuracy at the last evaluation.", "percentunit",
                               query(f"max(last_over_time(trainer_eval_accuracy_ratio{{{JOB}}}[$__range]) "
                                     f"{newest_run(JOB)}) or max(last_over_time(trainer_eval_accuracy_ratio{{{JOB}}}"
                                     "[$__range]))", instant=True)))
        .with_panel(stat_panel("Duration", "Running time so far, or first start to last end for a finished job "
                                           "(a paused and resumed job's pauses included, its first run found up to "
                                           "30 days back, as the analytics find it).", "s",
                               query(f"max({duration(JOB)})", instant=True)))
        .with_panel(stat_panel("Checkpoints", "Checkpoints written, as the job's newest run counts them.", "short",
                               query(newest_counts("trainer_checkpoints_total", JOB), instant=True)))
        .with_row(row("Learning"))
        # Each point the last sample of its step (a finished run's final values last one scrape, which a 1 s
        # step's point mostly missed); no training loss while its interval was NaN (trainer_loss then holds the
        # last finite one: a flat line that looked like a plateau; the Loss NaN annotation marks it).
        .with_panel(timeseries_panel("Loss", "Training loss (mean over each log interval; none while it is NaN "
                                             "or infinite: see the Loss NaN annotations) and eval loss.", "short",
                                     query(finite_loss(JOB, "$__rate_interval"), "train {{rank}}"),
                                     query(f"last_over_time(trainer_eval_loss{{{JOB}}}[$__rate_interval])", "eval", "B")))
        .with_panel(timeseries_panel("Eval accuracy", "Accuracy on the held-out split at each evaluation.",
                                     "percentunit",
                                     query(f"last_over_time(trainer_eval_accuracy_ratio{{{JOB}}}[$__rate_interval])",
                                           "accuracy"),
                                     min_value=0, max_value=1))
        .with_row(row("Speed"))
        .with_panel(timeseries_panel("Samples per second", "Throughput, all ranks summed: the mean over each point "
                                     "of the 10-second rates.", "short",
                                     query(mean(f"job_id:trainer_samples:rate10s{{{JOB}}}"), "samples/s")))
        # The highest 30 s quantiles over each point (peak()): read at the point alone, a point a minute and a half
        # apart (a day's range) read one 30 s window of three, and a stretch of slow steps between two points was not
        # drawn.
        .with_panel(timeseries_panel("Step time", "Step-time quantiles over 30 s (all ranks pooled): the highest "
                                     "over each point.", "s",
                                     *(query(peak(f'job_id:trainer_step_duration_seconds:histogram_quantile{{{JOB},'
                                                  f'quantile="{quantile}"}}'), f"p{percent}", ref_id)
                                       for quantile, percent, ref_id in (("0.5", 50, "A"), ("0.9", 90, "B"),
                                                                         ("0.99", 99, "C")))))
        # (No point where no step completed in the window, at the start or in an evaluation: it was +Inf or NaN.)
        .with_panel(timeseries_panel("Data wait", "Share of the training loop (data wait, compute, optimizer, "
                                                  "collective) spent waiting for the next batch, over 1 m (no point "
                                                  "where no step completed: an evaluation, a checkpoint).",
                                     "percentunit",
                                     query(f"job_id:trainer_data_wait:ratio_rate1m{{{JOB}}}", "data wait"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("Model FLOPs utilisation", "Achieved FLOP/s ÷ device peak (where known).",
                                     "percentunit", query(f"trainer_model_flops_utilization_ratio{{{JOB}}}",
                                                          "MFU {{rank}}"), min_value=0))
        .with_panel(timeseries_panel("Ranks: step time", "Each rank's mean step time over 1 m (multi-process "
                                     "jobs; one line for a single process).", "s",
                                     query(f"job_id_rank:trainer_step_duration_seconds:mean_rate1m{{{JOB}}}",
                                           "rank {{rank}}")))
        .with_panel(timeseries_panel("Ranks: data wait", "Each rank's share of its training loop waiting for "
                                     "data: a rank far above the others is a straggler.", "percentunit",
                                     query(f"job_id_rank:trainer_data_wait:ratio_rate1m{{{JOB}}}", "rank {{rank}}"),
                                     min_value=0, max_value=1))
        .with_row(row("Goodput"))
        .with_panel(timeseries_panel("Where the time goes", "Seconds per second in each phase (rank 0): step "
                                     "(compute, optimizer, collective) is goodput; the job's analytics add "
                                     "queued, paused and lost (docs/api.md, Goodput); no point across a process "
                                     "restarted at the same address, whose counts fell.", "percentunit",
                                     query("sum by (phase) " + rate_without_falls(
                                         f'trainer_phase_seconds_total{{{JOB},rank=~"0|"}}'), "{{phase}}"),
                                     stacked=True, min_value=0))
        .with_panel(timeseries_panel("Goodput over 15 minutes", "Share of the job's time spent in steps over the "
                                     "last 15 minutes (TrainerGoodputLow below 50 %).", "percentunit",
                                     query(f"job_id:trainer_goodput:ratio_rate15m{{{JOB}}}", "goodput"),
                                     min_value=0, max_value=1))
        .with_row(row("Diagnosis"))
        .with_panel(timeseries_panel("Phase per rank", "The phase each rank is in (1): a rank outside "
                                     "collective while the others wait in it is the one they wait for.", "short",
                                     query(f"max by (rank, phase) (trainer_phase{{{JOB}}}) == 1",
                                           "rank {{rank}} {{phase}}"), min_value=0, max_value=1))
        .with_panel(timeseries_panel("Seconds without progress", "Per rank, since its last step (or the end of "
                                     "an evaluation or checkpoint), inside the loop: the most over each point; "
                                     "TrainerHang past the job's bound.", "s",
                                     query(peak(f"job_id_rank:trainer_no_progress_seconds{{{JOB}}}"), "rank {{rank}}"),
                                     query(f"job_id:trainer_hang_bound_seconds{{{JOB}}}", "hang bound", "B"),
                                     min_value=0))
        .with_panel(timeseries_panel("Straggler score", "Each rank's own work per step (all but the "
                                     "all-reduce) over the fastest rank's (1 = fastest; TrainerStraggler above "
                                     "1.2) and over its own best minute.", "short",
                                     query(f"job_id_rank:trainer_straggler_score:ratio{{{JOB}}}",
                                           "rank {{rank}} vs fastest"),
                                     query(f"job_id_rank:trainer_straggler_score_self:ratio{{{JOB}}}",
                                           "rank {{rank}} vs own best", "B"), min_value=0))
        # Lines, not a stack: every rank spends the whole step, so stacking ranks would show N x the step.
        .with_panel(timeseries_panel("Time per step by phase", "Per rank and phase, seconds per step over 1 m: "
                                     "the phase that makes a rank slow.", "s",
                                     query(f"job_id_rank_phase:trainer_phase_seconds_per_step:rate1m{{{JOB}}}",
                                           "rank {{rank}} {{phase}}"), min_value=0))
        # The loss counts: the most any rank counted. Every rank counts the spikes and NaNs of its own shard's loss,
        # and the ranks of one model diverge together (the sum read N x the job's); a corrupt batch on one rank's
        # shard spikes that rank alone (rank 0's read 0 for it; TrainerLossSpike takes the max too).
        .with_panel(timeseries_panel("Loss spikes and stack dumps", "Loss spikes flagged and log intervals whose "
                                     "loss was NaN or infinite (the most any rank counted: each counts its own "
                                     "loss), and thread-stack dumps the hang watchdog wrote (every rank's; counts).",
                                     "short",
                                     query(f"max(trainer_loss_spikes_total{{{JOB}}})", "loss spikes"),
                                     query(f"max(trainer_loss_nonfinite_total{{{JOB}}})", "NaN/inf intervals", "C"),
                                     query(f"sum(trainer_stack_dumps_total{{{JOB}}})", "stack dumps", "B"),
                                     min_value=0))
        .with_row(row("Resources"))
        .with_panel(timeseries_panel("Job GPU utilisation: mean vs peak",
                                     "The job's GPUs: mean and max over each point.",
                                     "percentunit",
                                     # Each GPU by its node too: a job across nodes has a gpu 0 on each.
                                     query(f"{mean('hw_gpu_utilization_ratio')} * on (instance, uuid) group_right "
                                           f"hw_gpu_job_info{{{JOB}}}", "mean {{instance}} gpu {{gpu}}"),
                                     query(f"{peak('hw_gpu_utilization_peak_ratio')} * on (instance, uuid) group_right "
                                           f"hw_gpu_job_info{{{JOB}}}", "peak {{instance}} gpu {{gpu}}", "B"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("Job GPU memory", "GPU memory held by the job's processes and the "
                                     "allocator's peak.", "bytes",
                                     query(f"hw_gpu_process_memory_bytes{{{JOB}}}", "{{instance}} gpu {{gpu}}"),
                                     query(f"trainer_gpu_memory_peak_bytes{{{JOB}}}", "allocator peak {{rank}}",
                                           "B")))
        .with_panel(timeseries_panel("Job CPU", "CPU cores used by the job's process tree (DataLoader workers "
                                     "included); none from a node across a fall of its count (its exporter "
                                     "restarted after a rank of the job ended).", "short",
                                     query("sum" + rate_without_falls(f"process_cpu_time_seconds_total{{{JOB}}}"),
                                           "cores")))
        .with_panel(timeseries_panel("Job memory", "Resident memory of the job's process trees (every rank's).",
                                     "bytes", query(f"sum(process_memory_rss_bytes{{{JOB}}})", "rss"), width=6))
        .with_panel(timeseries_panel("Job processes", "Processes in the job's trees (ranks, data-loader workers).",
                                     "short", query(f"sum(process_tree_processes{{{JOB}}})", "processes"), width=6,
                                     min_value=0))
    )
