"""Compare: several jobs side by side: learning curves and throughput overlaid, and a summary table."""

from panels import (RANK0, duration, finite_loss, label_variable, mean, new_dashboard, newest_counts, newest_run,
                    query, row, table_panel, timeseries_panel)

JOBS = 'job_id=~"$job_id"'


def build():
    """The Compare dashboard."""
    return (
        new_dashboard("trainmetrics / Compare jobs", "trainmetrics-compare",
                      "Pick several jobs: loss, accuracy, throughput and step time overlaid, and a summary table.",
                      ["compare"])
        .with_variable(label_variable("job_id", "Jobs", "label_values(trainer_job_state, job_id)", multi=True))
        .with_row(row("Overlaid"))
        # Rank 0's, as the table's final and best loss and the analytics (the mean of the ranks' ended on a value
        # the Final loss column did not show); no point while it is NaN (trainer_loss then holds the last finite
        # one: a flat line).
        .with_panel(timeseries_panel("Loss", "Training loss of each job (rank 0's, as the table's; no point while "
                                             "it is NaN or infinite).", "short",
                                     query(f"max by (job_id) ({finite_loss(f'{JOBS},{RANK0}', '$__rate_interval')})",
                                           "{{job_id}}")))
        .with_panel(timeseries_panel("Eval accuracy", "Accuracy at each evaluation.", "percentunit",
                                     # Each point the last sample of its interval (and a scrape more: a 250 ms
                                     # window can hold none, a gap): a finished run's final evaluation is there
                                     # for one scrape, which a point's instant mostly missed.
                                     query(f"max by (job_id) (last_over_time(trainer_eval_accuracy_ratio{{{JOBS}}}"
                                           "[$__rate_interval]))", "{{job_id}}"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("Samples per second", "Throughput of each job: the mean over each point of "
                                     "its 10-second rates.", "short",
                                     query(mean(f"job_id:trainer_samples:rate10s{{{JOBS}}}"), "{{job_id}}")))
        .with_panel(timeseries_panel("Median step time", "p50 step time of each job.", "s",
                                     query(f'job_id:trainer_step_duration_seconds:histogram_quantile{{{JOBS},quantile="0.5"}}',
                                           "{{job_id}}")))
        .with_row(row("Summary"))
        .with_panel(table_panel(
            "Summary", "Per job over the time range: samples (every rank's, as its newest run counts them), best "
                       "loss (rank 0's), final loss (rank 0's newest run; empty when its last interval's loss was "
                       "NaN), accuracy, duration (first start to the last end, or to now while it runs).",
            query(f"sum by (job_id) ({newest_counts('trainer_samples_total', JOBS, 'job_id, rank')})",
                  "", "samples", instant=True, table_format=True),
            # The trainer's own lowest interval loss (exact), not the lowest trainer_loss sample: intervals that
            # end faster than the scrape are not all sampled. Rank 0's, as the final loss and the analytics: each
            # rank's loss is over its own shard of the data. The newest run's, which carries it over a resume (a
            # killed run's lowest may be of steps thrown away).
            query(newest_counts("trainer_loss_min", f"{JOBS},{RANK0}", "job_id", combine="min"), "", "best_loss",
                  instant=True, table_format=True),
            # A resumed job has a process per run: only the newest run's counts (newest_run), and none where its
            # last interval's loss was NaN (trainer_loss keeps the last finite one).
            query(f"max by (job_id) (({finite_loss(f'{JOBS},{RANK0}', '$__range')}) {newest_run(JOBS)})",
                  "", "final_loss", instant=True, table_format=True),
            # The newest run's (a resumed job's earlier run evaluated a model the newest one went on from).
            query(f"max by (job_id) (last_over_time(trainer_eval_accuracy_ratio{{{JOBS}}}[$__range]) "
                  f"{newest_run(JOBS)})", "", "accuracy", instant=True, table_format=True),
            query(duration(JOBS), "", "duration_seconds", instant=True, table_format=True),
            columns={"Value #samples": ("Samples", "short"), "Value #best_loss": ("Best loss", "short"),
                     "Value #final_loss": ("Final loss", "short"), "Value #accuracy": ("Accuracy", "percentunit"),
                     "Value #duration_seconds": ("Duration", "s")}))
    )
