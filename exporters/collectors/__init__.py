"""The collectors, one module each, and the one table the exporter and its CLI flags are built from.

A new collector is one module (a `Collector` subclass) plus one line in COLLECTORS. Entries name the
class as "module:Class" and load it on use, so `trainmetrics --help` does not import prometheus_client,
psutil or NVML.
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class CollectorSpec:
    """One row of the table: where the class lives, whether it runs by default, its --help text."""

    target: str
    enabled_by_default: bool
    help: str

    def load(self) -> type:
        """Import and return the collector class."""
        module_name, _, class_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), class_name)


COLLECTORS: dict[str, CollectorSpec] = {
    "cpu": CollectorSpec("trainmetrics.exporters.collectors.cpu:CpuCollector", True,
                         "CPU time per cpu and mode, host utilisation mean and peak"),
    "memory": CollectorSpec("trainmetrics.exporters.collectors.memory:MemoryCollector", True,
                            "memory usage by state, limit, used peak"),
    "disk": CollectorSpec("trainmetrics.exporters.collectors.disk:DiskCollector", True,
                          "disk bytes and operations per device and direction"),
    "filesystem": CollectorSpec("trainmetrics.exporters.collectors.filesystem:FilesystemCollector", True,
                                "usage and size of real mounts"),
    "network": CollectorSpec("trainmetrics.exporters.collectors.network:NetworkCollector", True,
                             "network bytes, packets and errors per interface and direction"),
    "processes": CollectorSpec("trainmetrics.exporters.collectors.processes:ProcessesCollector", True,
                               "process count by scheduler state"),
    "jobs": CollectorSpec("trainmetrics.exporters.collectors.jobs:JobsCollector", True,
                          "CPU time, RSS and process count of each training job's process tree"),
    "gpu": CollectorSpec("trainmetrics.exporters.collectors.gpu:GpuCollector", True,
                         "NVIDIA GPUs through NVML, attributed to jobs"),
    # After gpu: it publishes the energy accounts the gpu collector's slow sample adds to.
    "energy": CollectorSpec("trainmetrics.exporters.collectors.energy:EnergyCollector", True,
                            "energy per job: its GPUs' (NVML) and its CPU time's share of the CPU packages' (RAPL)"),
}
