"""The job server: upload datasets, submit jobs, pause/resume/cancel them, serve checkpoints and models."""
