"""Platform configuration: which runtime runs the stages, where artifacts live, images, node pools, alerts.

One YAML document configures every DAG in this folder. It is found, in this order, at:

1. the path in the environment variable ``GENAI_PIPELINE_CONFIG``;
2. the Airflow Variable ``genai_pipeline_config``: the YAML document itself, or a path to it
   (the Helm chart sets it through ``AIRFLOW_VAR_GENAI_PIPELINE_CONFIG``, which costs no database call);
3. the embedded default: the ``local`` runtime with artifacts under ``<repo>/artifacts``.

The file is validated when it is loaded; an error names the key (``kubernetes.node_pools.gpu-spot...``).
The commented reference is ``values/local/pipeline.yaml`` (and ``dags/README.md``); one file per target
cloud lives beside it. Platform settings never come from a run conf: a run conf cannot choose the image,
the command, the service account, node selectors or privileges.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_VAR = "GENAI_PIPELINE_CONFIG"
AIRFLOW_VARIABLE = "genai_pipeline_config"
REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_POOLS = ("cpu", "gpu-spot", "gpu-on-demand")
URI_SCHEMES = ("file", "s3", "gs", "abfs")
STAGE_NAMES = ("tokenize", "train_lora", "evaluate", "batch_infer", "merge_predictions", "publish")

_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
_LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_TOLERATION = _obj(
    {
        "key": {"type": "string", "pattern": _LABEL_KEY},
        "operator": {"enum": ["Equal", "Exists"]},
        "value": {"type": "string"},
        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
    },
    required=("key", "operator"),
)
_NODE_POOL = _obj(
    {
        "node_selector": {
            "type": "object",
            "propertyNames": {"pattern": _LABEL_KEY},
            "additionalProperties": {"type": "string"},
        },
        "tolerations": {"type": "array", "items": _TOLERATION},
        "priority_class": {"type": "string", "pattern": r"^$|" + _NAME},
    }
)
_STAGE_OVERRIDE = _obj(
    {
        "cpu": {"type": "string", "pattern": _QUANTITY},
        "memory": {"type": "string", "pattern": _QUANTITY},
        "gpu": {"type": "integer", "minimum": 0, "maximum": 16},
        "timeout_minutes": {"type": "integer", "minimum": 1, "maximum": 7 * 24 * 60},
        "image": {"type": "string", "minLength": 1},
        "priority_class": {"type": "string", "pattern": r"^$|" + _NAME},
    }
)

CONFIG_SCHEMA: dict[str, Any] = _obj(
    {
        "runtime": {"enum": ["local", "kubernetes", "docker"]},
        "artifact_root": {"type": "string", "minLength": 1},
        "owner": {"type": "string", "minLength": 1},
        "allowed_uri_schemes": {"type": "array", "items": {"enum": list(URI_SCHEMES)}, "minItems": 1},
        "base_models": {
            "type": "object",
            "propertyNames": {"pattern": r"^[a-z0-9][a-z0-9._-]{0,62}$"},
            "additionalProperties": {"type": "string", "minLength": 1},
        },
        "retries": {"type": "integer", "minimum": 0, "maximum": 10},
        "retry_delay_seconds": {"type": "integer", "minimum": 1},
        "max_retry_delay_seconds": {"type": "integer", "minimum": 1},
        "max_shards": {"type": "integer", "minimum": 1, "maximum": 1024},
        "stages": {
            "type": "object",
            "propertyNames": {"enum": list(STAGE_NAMES)},
            "additionalProperties": _STAGE_OVERRIDE,
        },
        "local": _obj(
            {
                "python": {"type": "string"},
                "workdir": {"type": "string"},
                "kill_grace_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
            }
        ),
        "kubernetes": _obj(
            {
                "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                "service_account": {"type": "string", "pattern": _NAME},
                "kubernetes_conn_id": {"type": ["string", "null"]},
                "in_cluster": {"type": "boolean"},
                "image": _obj(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"},
                        "digest": {"type": "string", "pattern": r"^$|^sha256:[a-f0-9]{64}$"},
                        "pull_policy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    },
                    required=("repository",),
                ),
                "run_as_user": {"type": "integer", "minimum": 1},
                "scratch_size": {"type": "string", "pattern": _QUANTITY},
                "startup_timeout_seconds": {"type": "integer", "minimum": 60},
                "termination_grace_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
                "gpu_resource": {"type": "string", "pattern": _LABEL_KEY},
                "node_pools": {
                    "type": "object",
                    "propertyNames": {"enum": list(NODE_POOLS)},
                    "additionalProperties": _NODE_POOL,
                },
                "labels": {
                    "type": "object",
                    "propertyNames": {"pattern": _LABEL_KEY},
                    "additionalProperties": {"type": "string"},
                },
            }
        ),
        "docker": _obj(
            {
                "url": {"type": "string", "minLength": 1},
                "image": _obj(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"},
                    },
                ),
                "run_as_user": {"type": "integer", "minimum": 1},
                "mounts": {"type": "array", "items": {"type": "string", "pattern": "^/"}},
                "gpus": {"type": "boolean"},
            }
        ),
        "notifications": _obj(
            {
                "on_failure": {"type": "boolean"},
                "on_success": {"type": "boolean"},
                "smtp": _obj(
                    {
                        "conn_id": {"type": "string", "minLength": 1},
                        "to": {
                            "type": "array",
                            "items": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+$"},
                            "minItems": 1,
                        },
                        "from_email": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+$"},
                    },
                    required=("conn_id", "to"),
                ),
                "slack": _obj(
                    {"conn_id": {"type": "string", "minLength": 1}, "channel": {"type": "string", "minLength": 1}},
                    required=("conn_id", "channel"),
                ),
            }
        ),
    }
)


class ConfigError(ValueError):
    """The pipeline configuration is invalid; the message names the source and the key."""


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: str
    value: str | None = None
    effect: str | None = None


@dataclass(frozen=True)
class NodePool:
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    priority_class: str = ""


@dataclass(frozen=True)
class StageOverride:
    cpu: str | None = None
    memory: str | None = None
    gpu: int | None = None
    timeout_minutes: int | None = None
    image: str | None = None
    # Kubernetes runtime: this stage's PriorityClass, over its node pool's (training and inference share gpu-spot).
    priority_class: str | None = None


@dataclass(frozen=True)
class LocalSettings:
    python: str = ""  # empty: the interpreter that runs Airflow
    workdir: Path = REPO_ROOT
    kill_grace_seconds: int = 30


@dataclass(frozen=True)
class KubernetesSettings:
    namespace: str = "genai-stages"
    service_account: str = "genai-stage-runner"
    kubernetes_conn_id: str | None = None
    in_cluster: bool = True
    image_repository: str = "ghcr.io/genai-pipelines/stages"
    image_tag: str = "0.1.0"
    image_digest: str = ""
    image_pull_policy: str = "IfNotPresent"
    run_as_user: int = 10001
    scratch_size: str = "20Gi"
    # GPU node pools usually scale from zero: node provisioning, driver install and a multi-GB image pull.
    startup_timeout_seconds: int = 1200
    # Time between SIGTERM and SIGKILL: the trainer saves a checkpoint in it (spot notices give 30-120 s).
    termination_grace_seconds: int = 120
    gpu_resource: str = "nvidia.com/gpu"
    node_pools: dict[str, NodePool] = field(default_factory=lambda: {p: NodePool() for p in NODE_POOLS})
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DockerSettings:
    """The docker runtime: each stage in a local container from its image (``make build-images``)."""

    url: str = "unix://var/run/docker.sock"
    image_repository: str = "ghcr.io/genai-pipelines/stages"
    image_tag: str = "latest"
    image_digest: str = ""  # images built here have no registry digest
    # None: the uid running Airflow (files in the artifact root stay yours), or 10001 when that is root.
    run_as_user: int | None = None
    mounts: tuple[str, ...] = ()  # host paths mounted read-only at the same path (input data)
    gpus: bool = False  # request every GPU for GPU stages (needs the NVIDIA container toolkit)


@dataclass(frozen=True)
class SmtpSettings:
    conn_id: str
    to: tuple[str, ...]
    from_email: str | None = None


@dataclass(frozen=True)
class SlackSettings:
    conn_id: str
    channel: str


@dataclass(frozen=True)
class NotificationSettings:
    on_failure: bool = True
    on_success: bool = False
    smtp: SmtpSettings | None = None
    slack: SlackSettings | None = None


@dataclass(frozen=True)
class PipelineSettings:
    source: str = "embedded default"
    runtime: str = "local"
    artifact_root: str = ""
    owner: str = "genai-platform"
    allowed_uri_schemes: tuple[str, ...] = ("file",)
    base_models: dict[str, str] = field(default_factory=dict)
    retries: int = 1
    retry_delay_seconds: int = 10
    max_retry_delay_seconds: int = 1800
    max_shards: int = 16
    stages: dict[str, StageOverride] = field(default_factory=dict)
    local: LocalSettings = field(default_factory=LocalSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    notifications: NotificationSettings = field(default_factory=NotificationSettings)

    def image_for(self, stage: str) -> str:
        """The image of one stage: a per-stage override, else ``<repository>/<image>:<tag>`` (images/).

        A digest pins the shared stage base ``<repository>@<digest>`` instead, which runs every stage.
        """
        from genai_dags.stage_specs import STAGES  # stage_specs imports this module

        override = self.stages.get(stage)
        if override and override.image:
            return override.image
        k = self.docker if self.runtime == "docker" else self.kubernetes
        if k.image_digest:
            return f"{k.image_repository}@{k.image_digest}"
        return f"{k.image_repository}/{STAGES[stage].image}:{k.image_tag}"

    def stage_override(self, stage: str) -> StageOverride:
        return self.stages.get(stage) or StageOverride()


# The embedded default: everything on this machine, nothing to configure. Kept as YAML so that it is
# validated by the same code path as every shipped file.
DEFAULT_CONFIG_YAML = """
runtime: local
artifact_root: ./artifacts
allowed_uri_schemes: [file]
base_models:
  tiny-shakespeare: "{artifact_root}/runs/base-tiny/base_model/model"
retries: 1
retry_delay_seconds: 10
"""


def load_settings() -> PipelineSettings:
    """The platform configuration for this process (see the module docstring for the lookup order)."""
    path = os.environ.get(ENV_VAR, "").strip()
    if path:
        return load_file(path, source=f"{ENV_VAR}={path}")
    from airflow.sdk import Variable  # Airflow checks AIRFLOW_VAR_* first, then its secrets backends

    value = Variable.get(AIRFLOW_VARIABLE, default=None)
    if value:
        data = _parse_yaml(value, f"Airflow Variable {AIRFLOW_VARIABLE}")
        if isinstance(data, str):  # the Variable names a file
            return load_file(data.strip(), source=f"Airflow Variable {AIRFLOW_VARIABLE} -> {data.strip()}")
        return parse(data, source=f"Airflow Variable {AIRFLOW_VARIABLE}")
    return parse(yaml.safe_load(DEFAULT_CONFIG_YAML), source="embedded default")


def load_file(path: str | os.PathLike, source: str | None = None) -> PipelineSettings:
    source = source or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"pipeline config {source}: cannot read the file: {exc}") from None
    return parse(_parse_yaml(text, source), source=source)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"pipeline config {source}: not valid YAML: {exc}") from None


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validate(data: Any, source: str) -> None:
    """JSON-Schema validation with the offending key in the message; all errors, not just the first."""
    import jsonschema

    if not isinstance(data, dict):
        raise ConfigError(f"pipeline config {source}: must be a mapping of settings, not {type(data).__name__}")
    validator = jsonschema.Draft202012Validator(CONFIG_SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{_key_path(e.absolute_path)}: {e.message}" for e in errors]
        raise ConfigError(f"pipeline config {source} is invalid:\n  " + "\n  ".join(lines))


def parse(data: Any, source: str) -> PipelineSettings:
    validate(data, source)
    local_data = data.get("local", {})
    workdir = Path(local_data.get("workdir") or REPO_ROOT)
    if not workdir.is_absolute():
        workdir = (REPO_ROOT / workdir).resolve()
    artifact_root = _absolute_uri(data.get("artifact_root", "./artifacts"), workdir, source)
    schemes = tuple(data.get("allowed_uri_schemes", ["file"]))
    runtime = data.get("runtime", "local")
    if runtime == "kubernetes" and artifact_root.startswith("file://"):
        raise ConfigError(
            f"pipeline config {source}: artifact_root={artifact_root!r}: the kubernetes runtime needs shared "
            "object storage (s3://, gs://, abfs://): each stage runs in its own pod"
        )
    base_models = {
        name: uri.replace("{artifact_root}", artifact_root) for name, uri in data.get("base_models", {}).items()
    }

    k = data.get("kubernetes", {})
    image = k.get("image", {})
    pools = {p: NodePool() for p in NODE_POOLS}
    for name, pool in k.get("node_pools", {}).items():
        pools[name] = NodePool(
            node_selector=dict(pool.get("node_selector", {})),
            tolerations=tuple(Toleration(**t) for t in pool.get("tolerations", [])),
            priority_class=pool.get("priority_class", ""),
        )
    defaults = KubernetesSettings()
    kubernetes = KubernetesSettings(
        namespace=k.get("namespace", defaults.namespace),
        service_account=k.get("service_account", defaults.service_account),
        kubernetes_conn_id=k.get("kubernetes_conn_id"),
        in_cluster=k.get("in_cluster", defaults.in_cluster),
        image_repository=image.get("repository", defaults.image_repository),
        image_tag=str(image.get("tag", defaults.image_tag)),
        image_digest=image.get("digest", ""),
        image_pull_policy=image.get("pull_policy", defaults.image_pull_policy),
        run_as_user=k.get("run_as_user", defaults.run_as_user),
        scratch_size=k.get("scratch_size", defaults.scratch_size),
        startup_timeout_seconds=k.get("startup_timeout_seconds", defaults.startup_timeout_seconds),
        termination_grace_seconds=k.get("termination_grace_seconds", defaults.termination_grace_seconds),
        gpu_resource=k.get("gpu_resource", defaults.gpu_resource),
        node_pools=pools,
        labels=dict(k.get("labels", {})),
    )
    if runtime == "kubernetes" and not pools["gpu-spot"].node_selector:
        raise ConfigError(
            f"pipeline config {source}: kubernetes.node_pools.gpu-spot.node_selector is empty: GPU stages "
            "would land on any node; name the cloud's spot label (see values/<cloud>/pipeline.yaml)"
        )

    d = data.get("docker", {})
    docker_defaults = DockerSettings()
    docker = DockerSettings(
        url=d.get("url", docker_defaults.url),
        image_repository=d.get("image", {}).get("repository", docker_defaults.image_repository),
        image_tag=str(d.get("image", {}).get("tag", docker_defaults.image_tag)),
        run_as_user=d.get("run_as_user"),
        mounts=tuple(d.get("mounts", [])),
        gpus=d.get("gpus", False),
    )
    if runtime == "docker" and not artifact_root.startswith("file://"):
        raise ConfigError(
            f"pipeline config {source}: artifact_root={artifact_root!r}: the docker runtime mounts a local "
            "artifact root into each container; use a path (or file://)"
        )

    n = data.get("notifications", {})
    smtp = n.get("smtp")
    slack = n.get("slack")
    return PipelineSettings(
        source=source,
        runtime=runtime,
        artifact_root=artifact_root,
        owner=data.get("owner", "genai-platform"),
        allowed_uri_schemes=schemes,
        base_models=base_models,
        retries=data.get("retries", 1 if runtime == "local" else 3),
        retry_delay_seconds=data.get("retry_delay_seconds", 10 if runtime == "local" else 60),
        max_retry_delay_seconds=data.get("max_retry_delay_seconds", 1800),
        max_shards=data.get("max_shards", 16),
        stages={name: StageOverride(**o) for name, o in data.get("stages", {}).items()},
        local=LocalSettings(
            python=local_data.get("python", ""),
            workdir=workdir,
            kill_grace_seconds=local_data.get("kill_grace_seconds", 30),
        ),
        kubernetes=kubernetes,
        docker=docker,
        notifications=NotificationSettings(
            on_failure=n.get("on_failure", True),
            on_success=n.get("on_success", False),
            smtp=SmtpSettings(conn_id=smtp["conn_id"], to=tuple(smtp["to"]), from_email=smtp.get("from_email"))
            if smtp
            else None,
            slack=SlackSettings(conn_id=slack["conn_id"], channel=slack["channel"]) if slack else None,
        ),
    )


def _absolute_uri(value: str, base: Path, source: str) -> str:
    """A plain path becomes an absolute file:// URI (relative to the local workdir); schemes are checked."""
    match = re.match(r"^([a-z][a-z0-9+.-]*)://", value)
    if not match:
        return "file://" + str((base / value).resolve())
    if match.group(1) not in URI_SCHEMES:
        raise ConfigError(
            f"pipeline config {source}: artifact_root={value!r} uses scheme {match.group(1)!r}; "
            f"allowed: {', '.join(URI_SCHEMES)}"
        )
    return value.rstrip("/")
