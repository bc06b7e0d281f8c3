"""Prometheus metrics, served on their own HTTP port (TRUSTPLANE_METRICS_LISTEN).

Each server instance owns a `CollectorRegistry`, so several servers in one process (tests)
never share counters. Metric names are documented in docs/architecture.md#observability.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import prometheus_client as prom
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.config import Address

# Latency buckets from 250 µs to 10 s: the hot RPCs live in the first few.
prom.disable_created_metrics()  # type: ignore[no-untyped-call]

_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class Metrics:
    """The server's metric families."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        self.calls = prom.Counter(
            "trustplane_rpc_calls",
            "RPCs completed, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = prom.Histogram(
            "trustplane_rpc_duration_seconds",
            "RPC latency inside the server, by method.",
            ["method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.healthy = prom.Gauge(
            "trustplane_database_up",
            "1 while the PostgreSQL probe succeeds.",
            registry=self.registry,
        )

    def add_gauges(self, name: str, doc: str, read: Callable[[], dict[str, float]]) -> None:
        """Register a gauge family whose labelled values are read at scrape time."""
        self.registry.register(_CallbackGauges(name, doc, read))


class _CallbackGauges(Collector):
    def __init__(self, name: str, doc: str, read: Callable[[], dict[str, float]]) -> None:
        self._name, self._doc, self._read = name, doc, read

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily(self._name, self._doc, labels=["kind"])
        for kind, value in self._read().items():
            family.add_metric([kind], value)
        yield family


class MetricsServer:
    """The HTTP endpoint; `port` is the bound port (useful when configured as 0)."""

    def __init__(self, metrics: Metrics, address: Address) -> None:
        server, thread = prom.start_http_server(
            address.port, addr=address.host, registry=metrics.registry
        )
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port = int(server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
