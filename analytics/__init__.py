"""The analytics service: training-job analytics from PromQL over the Prometheus HTTP API."""
