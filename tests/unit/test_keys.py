import pytest

from ingest.keys import instance_key, is_safe_uid, normalize_prefix, quarantine_keys
from ingest.messages import MessageError, check_receipt_id
from ingest.spool import new_receipt_id


@pytest.mark.parametrize("uid", ["1.2.3", "1", "1.2.840.10008.5.1.4.1.1.2", "9" * 64])
def test_safe_uids(uid: str) -> None:
    assert is_safe_uid(uid)


@pytest.mark.parametrize(
    "uid",
    ["", "1.2/3", "../1.2", "1..2", ".1.2", "1.2.", "9" * 65, "1.2.3\0", "1.2 3", "\uff11.\uff12",
     "1.2\\3", None, 12],
)
def test_unsafe_uids(uid: object) -> None:
    assert not is_safe_uid(uid)


def test_instance_key_layout() -> None:
    assert instance_key("", "1.2", "1.3", "1.4") == "1.2/1.3/1.4.dcm"
    assert instance_key("site-a/", "1.2", "1.3", "1.4") == "site-a/1.2/1.3/1.4.dcm"
    assert instance_key("/a/b", "1.2", "1.3", "1.4") == "a/b/1.2/1.3/1.4.dcm"


@pytest.mark.parametrize("bad", ["../../etc", "1.2/3", ""])
def test_instance_key_refuses_unsafe_parts(bad: str) -> None:
    with pytest.raises(ValueError):
        instance_key("", "1.2", bad, "1.4")


def test_quarantine_keys() -> None:
    assert quarantine_keys("p", "r1") == ("p/quarantine/r1.dcm", "p/quarantine/r1.json")
    assert normalize_prefix("") == ""


def test_receipt_ids_are_checked() -> None:
    rid = new_receipt_id()
    assert check_receipt_id(rid) == rid
    for bad in ["../x", rid + "/", rid.upper(), 5, None, ""]:
        with pytest.raises(MessageError):
            check_receipt_id(bad)


@pytest.mark.parametrize(("value", "header"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2"),
    ("Müller^Anna", "M?ller^Anna"),
    ("tab\there\x7f", "tab?here?"),
    ("x" * 300, "x" * 256),
    ("é" * 300, "?" * 256),
    ("", ""),
])
def test_object_metadata_is_printable_ascii(value: str, header: str) -> None:
    from workers.archive import safe_header

    assert safe_header(value) == header
