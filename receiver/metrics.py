"""The receiver's Prometheus metrics, in a registry of its own.

With a metrics port, every receiver process writes its values to the directory of
:func:`ingest.metrics.summed`, which the first process serves summed: counters and histograms
add up, the spool gauges (every process counts the one spool) take the highest value among
the running processes. prometheus_client is imported here only when the metrics are made,
after that directory is set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ReceiverMetrics:
    registry: CollectorRegistry
    associations: Counter
    cstores: Counter
    bytes: Counter
    ack_seconds: Histogram
    protocol_aborts: Counter
    enqueue_failures: Counter
    spool_depth: Gauge
    spool_oldest: Gauge
    processes: Gauge
    commitment: CommitmentCounters

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
                                 "Complete entries waiting in the spool", registry=r,
                                 multiprocess_mode="livemax")
        self.spool_oldest = Gauge("dicom_ingest_spool_oldest_age_seconds",
                                  "Age of the oldest spool entry", registry=r,
                                  multiprocess_mode="livemax")
        self.processes = Gauge("dicom_ingest_receiver_processes",
                               "Receiver processes running (fewer than "
                               "INGEST_RECEIVER_PROCESSES: one has exited)", registry=r,
                               multiprocess_mode="livesum")
        self.processes.set(1)
        self.commitment = CommitmentCounters(
            Counter("dicom_ingest_commitment_requests",
                    "Storage commitment requests taken (N-ACTION answered Success)",
                    registry=r),
            Counter("dicom_ingest_commitment_instances",
                    "Instances reported in storage commitment reports, by result "
                    "(committed, or the failure reason)", ["result"], registry=r),
            Counter("dicom_ingest_commitment_delivery_failures",
                    "Storage commitment reports that could not be delivered (retried)",
                    registry=r),
            Counter("dicom_ingest_commitment_expired",
                    "Storage commitment reports given up after INGEST_COMMITMENT_EXPIRY",
                    registry=r))

    def spool_counted(self, depth: int, oldest_age: float) -> None:
        """The spool monitor's latest count."""
        self.spool_depth.set(depth)
        self.spool_oldest.set(oldest_age)


class CommitmentCounters:
    """The storage commitment's counters (:class:`receiver.commitment.CommitmentMetrics`)."""

    def __init__(self, requests: Counter, instances: Counter, failures: Counter,
                 expirations: Counter) -> None:
        self._requests, self._instances = requests, instances
        self._failures, self._expirations = failures, expirations

    def requested(self) -> None:
        self._requests.inc()

    def decided(self, result: str, count: int) -> None:
        self._instances.labels(result).inc(count)

    def delivery_failed(self) -> None:
        self._failures.inc()

    def expired(self) -> None:
        self._expirations.inc()


class StudyCounters:
    """The stabiliser's metrics (:class:`receiver.stabiliser.StudyMetrics`), made in its own
    process (the metrics directory it inherits sums them with the receiver's)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self._stabilised = Counter("dicom_ingest_studies_stabilised",
                                   "Studies that became stable (one per event: a revision)",
                                   registry=self.registry)
        self._pending = Gauge("dicom_ingest_study_events_pending",
                              "Study events in the outbox not delivered yet",
                              registry=self.registry, multiprocess_mode="livemax")

    def stabilised(self) -> None:
        self._stabilised.inc()

    def pending(self, count: int) -> None:
        self._pending.set(count)
