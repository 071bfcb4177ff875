"""The receiver's Prometheus metrics, in a registry of its own, served on /metrics.

With several receiver processes (``INGEST_RECEIVER_PROCESSES``) process N serves its own on
``INGEST_METRICS_PORT``+N-1, and the first process's port answers for all of them: at each
scrape it reads the others' over loopback and sums them (:class:`Combined`), so that one
scraped port counts every C-STORE whatever process took it.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("dicom_ingest.receiver")

#: the sample names of a metric family of each type, after the family's name
_SUFFIXES = {"counter": ("_total", "_created"),
             "histogram": ("_bucket", "_count", "_sum", "_created"),
             "summary": ("", "_count", "_sum", "_created")}


class ReceiverMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "dicom_ingest_associations", "Associations by result and, when rejected, reason",
            ["result", "reason"], registry=r)
        self.cstores = Counter(
            "dicom_ingest_cstore", "C-STORE requests answered, by status and calling AE",
            ["status", "calling_aet"], registry=r)
        self.bytes = Counter("dicom_ingest_received_bytes",
                             "Bytes of instances made durable in the spool", registry=r)
        self.ack_seconds = Histogram(
            "dicom_ingest_ack_seconds", "From the whole dataset received to the answer",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r)
        self.protocol_aborts = Counter(
            "dicom_ingest_receiver_protocol_aborts", "Connections aborted for a PDU that "
            "breaks the receiver's bounds (receiver.limits), by reason",
            ["reason"], registry=r)
        self.enqueue_failures = Counter(
            "dicom_ingest_enqueue_failures", "Publishes to the broker that failed (the "
            "sweeper re-enqueues those entries)", registry=r)
        self.spool_depth = Gauge("dicom_ingest_spool_depth",
                                 "Complete entries waiting in the spool", registry=r)
        self.spool_oldest = Gauge("dicom_ingest_spool_oldest_age_seconds",
                                  "Age of the oldest spool entry", registry=r)

    def serve(self, port: int, host: str = "0.0.0.0", peers: Iterable[int] = ()) -> None:
        """Serve /metrics on ``port``; with ``peers`` (the other receiver processes' metrics
        ports on this host), this process's metrics and theirs, summed."""
        registry = self.registry
        if peers:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(Combined(self.registry, list(peers)))
        start_http_server(port, addr=host, registry=registry)


class Combined:
    """A collector: the metrics of one registry plus those the other receiver processes
    serve on ``peer_ports`` (read over loopback at each scrape). Counters and histograms are
    summed; gauges, which describe the one spool they share, take the highest value; a
    ``_created`` time the earliest. A process that does not answer within ``timeout`` is
    left out, and ``dicom_ingest_receiver_processes`` says how many answered."""

    def __init__(self, own: CollectorRegistry, peer_ports: list[int],
                 timeout: float = 1.0) -> None:
        self.own = own
        self.peer_ports = peer_ports
        self.timeout = timeout

    def collect(self) -> Iterator[Metric]:
        families = list(self.own.collect())
        rules: dict[str, tuple[Metric, str]] = {}  # sample name: its family, how to combine
        for family in families:
            for suffix in _SUFFIXES.get(family.type, ("",)):
                rule = ("min" if suffix == "_created" else
                        "max" if family.type == "gauge" else "sum")
                rules[family.name + suffix] = (family, rule)
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for sample in (s for family in families for s in family.samples):
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        answered = 1
        for port in self.peer_ports:
            samples = self._read(port)
            if samples is None:
                continue
            ours = [sample for sample in samples if sample[0] in rules]
            if not ours:  # something else holds that port (a worker's metrics, say)
                log.warning("metrics on port %d are no receiver's: left out", port)
                continue
            answered += 1
            for name, labels, value in ours:
                key = (name, tuple(sorted(labels.items())))
                if key not in values:
                    values[key] = value
                    continue
                rule = rules[name][1]
                values[key] = (values[key] + value if rule == "sum" else
                               max(values[key], value) if rule == "max" else
                               min(values[key], value))
        for family in families:
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for (name, pairs), value in values.items():
                if rules.get(name, (None,))[0] is family:
                    merged.add_sample(name, dict(pairs), value)
            yield merged
        processes = Metric("dicom_ingest_receiver_processes", "Receiver processes whose "
                           "metrics this answer sums (fewer than INGEST_RECEIVER_PROCESSES: "
                           "one did not answer)", "gauge")
        processes.add_sample("dicom_ingest_receiver_processes", {}, answered)
        yield processes

    def _read(self, port: int) -> list[tuple[str, dict[str, str], float]] | None:
        """The samples another process serves, or None when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                        timeout=self.timeout) as answer:
                text = answer.read().decode()
            return [(s.name, s.labels, s.value) for family in
                    text_string_to_metric_families(text) for s in family.samples]
        except (OSError, ValueError) as exc:
            log.warning("metrics of the receiver process on port %d left out: %s", port, exc)
            return None
