"""trainmetrics: Prometheus-native metrics for PyTorch training jobs and the machines under them."""

__version__ = "0.1.0"
