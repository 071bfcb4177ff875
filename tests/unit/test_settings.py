from pathlib import Path

import pytest

from ingest.settings import Settings, SettingsError, environment, from_env, known_variables


def test_defaults_match_the_design() -> None:
    s = from_env({})
    assert (s.host, s.port, s.ae_title) == ("0.0.0.0", 11112, "DICOM-INGEST")
    assert s.spool_dir == Path("./data/spool")
    assert s.redis_url == "redis://127.0.0.1:6379/0" and not s.redis_url_explicit
    assert s.archive_url == "./data/archive"
    assert s.duplicate_policy == "reject"


def test_environment_is_read_and_flags_win() -> None:
    env = {"INGEST_PORT": "104", "INGEST_AE_TITLE": "PACS1", "INGEST_REDIS_URL": "redis://r:1/2",
           "INGEST_ALLOWED_CALLING_AETS": "CT1, MR2", "INGEST_S3_SECURE": "false"}
    s = from_env(env, port=4242)
    assert s.port == 4242 and s.ae_title == "PACS1"
    assert s.redis_url_explicit
    assert s.allowed_calling_aets == ("CT1", "MR2")
    assert s.s3_secure is False


@pytest.mark.parametrize("name,value", [("INGEST_PORT", "eleven"), ("INGEST_S3_SECURE", "maybe"),
                                        ("INGEST_AE_TITLE", "X" * 17),
                                        ("INGEST_DUPLICATE_POLICY", "ignore"),
                                        ("INGEST_SWEEP_AGE", "-1")])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        from_env({name: value})


def test_environment_round_trips() -> None:
    s = Settings(port=1234, ae_title="X", allowed_calling_aets=("A", "B"), s3_secure=False)
    again = from_env(environment(s))
    assert again.replace(redis_url_explicit=False) == s


def test_secrets_are_not_in_repr() -> None:
    assert "hunter2" not in repr(Settings(s3_secret_key="hunter2"))
    assert "INGEST_S3_SECRET_KEY" in known_variables()


def test_receiver_processes_from_the_environment_and_the_flag() -> None:
    from dicom_ingest.cli import _settings, build_parser

    assert from_env({}).receiver_processes == 0  # one per core, at most 4
    assert from_env({"INGEST_RECEIVER_PROCESSES": "3"}).receiver_processes == 3
    with pytest.raises(SettingsError, match="INGEST_RECEIVER_PROCESSES"):
        from_env({"INGEST_RECEIVER_PROCESSES": "-1"})
    args = build_parser().parse_args(["receiver", "--processes", "2"])
    assert _settings(args).receiver_processes == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--processes", "-1"])


def test_direct_io_for_spool_files_is_gone() -> None:
    """Spool files always go through the page cache; the old switches are not read."""
    assert "INGEST_SPOOL_DIRECT_IO" not in known_variables()
    assert "INGEST_SPOOL_ASYNC_IO" not in known_variables()
    assert from_env({"INGEST_SPOOL_DIRECT_IO": "true"}) == from_env({})
