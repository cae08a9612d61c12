import sys

if sys.argv[1:2] == ["train"]:
    # A job's stop signals are caught from its first moments, before anything heavy is imported.
    from trainmetrics.trainer.stopping import StopFlag

    StopFlag.for_process()

from trainmetrics.cli import main  # noqa: E402

sys.exit(main())
