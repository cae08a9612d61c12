"""Network: bytes, packets and errors per interface and direction from /proc/net/dev."""

import os
from pathlib import Path

from prometheus_client.core import CounterMetricFamily

from trainmetrics.exporters.collectors.base import Collector, CollectorContext, label_text, read_bytes

# /proc/net/dev columns after "iface:": 8 receive columns, then 8 transmit columns.
RECEIVE_BYTES, RECEIVE_PACKETS, RECEIVE_ERRORS = 0, 1, 2
TRANSMIT_BYTES, TRANSMIT_PACKETS, TRANSMIT_ERRORS = 8, 9, 10


class NetworkCollector(Collector):
    """system_network_{io_bytes,packets,errors}_total{device,direction} (the process' network namespace)."""

    name = "network"
    fast = True

    def __init__(self, proc_root: Path | str = "/proc"):
        self.proc_root = str(proc_root)
        self._interfaces: list[tuple[str, list[int]]] = []

    @classmethod
    def build(cls, context: CollectorContext) -> "NetworkCollector":
        return cls(proc_root=context.proc_root)

    def sample(self, now: float) -> None:
        interfaces = []
        for line in read_bytes(f"{self.proc_root}/net/dev").split(b"\n")[2:]:
            name, sep, counters = line.partition(b":")
            if not sep:
                continue
            # An interface's name is bytes, any but '/', ':' and spaces: one not UTF-8 (`ip link add $'eth\xff'`)
            # failed every sample, every interface's series dropped. Its label writes such a byte `\xNN`.
            interfaces.append((label_text(os.fsdecode(name.strip())), [int(value) for value in counters.split()]))
        self._interfaces = interfaces

    def collect(self):
        families = []
        for name, help_text, receive, transmit in (
                ("system_network_io_bytes_total", "Bytes received and transmitted per interface.",
                 RECEIVE_BYTES, TRANSMIT_BYTES),
                ("system_network_packets_total", "Packets received and transmitted per interface.",
                 RECEIVE_PACKETS, TRANSMIT_PACKETS),
                ("system_network_errors_total", "Receive and transmit errors per interface.",
                 RECEIVE_ERRORS, TRANSMIT_ERRORS)):
            family = CounterMetricFamily(name, help_text, labels=["device", "direction"])
            for device, counters in self._interfaces:
                family.add_metric([device, "receive"], counters[receive])
                family.add_metric([device, "transmit"], counters[transmit])
            families.append(family)
        return families
