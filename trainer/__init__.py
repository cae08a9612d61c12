"""The instrumented PyTorch trainer: models, datasets, the training loop and the JobMetrics library."""
