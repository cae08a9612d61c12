"""The node exporter: host, per-job process and GPU metrics sampled at >= 10 Hz, served as a snapshot."""
