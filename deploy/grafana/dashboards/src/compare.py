"""Compare: several jobs side by side: learning curves and throughput overlaid, and a summary table."""

from panels import label_variable, new_dashboard, query, row, table_panel, timeseries_panel

JOBS = 'job_id=~"$job_id"'


def build():
    """The Compare dashboard."""
    return (
        new_dashboard("trainmetrics / Compare jobs", "trainmetrics-compare",
                      "Pick several jobs: loss, accuracy, throughput and step time overlaid, and a summary table.",
                      ["compare"])
        .with_variable(label_variable("job_id", "Jobs", "label_values(trainer_job_info, job_id)", multi=True))
        .with_row(row("Overlaid"))
        .with_panel(timeseries_panel("Loss", "Training loss of each job.", "short",
                                     query(f"max by (job_id) (trainer_loss{{{JOBS}}})", "{{job_id}}")))
        .with_panel(timeseries_panel("Eval accuracy", "Accuracy at each evaluation.", "percentunit",
                                     query(f"max by (job_id) (trainer_eval_accuracy_ratio{{{JOBS}}})", "{{job_id}}"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("Samples per second", "Throughput of each job.", "short",
                                     query(f"job_id:trainer_samples:rate10s{{{JOBS}}}", "{{job_id}}")))
        .with_panel(timeseries_panel("Median step time", "p50 step time of each job.", "s",
                                     query(f'job_id:trainer_step_duration_seconds:histogram_quantile{{{JOBS},quantile="0.5"}}',
                                           "{{job_id}}")))
        .with_row(row("Summary"))
        .with_panel(table_panel(
            "Summary", "Per job over the time range: samples, best and final loss, accuracy, duration.",
            query(f"max by (job_id) (max_over_time(trainer_samples_total{{{JOBS}}}[$__range]))", "",
                  "samples", instant=True, table_format=True),
            query(f"min by (job_id) (min_over_time(trainer_loss{{{JOBS}}}[$__range]))", "", "best_loss",
                  instant=True, table_format=True),
            # None for a job whose last interval's loss was NaN: trainer_loss keeps its last finite one.
            query(f"max by (job_id) (last_over_time(trainer_loss{{{JOBS}}}[$__range]) unless on (job_id, instance, "
                  f"rank) (last_over_time(trainer_loss_finite{{{JOBS}}}[$__range]) == 0))", "", "final_loss",
                  instant=True, table_format=True),
            query(f"max by (job_id) (last_over_time(trainer_eval_accuracy_ratio{{{JOBS}}}[$__range]))", "",
                  "accuracy", instant=True, table_format=True),
            query(f"max by (job_id) (last_over_time(trainer_job_end_timestamp_seconds{{{JOBS}}}[$__range]))"
                  f" - max by (job_id) (last_over_time(trainer_job_start_timestamp_seconds{{{JOBS}}}[$__range]))",
                  "", "duration_seconds", instant=True, table_format=True)))
    )
