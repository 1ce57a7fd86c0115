"""``--metrics ADDR:PORT``: the ``stats`` counters in Prometheus' text format.

Uses ``prometheus_client`` (the optional extra ``pyvduse[metrics]``), imported only when
metrics are asked for. A custom collector turns the same snapshot as the ``stats`` command
into metric families at scrape time, so the request path never calls into prometheus_client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pyvduse.errors import ConfigError, MissingDependency
from pyvduse.ops import inspect
from pyvduse.ops.target import Target
from pyvduse.runtime.worker import LATENCY_BUCKETS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

#: Histogram bounds exported: 1 µs to 2**26 µs (about 67 s), then +Inf.
EXPORTED_BUCKETS = min(27, LATENCY_BUCKETS)

MISSING = (
    "metrics need the prometheus_client package: "
    "pip install 'pyvduse[metrics]' (or pip install prometheus_client)"
)


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[::1]:9100`` for IPv6; an empty ADDR means every address)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"{text} is no address: give ADDR:PORT, for example 127.0.0.1:9100", option="metrics"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{text}: write an IPv6 address in brackets, like [::1]:9100", option="metrics")
    return host or "0.0.0.0", int(port_text)


def require_client() -> None:
    """MissingDependency when prometheus_client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MissingDependency(MISSING, option="metrics") from None


class DeviceCollector:
    """Collects one device's counters when Prometheus scrapes."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def describe(self) -> list[Metric]:
        return []  # no describe-time collection: the registry must not scrape at register

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        snap = inspect.stats(self.target)
        name = self.target.name
        qlabels = ["device", "queue"]

        def counter(metric: str, doc: str, key: str) -> CounterMetricFamily:
            fam = CounterMetricFamily(metric, doc, labels=qlabels)
            for q in snap["queues"]:
                if key in q:
                    fam.add_metric([name, str(q["index"])], q[key])
            return fam

        requests = CounterMetricFamily(
            "pyvduse_requests_total", "Requests served, by type", labels=[*qlabels, "type"]
        )
        for q in snap["queues"]:
            for rtype, n in q.get("requests", {}).items():
                requests.add_metric([name, str(q["index"]), rtype], n)
        yield requests
        yield counter("pyvduse_read_bytes_total", "Bytes read from the device", "bytes_read")
        yield counter("pyvduse_written_bytes_total", "Bytes written to the device", "bytes_written")
        yield counter("pyvduse_request_errors_total", "Requests completed with an error status", "errors")
        yield counter("pyvduse_bad_requests_total", "Malformed requests", "bad_requests")
        yield counter("pyvduse_requests_completed_total", "Requests completed", "completed")
        if any("packets" in q for q in snap["queues"]):
            yield counter("pyvduse_net_packets_total", "Frames sent (tx) or received (rx)", "packets")
            yield counter("pyvduse_net_bytes_total", "Frame bytes sent (tx) or received (rx)", "bytes")
            yield counter(
                "pyvduse_net_drops_total",
                "Frames dropped: link down, no receive buffer, refused by the backend",
                "drops",
            )
        in_flight = GaugeMetricFamily(
            "pyvduse_requests_in_flight", "Requests taken from the ring and not completed", labels=qlabels
        )
        for q in snap["queues"]:
            in_flight.add_metric([name, str(q["index"])], q["in_flight"])
        yield in_flight
        hist = HistogramMetricFamily(
            "pyvduse_request_duration_seconds", "Time the device took to serve a request", labels=qlabels
        )
        for q in snap["queues"]:
            hist.add_metric(
                [name, str(q["index"])],
                _cumulative(q["latency"], floatToGoString),
                q["latency"]["sum_us"] / 1e6,
            )
        yield hist
        depth = HistogramMetricFamily(
            "pyvduse_queue_depth",
            "Requests in flight on the queue (itself included) when each request was taken",
            labels=qlabels,
        )
        for q in snap["queues"]:
            depth.add_metric([name, str(q["index"])], _depth_buckets(q["depth"]), q["depth"]["sum"])
        yield depth
        if "capacity" in snap:
            cap = GaugeMetricFamily("pyvduse_capacity_bytes", "Device capacity", labels=["device"])
            cap.add_metric([name], snap["capacity"])
            yield cap


def _cumulative(lat: dict[str, Any], fmt: Any) -> list[tuple[str, float]]:
    counts = {b: n for b, n in lat["buckets"]}
    out = []
    running = 0
    for b in range(EXPORTED_BUCKETS):
        running += counts.get(1 << b, 0)
        out.append((fmt((1 << b) / 1e6), float(running)))
    out.append(("+Inf", float(lat["count"])))
    return out


#: Queue-depth buckets exported: depth <= 2**b - 1, up to the largest queue (32768).
DEPTH_BUCKETS = 17


def _depth_buckets(dep: dict[str, Any]) -> list[tuple[str, float]]:
    """``le`` buckets of a depth histogram (``inspect.depth``: bucket bound 2**b counts
    depths in [2**(b-1), 2**b - 1])."""
    counts = {b: n for b, n in dep["buckets"]}
    out = []
    running = 0
    for b in range(1, DEPTH_BUCKETS + 1):
        running += counts.get(1 << b, 0)
        out.append((str((1 << b) - 1), float(running)))
    out.append(("+Inf", float(dep["count"])))
    return out


class MetricsServer:
    """An HTTP endpoint serving ``/metrics`` for one device, on its own thread."""

    def __init__(self, target: Target, address: str) -> None:
        self.target = target
        self.host, self.port = parse_address(address)
        self._httpd: Any = None

    def start(self) -> None:
        require_client()
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(DeviceCollector(self.target))
        try:
            result = start_http_server(self.port, self.host, registry=registry)
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self.port}: {e.strerror or e}", option="metrics"
            ) from None
        self._httpd = result[0] if isinstance(result, tuple) else None
        if self._httpd is not None:
            self.port = int(self._httpd.server_port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.target.metrics_address = f"{host}:{self.port}"
        log.info("metrics on http://%s/metrics", self.target.metrics_address)

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
