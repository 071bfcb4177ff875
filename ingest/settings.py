"""Settings: every INGEST_* environment variable is read here, once, into a frozen dataclass."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "INGEST_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DUPLICATE_POLICIES = ("reject", "overwrite", "version")
UNKNOWN_SOP_CLASSES = ("accept", "reject")
_SPOOL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LOG_FORMATS = ("text", "json")
#: the catalog's URL schemes (``postgresql://`` goes to the psycopg 3 driver)
CATALOG_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+psycopg")
#: where the study event task (INGEST_ON_STUDY_TASK) goes unless INGEST_ON_STUDY_QUEUE says
DEFAULT_STUDY_QUEUE = "dicom-ingest-events"


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the receiver, the workers and the CLI need to know, built at an entry point."""

    host: str = "0.0.0.0"
    port: int = 11112
    ae_title: str = "DICOM-INGEST"
    max_associations: int = 32
    max_pdu: int = 0  # 0: unlimited (we accept whatever the sender proposes)
    spool_dir: Path = Path("./data/spool")
    #: names the archive queue of this spool; "": the id kept in the spool directory
    spool_id: str = ""
    redis_url: str = DEFAULT_REDIS_URL
    redis_url_explicit: bool = False  # INGEST_REDIS_URL was set (``up`` starts Redis otherwise)
    archive_url: str = "./data/archive"
    sweep_interval: float = 60.0
    sweep_age: float = 300.0
    s3_endpoint: str = "s3.amazonaws.com"
    s3_access_key: str = field(default="", repr=False)
    s3_secret_key: str = field(default="", repr=False)
    s3_secure: bool = True
    s3_region: str = ""
    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = False
    duplicate_policy: str = "reject"
    #: "accept": any storage SOP class, private and unknown ones too; "reject": the standard list
    unknown_sop_classes: str = "accept"
    spool_min_free_mb: int = 512
    spool_max_depth: int = 0  # 0: no limit
    spool_max_age: float = 0.0  # seconds; 0: no limit
    poison_max_attempts: int = 5
    log_format: str = "text"
    log_level: str = "INFO"
    worker_concurrency: int = 0  # 0: two processes per core (workers.app)
    task_max_retries: int = 8
    visibility_timeout: int = 3600
    metrics_port: int = 0  # 0: no /metrics endpoint
    worker_metrics_port: int = 0
    shutdown_timeout: float = 30.0  # seconds in-flight associations get after SIGTERM
    tls_cert: str = ""
    tls_key: str = field(default="", repr=False)
    tls_ca: str = ""
    #: processes sharing the listening socket; 0: one per usable core, at most 4
    #: (:func:`receiver_processes`)
    receiver_processes: int = 0
    receiver_index: int = 0  # set by the receiver for its extra processes
    receiver_fast_path: bool = True  # C-STOREs straight from the socket to the spool
    #: where storage commitment reports go when the requesting association is closed:
    #: (calling AE title, host, port) of each requester
    commitment_peers: tuple[tuple[str, str, int], ...] = ()
    commitment_timeout: float = 600.0  # seconds a referenced instance is waited for
    commitment_expiry: float = 86400.0  # seconds an undeliverable report is retried
    flower_port: int = 5555
    flower_basic_auth: str = field(default="", repr=False)  # user:password
    #: postgresql://USER:PASS@HOST:PORT/DB or sqlite:///PATH; "": SQLite at
    #: ./data/catalog.sqlite (:func:`ingest.catalog.catalog_url`)
    catalog_url: str = field(default="", repr=False)
    #: a study with no newly archived instance for this long, and none pending, is stable
    study_stable_seconds: float = 60.0
    #: POST each study event here (a URL may carry a token: kept out of repr)
    on_study_webhook: str = field(default="", repr=False)
    webhook_secret: str = field(default="", repr=False)  # HMAC-SHA256 key of the webhook body
    on_study_task: str = ""  # a Celery task sent by name for each study event
    on_study_queue: str = DEFAULT_STUDY_QUEUE

    @property
    def entries_dir(self) -> Path:
        return self.spool_dir / "entries"

    @property
    def tmp_dir(self) -> Path:
        return self.spool_dir / "tmp"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity mask; a container's CPU quota does
    not narrow it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API on this platform
        return os.cpu_count() or 1


#: receiver processes when INGEST_RECEIVER_PROCESSES is 0: one per usable core, at most this
DEFAULT_MAX_PROCESSES = 4


def receiver_processes(settings: Settings) -> int:
    """How many receiver processes serve the port: the setting, or when it is 0 one per
    usable core, at most :data:`DEFAULT_MAX_PROCESSES`.

    Each process has one GIL for all its associations, so parallel associations need more
    than one process to use more than one core; more processes than cores gain nothing
    (``docs/performance.md``). Beyond four cores, set the number."""
    return settings.receiver_processes or min(usable_cores(), DEFAULT_MAX_PROCESSES)


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{PREFIX}{name}={raw!r}: expected true or false")


def _int(name: str, raw: str, minimum: int = 0) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: expected a whole number") from None
    if value < minimum:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: must be at least {minimum}")
    return value


def _float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: must be positive")
    return value


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: expected one of {', '.join(choices)}")
    return value


def _ae_title(name: str, raw: str) -> str:
    value = raw.strip()
    if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: an AE title is 1 to 16 ASCII characters")
    return value


def _catalog_url(raw: str) -> str:
    scheme, sep, _ = raw.partition("://")
    if not sep or scheme.lower() not in CATALOG_SCHEMES:
        raise SettingsError(f"{PREFIX}CATALOG_URL={redact_url(raw)!r}: expected "
                            "postgresql://USER:PASS@HOST:PORT/DB or sqlite:///PATH")
    return raw


def _peers(name: str, raw: str) -> tuple[tuple[str, str, int], ...]:
    """``AE=host:port,AE2=host:port`` as (AE title, host, port) triples."""
    peers = []
    for part in raw.split(","):
        if not part.strip():
            continue
        ae, sep, address = part.partition("=")
        host, colon, port = address.strip().rpartition(":")
        if not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"{PREFIX}{name}: {part.strip()!r} is not AE=host:port")
        peers.append((_ae_title(name, ae), host.strip("[]"), int(port)))
    return tuple(peers)


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from ``INGEST_*`` variables; keyword overrides (CLI flags) win."""
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        value = env.get(PREFIX + name)
        return value if value not in (None, "") else None

    values: dict[str, Any] = {}
    if (v := get("HOST")) is not None:
        values["host"] = v
    if (v := get("PORT")) is not None:
        values["port"] = _int("PORT", v)
    if (v := get("AE_TITLE")) is not None:
        values["ae_title"] = _ae_title("AE_TITLE", v)
    if (v := get("MAX_ASSOCIATIONS")) is not None:
        values["max_associations"] = _int("MAX_ASSOCIATIONS", v, minimum=1)
    if (v := get("MAX_PDU")) is not None:
        values["max_pdu"] = _int("MAX_PDU", v)
    if (v := get("SPOOL_DIR")) is not None:
        values["spool_dir"] = Path(v)
    if (v := get("SPOOL_ID")) is not None:
        if not _SPOOL_ID.match(v):
            raise SettingsError(f"{PREFIX}SPOOL_ID={v!r}: 1 to 64 letters, digits, - or _")
        values["spool_id"] = v
    if (v := get("REDIS_URL")) is not None:
        values["redis_url"] = v
        values["redis_url_explicit"] = True
    if (v := get("ARCHIVE_URL")) is not None:
        values["archive_url"] = v
    if (v := get("SWEEP_INTERVAL")) is not None:
        values["sweep_interval"] = _float("SWEEP_INTERVAL", v)
    if (v := get("SWEEP_AGE")) is not None:
        values["sweep_age"] = _float("SWEEP_AGE", v)
    if (v := get("S3_ENDPOINT")) is not None:
        values["s3_endpoint"] = v
    if (v := get("S3_ACCESS_KEY")) is not None:
        values["s3_access_key"] = v
    if (v := get("S3_SECRET_KEY")) is not None:
        values["s3_secret_key"] = v
    if (v := get("S3_SECURE")) is not None:
        values["s3_secure"] = _bool("S3_SECURE", v)
    if (v := get("S3_REGION")) is not None:
        values["s3_region"] = v
    if (v := get("ALLOWED_CALLING_AETS")) is not None:
        values["allowed_calling_aets"] = tuple(
            _ae_title("ALLOWED_CALLING_AETS", part) for part in v.split(",") if part.strip()
        )
    if (v := get("REQUIRE_CALLED_AET")) is not None:
        values["require_called_aet"] = _bool("REQUIRE_CALLED_AET", v)
    if (v := get("DUPLICATE_POLICY")) is not None:
        values["duplicate_policy"] = _choice("DUPLICATE_POLICY", v, DUPLICATE_POLICIES)
    if (v := get("UNKNOWN_SOP_CLASSES")) is not None:
        values["unknown_sop_classes"] = _choice("UNKNOWN_SOP_CLASSES", v, UNKNOWN_SOP_CLASSES)
    if (v := get("SPOOL_MIN_FREE_MB")) is not None:
        values["spool_min_free_mb"] = _int("SPOOL_MIN_FREE_MB", v)
    if (v := get("SPOOL_MAX_DEPTH")) is not None:
        values["spool_max_depth"] = _int("SPOOL_MAX_DEPTH", v)
    if (v := get("SPOOL_MAX_AGE")) is not None:
        values["spool_max_age"] = float(_int("SPOOL_MAX_AGE", v))
    if (v := get("POISON_MAX_ATTEMPTS")) is not None:
        values["poison_max_attempts"] = _int("POISON_MAX_ATTEMPTS", v, minimum=1)
    if (v := get("LOG_FORMAT")) is not None:
        values["log_format"] = _choice("LOG_FORMAT", v, LOG_FORMATS)
    if (v := get("LOG_LEVEL")) is not None:
        values["log_level"] = _choice("LOG_LEVEL", v, ("debug", "info", "warning", "error")).upper()
    if (v := get("WORKER_CONCURRENCY")) is not None:
        values["worker_concurrency"] = _int("WORKER_CONCURRENCY", v)
    if (v := get("TASK_MAX_RETRIES")) is not None:
        values["task_max_retries"] = _int("TASK_MAX_RETRIES", v)
    if (v := get("VISIBILITY_TIMEOUT")) is not None:
        values["visibility_timeout"] = _int("VISIBILITY_TIMEOUT", v, minimum=1)
    if (v := get("METRICS_PORT")) is not None:
        values["metrics_port"] = _int("METRICS_PORT", v)
    if (v := get("WORKER_METRICS_PORT")) is not None:
        values["worker_metrics_port"] = _int("WORKER_METRICS_PORT", v)
    if (v := get("SHUTDOWN_TIMEOUT")) is not None:
        values["shutdown_timeout"] = _float("SHUTDOWN_TIMEOUT", v)
    for name in ("TLS_CERT", "TLS_KEY", "TLS_CA"):
        if (v := get(name)) is not None:
            values[name.lower()] = v
    if (v := get("RECEIVER_PROCESSES")) is not None:
        values["receiver_processes"] = _int("RECEIVER_PROCESSES", v)
    if (v := get("RECEIVER_INDEX")) is not None:
        values["receiver_index"] = _int("RECEIVER_INDEX", v)
    if (v := get("RECEIVER_FAST_PATH")) is not None:
        values["receiver_fast_path"] = _bool("RECEIVER_FAST_PATH", v)
    if (v := get("COMMITMENT_PEERS")) is not None:
        values["commitment_peers"] = _peers("COMMITMENT_PEERS", v)
    if (v := get("COMMITMENT_TIMEOUT")) is not None:
        values["commitment_timeout"] = _float("COMMITMENT_TIMEOUT", v)
    if (v := get("COMMITMENT_EXPIRY")) is not None:
        values["commitment_expiry"] = _float("COMMITMENT_EXPIRY", v)
    if (v := get("FLOWER_PORT")) is not None:
        values["flower_port"] = _int("FLOWER_PORT", v)
    if (v := get("FLOWER_BASIC_AUTH")) is not None:
        if ":" not in v:
            raise SettingsError(f"{PREFIX}FLOWER_BASIC_AUTH: expected user:password")
        values["flower_basic_auth"] = v
    if (v := get("CATALOG_URL")) is not None:
        values["catalog_url"] = v
    if (v := get("STUDY_STABLE_SECONDS")) is not None:
        values["study_stable_seconds"] = _float("STUDY_STABLE_SECONDS", v)
    if (v := get("ON_STUDY_WEBHOOK")) is not None:
        if not re.match(r"^https?://[^/\s]+", v):
            raise SettingsError(f"{PREFIX}ON_STUDY_WEBHOOK: expected an http:// or https:// URL")
        values["on_study_webhook"] = v
    if (v := get("WEBHOOK_SECRET")) is not None:
        values["webhook_secret"] = v
    if (v := get("ON_STUDY_TASK")) is not None:
        values["on_study_task"] = v.strip()
    if (v := get("ON_STUDY_QUEUE")) is not None:
        values["on_study_queue"] = v.strip()
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("catalog_url"):
        _catalog_url(values["catalog_url"])
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        raise SettingsError(f"{PREFIX}TLS_CERT and {PREFIX}TLS_KEY go together")
    if values.get("tls_ca") and not values.get("tls_cert"):
        raise SettingsError(f"{PREFIX}TLS_CA needs {PREFIX}TLS_CERT and {PREFIX}TLS_KEY")
    return Settings(**values)


def environment(settings: Settings) -> dict[str, str]:
    """The ``INGEST_*`` variables that reproduce ``settings`` in a child process."""
    env = {
        "HOST": settings.host,
        "PORT": str(settings.port),
        "AE_TITLE": settings.ae_title,
        "MAX_ASSOCIATIONS": str(settings.max_associations),
        "MAX_PDU": str(settings.max_pdu),
        "SPOOL_DIR": str(settings.spool_dir),
        "SPOOL_ID": settings.spool_id,
        "REDIS_URL": settings.redis_url,
        "ARCHIVE_URL": settings.archive_url,
        "SWEEP_INTERVAL": str(settings.sweep_interval),
        "SWEEP_AGE": str(settings.sweep_age),
        "S3_ENDPOINT": settings.s3_endpoint,
        "S3_ACCESS_KEY": settings.s3_access_key,
        "S3_SECRET_KEY": settings.s3_secret_key,
        "S3_SECURE": str(settings.s3_secure).lower(),
        "S3_REGION": settings.s3_region,
        "ALLOWED_CALLING_AETS": ",".join(settings.allowed_calling_aets),
        "REQUIRE_CALLED_AET": str(settings.require_called_aet).lower(),
        "DUPLICATE_POLICY": settings.duplicate_policy,
        "UNKNOWN_SOP_CLASSES": settings.unknown_sop_classes,
        "SPOOL_MIN_FREE_MB": str(settings.spool_min_free_mb),
        "SPOOL_MAX_DEPTH": str(settings.spool_max_depth),
        "SPOOL_MAX_AGE": str(int(settings.spool_max_age)),
        "POISON_MAX_ATTEMPTS": str(settings.poison_max_attempts),
        "LOG_FORMAT": settings.log_format,
        "LOG_LEVEL": settings.log_level.lower(),
        "WORKER_CONCURRENCY": str(settings.worker_concurrency),
        "TASK_MAX_RETRIES": str(settings.task_max_retries),
        "VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
        "METRICS_PORT": str(settings.metrics_port),
        "WORKER_METRICS_PORT": str(settings.worker_metrics_port),
        "SHUTDOWN_TIMEOUT": str(settings.shutdown_timeout),
        "TLS_CERT": settings.tls_cert,
        "TLS_KEY": settings.tls_key,
        "TLS_CA": settings.tls_ca,
        "RECEIVER_PROCESSES": str(settings.receiver_processes),
        "RECEIVER_INDEX": str(settings.receiver_index),
        "RECEIVER_FAST_PATH": str(settings.receiver_fast_path).lower(),
        "COMMITMENT_PEERS": ",".join(f"{ae}={f'[{host}]' if ':' in host else host}:{port}"
                                     for ae, host, port in settings.commitment_peers),
        "COMMITMENT_TIMEOUT": str(settings.commitment_timeout),
        "COMMITMENT_EXPIRY": str(settings.commitment_expiry),
        "FLOWER_PORT": str(settings.flower_port),
        "FLOWER_BASIC_AUTH": settings.flower_basic_auth,
        "CATALOG_URL": settings.catalog_url,
        "STUDY_STABLE_SECONDS": str(settings.study_stable_seconds),
        "ON_STUDY_WEBHOOK": settings.on_study_webhook,
        "WEBHOOK_SECRET": settings.webhook_secret,
        "ON_STUDY_TASK": settings.on_study_task,
        "ON_STUDY_QUEUE": settings.on_study_queue,
    }
    return {PREFIX + k: v for k, v in env.items()}


def redact_url(url: str) -> str:
    """A URL without its credentials, for logs and messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def known_variables() -> frozenset[str]:
    """Every ``INGEST_*`` name this module reads (used to check deploy files)."""
    return frozenset(environment(Settings()))
