"""Node: the host and its GPUs, mean vs peak, network and disk, and the exporter's own health."""

from panels import label_variable, mean, new_dashboard, peak, query, row, timeseries_panel

NODE = 'instance=~"$instance"'


def build():
    """The Node dashboard."""
    return (
        new_dashboard("trainmetrics / Node", "trainmetrics-node",
                      "A machine under training jobs: CPU and memory (mean vs peak over the sampling window), "
                      "network, disks, filesystems, processes and GPUs.", ["node"])
        .with_variable(label_variable("instance", "Node", "label_values(system_memory_limit_bytes, instance)",
                                      multi=True))
        .with_row(row("Host"))
        .with_panel(timeseries_panel("CPU utilisation: mean vs peak",
                                     "Mean of the 10 Hz samples over each point, and their max over it: spikes "
                                     "between scrapes and between points show in the peak.",
                                     "percentunit",
                                     query(mean(f"system_cpu_utilization_ratio{{{NODE}}}"), "mean {{instance}}"),
                                     query(peak(f"system_cpu_utilization_peak_ratio{{{NODE}}}"), "peak {{instance}}",
                                           "B"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("Memory", "Memory by state, and the peak of used memory.", "bytes",
                                     query(f"system_memory_usage_bytes{{{NODE}}}", "{{state}} {{instance}}"),
                                     query(peak(f"system_memory_used_peak_bytes{{{NODE}}}"), "used peak {{instance}}",
                                           "B"),
                                     query(f"system_memory_limit_bytes{{{NODE}}}", "limit {{instance}}", "C")))
        .with_panel(timeseries_panel("Network", "Bytes per second by device and direction.", "Bps",
                                     query(f"rate(system_network_io_bytes_total{{{NODE}}}[$__rate_interval])",
                                           "{{instance}} {{device}} {{direction}}")))
        .with_panel(timeseries_panel("Disk throughput", "Bytes per second by device and direction.", "Bps",
                                     query(f"rate(system_disk_io_bytes_total{{{NODE}}}[$__rate_interval])",
                                           "{{instance}} {{device}} {{direction}}")))
        .with_panel(timeseries_panel("Disk operations", "Operations per second by device and direction.", "iops",
                                     query(f"rate(system_disk_operations_total{{{NODE}}}[$__rate_interval])",
                                           "{{instance}} {{device}} {{direction}}")))
        .with_panel(timeseries_panel("Filesystem used", "Share of each real filesystem in use.", "percentunit",
                                     # Reserved blocks count as used (as FilesystemAlmostFull counts them):
                                     # "used" alone left them out and never reached 100 %.
                                     query(f"1 - system_filesystem_usage_bytes{{{NODE},state=\"free\"}} / ignoring "
                                           f"(state) system_filesystem_limit_bytes{{{NODE}}}",
                                           "{{instance}} {{mountpoint}}"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("Processes", "Processes by status.", "short",
                                     query(f"system_processes{{{NODE}}}", "{{instance}} {{status}}")))
        .with_panel(timeseries_panel("Exporter collectors", "1 when the collector's last sample succeeded, 0 when it failed.", "short",
                                     query(f"exporter_collector_success{{{NODE}}}", "{{instance}} {{collector}}")))
        .with_panel(timeseries_panel("Exporter samples missed",
                                     "Samples a second each sampling loop fell behind on: while above 0, peaks have "
                                     "the resolution of the samples taken, not of the sample interval.", "short",
                                     query(f"rate(exporter_samples_missed_total{{{NODE}}}[$__rate_interval])",
                                           "{{instance}} {{loop}}")))
        .with_row(row("GPUs"))
        .with_panel(timeseries_panel("GPU utilisation: mean vs peak",
                                     "Per GPU, mean and max over each point.", "percentunit",
                                     query(mean(f"hw_gpu_utilization_ratio{{{NODE}}}"),
                                           "mean {{instance}} gpu {{gpu}}"),
                                     query(peak(f"hw_gpu_utilization_peak_ratio{{{NODE}}}"),
                                           "peak {{instance}} gpu {{gpu}}", "B"),
                                     min_value=0, max_value=1))
        .with_panel(timeseries_panel("GPU memory", "Used, peak over each point, and size.", "bytes",
                                     query(f"hw_gpu_memory_usage_bytes{{{NODE}}}", "used {{instance}} gpu {{gpu}}"),
                                     query(peak(f"hw_gpu_memory_usage_peak_bytes{{{NODE}}}"),
                                           "peak {{instance}} gpu {{gpu}}", "B"),
                                     query(f"hw_gpu_memory_limit_bytes{{{NODE}}}", "size {{instance}} gpu {{gpu}}",
                                           "C")))
        .with_panel(timeseries_panel("GPU temperature", "Core temperature.", "celsius",
                                     query(f"hw_gpu_temperature_celsius{{{NODE}}}", "{{instance}} gpu {{gpu}}")))
        .with_panel(timeseries_panel("GPU power", "Board power draw, and energy per second from the counter. The "
                                     "counter steps once a slow interval (1 s): a point's window holds one step more "
                                     "or less, so at short ranges the energy line swings (0.8-1.6 x at 1 s points) "
                                     "and is exact over long ones; read the board power there.",
                                     "watt",
                                     query(f"hw_gpu_power_watts{{{NODE}}}", "power {{instance}} gpu {{gpu}}"),
                                     query(f"rate(hw_gpu_energy_joules_total{{{NODE}}}[$__rate_interval])",
                                           "energy rate {{instance}} gpu {{gpu}}", "B")))
        .with_panel(timeseries_panel("GPU SM clock", "Current SM clock.", "hertz",
                                     query(f"hw_gpu_clock_sm_hertz{{{NODE}}}", "{{instance}} gpu {{gpu}}")))
        .with_panel(timeseries_panel("GPU throttling and errors", "Active throttle reasons (1) and new "
                                     "ECC/XID errors per second.", "short",
                                     query(f"hw_gpu_throttle_reasons{{{NODE}}} == 1",
                                           "{{instance}} gpu {{gpu}} {{reason}}"),
                                     query(f"rate(hw_gpu_errors_total{{{NODE}}}[$__rate_interval])",
                                           "{{instance}} gpu {{gpu}} {{type}}", "B")))
    )
