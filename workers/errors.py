"""The error taxonomy: permanent (the object is bad: quarantine) versus transient (retry)."""

from __future__ import annotations


class PermanentError(Exception):
    """The object itself is bad; retrying cannot help. It goes to quarantine with ``code``."""

    def __init__(self, code: str, message: str, study_uid: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.study_uid = study_uid  # when the dataset named a valid one


class TransientError(Exception):
    """A service (storage, broker) is unavailable or misbehaved; the task retries later and
    the spool keeps the object meanwhile."""


class ConfigurationError(TransientError):
    """The archive refuses us for a reason an operator must fix (access denied, no such
    bucket, a read-only directory): logged as an error, retried like any transient failure,
    so that nothing is lost while it is being fixed."""


# reason codes of the quarantine (public: they appear in quarantine/{receipt}.json)
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
MISSING_ATTRIBUTE = "missing-attribute"
INVALID_UID = "invalid-uid"
UID_MISMATCH = "uid-mismatch"
TRANSFER_SYNTAX_MISMATCH = "transfer-syntax-mismatch"
CHECKSUM_MISMATCH = "checksum-mismatch"
DUPLICATE_CONFLICT = "duplicate-conflict"
TOO_LARGE = "too-large"
POISON = "poison"
