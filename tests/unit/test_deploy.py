"""No container engine runs here, so the shipped stack is checked statically: it parses, and
it agrees with the settings, names and metrics the code really has."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.messages import queue_for
from ingest.settings import known_variables

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


def ingest_names(obj: Any) -> set[str]:
    """Every INGEST_* name that appears as a key or an env var name anywhere in ``obj``."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and key.startswith("INGEST_"):
                found.add(key)
            if key == "name" and isinstance(value, str) and value.startswith("INGEST_"):
                found.add(value)
            found |= ingest_names(value)
    elif isinstance(obj, list):
        for item in obj:
            found |= ingest_names(item)
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_compose_services_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "minio", "minio-init", "postgres", "receiver", "worker",
                             "flower"}
    for name in ("redis", "minio", "postgres", "receiver"):
        assert services[name]["healthcheck"]["test"], name
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    for name in ("redis", "minio", "minio-init", "postgres"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} is not pinned"
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["redis"]["condition"] == "service_healthy"
    assert worker_deps["minio-init"]["condition"] == "service_completed_successfully"
    assert worker_deps["postgres"]["condition"] == "service_healthy"
    assert services["receiver"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "11112:11112" in services["receiver"]["ports"]
    # one spool volume, shared by the receiver and the workers
    spool = {s: [v for v in services[s]["volumes"] if v.startswith("spool:")]
             for s in ("receiver", "worker")}
    assert spool["receiver"] == spool["worker"] != []
    assert "spool" in compose["volumes"]
    # exec-form commands: the process gets SIGTERM itself
    for name in ("receiver", "worker", "flower"):
        assert isinstance(services[name]["command"], list)
    assert services["worker"]["stop_grace_period"]


def test_compose_catalog_is_postgresql_with_a_volume_and_a_secret(
        compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert any(v.startswith("postgres-data:/var/lib/postgresql/data")
               for v in postgres["volumes"])
    assert "postgres-data" in compose["volumes"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    # the password is a Compose secret for the server, from the environment, never a literal
    assert postgres["secrets"] == ["postgres-password"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres-password"
    assert compose["secrets"]["postgres-password"] == {"environment": "POSTGRES_PASSWORD"}
    url = compose["x-ingest-env"]["INGEST_CATALOG_URL"]
    user, db = postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_DB"]
    assert url.startswith(f"postgresql://{user}:${{POSTGRES_PASSWORD:?")
    assert url.endswith(f"@postgres:5432/{db}")
    for role in ("receiver", "worker"):
        assert compose["services"][role]["environment"]["INGEST_CATALOG_URL"] == url


def test_compose_settings_exist(compose: dict[str, Any]) -> None:
    names = ingest_names(compose)
    assert names, "no INGEST_* settings found"
    assert names <= known_variables(), names - known_variables()


def test_flower_is_never_without_auth(compose: dict[str, Any],
                                      manifests: list[dict[str, Any]]) -> None:
    env = compose["services"]["flower"]["environment"]
    assert "?" in env["INGEST_FLOWER_BASIC_AUTH"]  # compose refuses to start without it
    flower = next(d for d in manifests if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "dicom-ingest-flower")
    env_names = {e["name"] for e in flower["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "INGEST_FLOWER_BASIC_AUTH" in env_names


def test_no_secret_in_compose(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for line in text.splitlines():
        if re.search(r"(PASSWORD|SECRET|BASIC_AUTH)\w*:\s*\S", line):
            # from the environment, or a Compose secret's file (itself from the environment)
            assert "${" in line or re.search(r"_FILE:\s*/run/secrets/", line), \
                f"a literal secret: {line.strip()}"


def test_dockerfile() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["dicom-ingest"\]', text, re.M)
    assert re.search(r"^USER ingest", text, re.M)
    assert "EXPOSE 11112" in text
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / path).exists(), path
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+)", text, re.M))
    for package in packages:  # the image installs every package the distribution has
        assert package.rstrip("*") in copied, package


def test_manifests_parse_and_are_complete(manifests: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests}
    for expected in [("Service", "dicom-ingest-receiver"), ("Deployment", "dicom-ingest-receiver"),
                     ("Deployment", "dicom-ingest-worker"), ("ScaledObject", "dicom-ingest-worker"),
                     ("Deployment", "dicom-ingest-flower"), ("ConfigMap", "dicom-ingest"),
                     ("Secret", "dicom-ingest"), ("PersistentVolumeClaim", "dicom-ingest-spool")]:
        assert expected in kinds, expected
    assert sum(1 for kind, _ in kinds if kind == "PodDisruptionBudget") == 2
    for expected in [("Service", "postgres"), ("StatefulSet", "postgres"),
                     ("Secret", "dicom-ingest-postgres")]:
        assert expected in kinds, expected
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml")
                                    if p.name != "kustomization.yaml")


def test_manifests_catalog_is_postgresql_with_a_volume_and_a_secret(
        manifests: list[dict[str, Any]]) -> None:
    postgres = next(d for d in manifests if d["kind"] == "StatefulSet"
                    and d["metadata"]["name"] == "postgres")
    spec = postgres["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    assert "pg_isready" in container["readinessProbe"]["exec"]["command"]
    claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
    assert claim in [m["name"] for m in container["volumeMounts"]]
    env = {e["name"]: e for e in container["env"]}
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    secrets = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "Secret"}
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    # the catalog's URL carries a password: in the Secret the pods load, not the ConfigMap
    config = next(d for d in manifests if d["kind"] == "ConfigMap")["data"]
    assert "INGEST_CATALOG_URL" not in config
    url = secrets["dicom-ingest"]["stringData"]["INGEST_CATALOG_URL"]
    user, db = env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]
    assert url.startswith(f"postgresql://{user}:") and url.endswith(f"@postgres:5432/{db}")
    worker = next(d for d in manifests if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "dicom-ingest-worker")
    loaded = worker["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"secretRef": {"name": "dicom-ingest"}} in loaded


def test_manifest_settings_exist(manifests: list[dict[str, Any]]) -> None:
    names = ingest_names(manifests)
    assert names <= known_variables(), names - known_variables()


def test_selectors_ports_and_volumes_agree(manifests: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "Deployment"}
    for dep in deployments.values():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), dep["metadata"]["name"]
    for svc in (d for d in manifests if d["kind"] == "Service"):
        targets = [d for d in manifests if d["kind"] in ("Deployment", "StatefulSet")
                   and svc["spec"]["selector"].items()
                   <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"service {svc['metadata']['name']} selects nothing"
        ports = [p for c in targets[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in [p.get("name") for p in ports] + [
                p["containerPort"] for p in ports], svc["metadata"]["name"]
    for pdb in (d for d in manifests if d["kind"] == "PodDisruptionBudget"):
        selected = [d for d in deployments.values() if pdb["spec"]["selector"]["matchLabels"]
                    .items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, pdb["metadata"]["name"]
    for name in ("dicom-ingest-receiver", "dicom-ingest-worker"):
        volumes = deployments[name]["spec"]["template"]["spec"]["volumes"]
        assert {"name": "spool",
                "persistentVolumeClaim": {"claimName": "dicom-ingest-spool"}} in volumes
    pvc = next(d for d in manifests if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_grace_periods_cover_the_shutdown_timeout(manifests: list[dict[str, Any]]) -> None:
    config = next(d for d in manifests if d["kind"] == "ConfigMap")["data"]
    receiver = next(d for d in manifests if d["kind"] == "Deployment"
                    and d["metadata"]["name"] == "dicom-ingest-receiver")
    grace = receiver["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(config["INGEST_SHUTDOWN_TIMEOUT"])


def test_keda_scales_the_workers_on_our_queue(manifests: list[dict[str, Any]]) -> None:
    scaled = next(d for d in manifests if d["kind"] == "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "dicom-ingest-worker"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    config = next(d for d in manifests if d["kind"] == "ConfigMap")["data"]
    # the queue's name must be known before the spool exists: the spool id is set
    assert trigger["metadata"]["listName"] == queue_for(config["INGEST_SPOOL_ID"])
    host = config["INGEST_REDIS_URL"].split("://")[1].split("/")[0]
    assert trigger["metadata"]["address"] == host


def test_grafana_dashboard_uses_real_metrics() -> None:
    import prometheus_client

    from receiver.metrics import ReceiverMetrics, StudyCounters
    from workers import metrics as worker_metrics

    worker_metrics.get()  # registers the workers' metrics in the default registry
    families = [*ReceiverMetrics().registry.collect(), *StudyCounters().registry.collect(),
                *prometheus_client.REGISTRY.collect()]
    names = {s.name for f in families if f.name.startswith("dicom_ingest_")
             for s in f.samples} | {f.name for f in families}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dicom-ingest.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"dicom_ingest_\w+", e)}
    # a labelled metric with no sample yet shows only its family name: allow its suffixes
    known = names | {n + s for n in names for s in ("_total", "_bucket", "_count", "_sum")}
    assert used and used <= known, used - known


def test_the_readme_names_every_setting() -> None:
    """The README's configuration table is the user's reference: every variable the code
    reads is in it (but the one the receiver sets for its own extra processes)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = {name for name in known_variables() - {"INGEST_RECEIVER_INDEX"}
               if f"`{name}`" not in readme}
    assert not missing, sorted(missing)
