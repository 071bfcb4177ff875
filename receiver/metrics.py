"""The receiver's Prometheus metrics, in a registry of its own, served on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


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
        self.enqueue_failures = Counter(
            "dicom_ingest_enqueue_failures", "Publishes to the broker that failed (the "
            "sweeper re-enqueues those entries)", registry=r)
        self.spool_depth = Gauge("dicom_ingest_spool_depth",
                                 "Complete entries waiting in the spool", registry=r)
        self.spool_oldest = Gauge("dicom_ingest_spool_oldest_age_seconds",
                                  "Age of the oldest spool entry", registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
