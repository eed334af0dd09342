"""Platform configuration: which runtime runs the stages, where artifacts live, images, node pools, alerts.

One YAML document configures every DAG in this folder. It is found, in this order, at:

1. the path in the environment variable ``GENAI_PIPELINE_CONFIG``;
2. the Airflow Variable ``genai_pipeline_config``: the YAML document itself, or a path to it
   (the Helm chart sets it through ``AIRFLOW_VAR_GENAI_PIPELINE_CONFIG``, which costs no database call);
3. the embedded default: the ``local`` runtime with artifacts under ``<repo>/artifacts``.

The file is validated when it is loaded; an error names the key (``kubernetes.node_pools.gpu-spot...``).
:class:`PipelineSettings` (pydantic, unknown keys forbidden) is the one source of every key's type, range
and default: ``python -m genai_dags.settings reference`` prints the table in ``dags/README.md`` and
``python -m genai_dags.settings schema`` its JSON Schema.
The commented reference is ``values/local/pipeline.yaml`` (and ``dags/README.md``); one file per target
cloud lives beside it. Platform settings never come from a run conf: a run conf cannot choose the image,
the command, the service account, node selectors or privileges.
"""

from __future__ import annotations

import difflib
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError, field_validator

from genai_dags.stage_specs import STAGE_NAMES, STAGES, StageSpec

ENV_VAR = "GENAI_PIPELINE_CONFIG"
AIRFLOW_VARIABLE = "genai_pipeline_config"
REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_POOLS = ("cpu", "gpu-spot", "gpu-on-demand")
URI_SCHEMES = ("file", "s3", "gs", "abfs")

Quantity = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")]
LabelKey = Annotated[
    str, StringConstraints(pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
]
ObjectName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")]
PriorityClassName = Annotated[str, StringConstraints(pattern=r"^$|^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")]
ImageTag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")]
Email = Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]
NodePoolName = Literal[NODE_POOLS]
StageName = Literal[STAGE_NAMES]


class ConfigError(ValueError):
    """The pipeline configuration is invalid; the message names the source and the key."""


class Section(BaseModel):
    """A section of the file: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Toleration(Section):
    key: LabelKey
    operator: Literal["Equal", "Exists"]
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class NodePool(Section):
    node_selector: dict[LabelKey, str] = Field(default_factory=dict, description="labels a pod of this pool selects")
    tolerations: tuple[Toleration, ...] = Field((), description="taints of the pool's nodes that its pods tolerate")
    priority_class: PriorityClassName = Field("", description="PriorityClass of the pool's pods (empty: none)")
    # The plan task fits train_lora's estimated peak memory into this before a GPU node scales up.
    gpu_memory_gib: float | None = Field(
        None, gt=0, le=1024, description="memory of one GPU of the pool in GiB (none: no memory plan)"
    )
    # A pod's GPUs are on one node: a stage that asks for more than a node has would never schedule.
    gpus_per_node: int | None = Field(
        None, ge=1, le=16, description="GPUs of one node of the pool, the most a stage may request (none: unchecked)"
    )


class StageOverride(Section):
    cpu: Quantity | None = Field(None, description="CPU request (kubernetes)")
    memory: Quantity | None = Field(None, description="memory request and limit (kubernetes)")
    gpu: int | None = Field(None, ge=0, le=16, description="GPUs; 0 moves a GPU stage to the cpu pool")
    timeout_minutes: int | None = Field(None, ge=1, le=7 * 24 * 60, description="time limit (every runtime)")
    image: NonEmpty | None = Field(None, description="full image reference, over the repository's")
    # Training and inference share gpu-spot; a stage's own class lets inference preempt training.
    priority_class: PriorityClassName | None = Field(None, description="PriorityClass, over the node pool's")


class LocalSettings(Section):
    python: str = Field("", description="interpreter that runs the stages (empty: the one running Airflow)")
    workdir: Path = Field(
        Path("."), validate_default=True, description="where `stages` is importable; relative to the repository root"
    )
    kill_grace_seconds: int = Field(30, ge=1, le=3600, description="SIGTERM -> SIGKILL when a task is killed")

    @field_validator("workdir", mode="before")
    @classmethod
    def _absolute(cls, value: Any) -> Any:
        if value is None:
            value = "."
        return (REPO_ROOT / value).resolve() if isinstance(value, str | Path) else value


class KubernetesImage(Section):
    model_config = ConfigDict(coerce_numbers_to_str=True)  # `tag: 2` in YAML is the tag "2"

    repository: NonEmpty = Field("ghcr.io/genai-pipelines/stages", description="stage images: <repository>/<image>")
    tag: ImageTag = Field("0.1.0", description="stage images: <repository>/<image>:<tag> (`make images-list`)")
    digest: Annotated[str, StringConstraints(pattern=r"^$|^sha256:[a-f0-9]{64}$")] = Field(
        "", description="pins the shared stage base <repository>@<digest> for every stage"
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="imagePullPolicy")


class KubernetesSettings(Section):
    namespace: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")] = Field(
        "genai-stages", description="where stage pods run (the chart's stage namespace)"
    )
    service_account: ObjectName = Field("genai-stage-runner", description="the stage pods' service account")
    kubernetes_conn_id: str | None = Field(None, description="Airflow connection to the cluster (none: in-cluster)")
    in_cluster: bool = Field(True, description="Airflow runs in the stages' cluster")
    image: KubernetesImage = Field(default_factory=KubernetesImage)
    run_as_user: int = Field(10001, ge=1, description="pod uid (the images' own user)")
    scratch_size: Quantity = Field("20Gi", description="size of the /tmp emptyDir")
    # GPU node pools usually scale from zero: node provisioning, driver install and a multi-GB image pull.
    startup_timeout_seconds: int = Field(
        1200, ge=60, description="wait for quota room, scheduling and startup (GPU scale-up)"
    )
    # Time between SIGTERM and SIGKILL: the trainer saves a checkpoint in it (spot notices give 30-120 s).
    termination_grace_seconds: int = Field(120, ge=1, le=3600, description="SIGTERM -> SIGKILL (checkpoint)")
    gpu_resource: LabelKey = Field("nvidia.com/gpu", description="the extended resource GPU stages request")
    # NCCL's intra-node transport keeps its buffers in /dev/shm (64 MiB by default in a container).
    shm_gib_per_gpu: int = Field(2, ge=1, le=64, description="GiB of /dev/shm (a memory emptyDir) per GPU")
    gpu_env: dict[Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]*$")], str] = Field(
        default_factory=lambda: {"NCCL_DEBUG": "WARN"},
        description="environment of GPU stage pods: NCCL settings of the cloud's network (EFA, TCPX, InfiniBand)",
    )
    node_pools: dict[NodePoolName, NodePool] = Field(
        default_factory=lambda: {p: NodePool() for p in NODE_POOLS},
        description="each pool (`cpu`, `gpu-spot`, `gpu-on-demand`): what its pods select and tolerate, "
        "the memory of its GPUs",
    )
    labels: dict[LabelKey, str] = Field(default_factory=dict, description="extra pod labels")
    # A shared file system (NFS, Filestore, EFS, Azure Files, a node's disk on a one-node cluster) instead
    # of object storage: the claim is mounted in every stage pod at the artifact root's own path.
    artifact_volume_claim: ObjectName | None = Field(
        None, description="ReadWriteMany PVC mounted at `artifact_root` (then a path); none: object storage"
    )

    @field_validator("node_pools")
    @classmethod
    def _every_pool(cls, pools: dict[str, NodePool]) -> dict[str, NodePool]:
        return {p: pools.get(p, NodePool()) for p in NODE_POOLS}


class DockerImage(Section):
    model_config = ConfigDict(coerce_numbers_to_str=True)

    repository: NonEmpty = Field("ghcr.io/genai-pipelines/stages", description="stage images: <repository>/<image>")
    tag: ImageTag = Field("latest", description="as `make build-images` tags them")


class DockerSettings(Section):
    """The docker runtime: each stage in a local container from its image (``make build-images``)."""

    url: NonEmpty = Field("unix://var/run/docker.sock", description="the Docker engine")
    image: DockerImage = Field(default_factory=DockerImage)
    run_as_user: int | None = Field(
        None, ge=1, description="container uid (none: the uid running Airflow, 10001 when that is root)"
    )
    mounts: tuple[Annotated[str, StringConstraints(pattern=r"^/")], ...] = Field(
        (), description="host paths (input data) mounted read-only at the same path"
    )
    gpus: bool = Field(False, description="give GPU stages the host's GPUs (NVIDIA container toolkit)")


class SmtpSettings(Section):
    conn_id: NonEmpty
    to: tuple[Email, ...] = Field(min_length=1)
    from_email: Email | None = None


class SlackSettings(Section):
    conn_id: NonEmpty
    channel: NonEmpty


class NotificationSettings(Section):
    on_failure: bool = Field(True, description="notify when a run fails (only when a channel is set)")
    on_success: bool = Field(False, description="notify when a run succeeds")
    smtp: SmtpSettings | None = Field(None, description="`conn_id`, `to`, `from_email` (SmtpNotifier)")
    slack: SlackSettings | None = Field(None, description="`conn_id`, `channel` (SlackNotifier)")


CRON_FIELD = re.compile(r"^[0-9*/,\-A-Za-z?LW#]+$")


class MonitorSettings(Section):
    """``genai_monitor``: which model it watches, where new batches land, and what counts as drift."""

    schedule: str | None = Field(
        None, description="cron expression or preset (`@daily`) of genai_monitor; none: triggered only"
    )
    model_name: str = Field("", description="the model watched when the conf names none (its `champion`)")
    data_prefix: str = Field(
        "", description="URI under which new batches land (a file or folder each); the newest one is measured"
    )
    max_perplexity_ratio: float = Field(
        1.25,
        gt=1,
        le=1000,
        description="drifted when the champion's perplexity on the batch is above this times its held-out perplexity",
    )
    max_token_divergence: float = Field(
        0.1,
        gt=0,
        le=1,
        description="drifted when the Jensen-Shannon divergence (base 2) of unigram token frequencies is above this",
    )

    @field_validator("schedule")
    @classmethod
    def _cron_or_preset(cls, value: str | None) -> str | None:
        presets = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly")
        fields = (value or "").split()
        if value is None or value in presets or (len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields)):
            return value
        raise ValueError(f"{value!r} is neither a preset ({', '.join(presets)}) nor a 5-field cron expression")


class PoolPrice(Section):
    on_demand: float | None = Field(None, ge=0, description="price per unit-hour on demand")
    spot: float | None = Field(None, ge=0, description="price per unit-hour on spot capacity")


class CostSettings(Section):
    """What runs cost: every stage attempt's wall time times its node pool's price (``stages.core.costs``)."""

    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = Field(
        "USD", description="ISO 4217 code of the prices"
    )
    # A GPU pod's CPUs and memory come with its GPUs (the node's price over its GPUs); a CPU pod is billed
    # for the vCPUs it requests (the machine type's price over its vCPUs, memory included).
    prices: dict[NodePoolName, PoolPrice] = Field(
        default_factory=dict,
        description="per pool, the price per hour of one billed unit (a GPU on the GPU pools, a requested vCPU "
        "on `cpu`) on demand and on spot capacity; none: runs are timed, not priced",
    )
    train_tokens_per_second: dict[NodePoolName, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="train_lora's throughput on each pool (tokens/s of its whole pod), for the plan's estimate",
    )


class MetricsSettings(Section):
    """Stage metrics people graph (``stages.core.telemetry``): pushed only where an endpoint is set."""

    # Passed to every runtime's stages as STAGE_METRICS_PUSHGATEWAY; a push that fails never fails a stage.
    pushgateway_url: Annotated[str, StringConstraints(pattern=r"^$|^https?://[^\s/]+(/\S*)?$")] = Field(
        "", description="Prometheus Pushgateway the stages push their metrics to (empty: nothing is sent)"
    )


class MlflowSettings(Section):
    """MLflow as a second model registry beside the artifact root's (``genai_dags/mlflow_registry.py``)."""

    # Credentials never sit in the config (it is a ConfigMap, an Airflow Variable, a file in git): the client
    # reads MLflow's standard MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN.
    tracking_uri: str = Field(
        "",
        description="MLflow tracking server (`http(s)://host[:port]`) in which promote also registers each "
        "published version and sets its aliases (empty: off); credentials come from MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in Airflow's environment",
    )
    experiment: NonEmpty = Field(
        "genai-finetune",
        description="MLflow experiment of the runs that hold each registered version's lineage and metrics",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _http_without_credentials(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value:
            return value
        parts = urlsplit(value)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or re.search(r"\s", value):
            raise ValueError("must be an http:// or https:// URL of the MLflow tracking server")
        if "@" in parts.netloc:
            raise ValueError(
                "holds credentials (user:password@): give them in Airflow's environment as "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), never in the config"
            )
        return value


class RegistrySettings(Section):
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)


class ResolvedStage(BaseModel):
    """A stage spec with the platform's per-stage overrides applied: what a runtime needs to run it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    spec: StageSpec
    cpu: str
    memory: str
    gpu: int
    timeout: timedelta
    image: str
    priority_class: str = ""  # empty: the node pool's

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def uses_gpu(self) -> bool:
        return self.gpu > 0

    @property
    def node_pool(self) -> str:
        """Where the pod runs: the GPU request decides (a platform may run evaluate on CPUs with gpu: 0)."""
        return "gpu-spot" if self.uses_gpu else "cpu"


class PipelineSettings(BaseModel):
    """The whole platform configuration: the single source of its defaults, validation and JSON Schema."""

    # Not frozen: validation resolves artifact_root and base_models below; nothing changes them afterwards.
    model_config = ConfigDict(extra="forbid")

    runtime: Literal["local", "kubernetes", "docker"] = Field(
        "local", description="`local` (subprocesses), `kubernetes` (pods) or `docker` (local containers)"
    )
    artifact_root: NonEmpty = Field(
        "./artifacts",
        description="URI of every run's artifacts; plain paths are relative to `local.workdir`; "
        "`kubernetes` needs `s3://`, `gs://`, `abfs://` or `kubernetes.artifact_volume_claim`",
    )
    owner: NonEmpty = Field("genai-platform", description="DAG owner")
    allowed_uri_schemes: tuple[Literal[URI_SCHEMES], ...] = Field(
        ("file",),
        min_length=1,
        description="schemes a run conf may use for data URIs (`file` also allows plain paths with a `/`)",
    )
    base_models: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")], NonEmpty] = Field(
        default_factory=dict,
        description="names a conf may give as `base_model` -> URI or hub id; `{artifact_root}` is substituted",
    )
    # Spot capacity is reclaimed at any time and the trainer resumes from its checkpoint: retry generously.
    retries: int = Field(3, ge=0, le=10, description="task retries, with exponential backoff")
    retry_delay_seconds: int = Field(60, ge=1, description="first retry delay")
    max_retry_delay_seconds: int = Field(1800, ge=1, description="longest retry delay")
    max_shards: int = Field(16, ge=1, le=1024, description="cap on the fan-out of batch inference and tokenization")
    # A shard task holds its slice's documents and tokens: about 8 bytes of memory per byte of JSONL measured
    # (bench/bench_tokenize_sharded.py), so 256 MiB slices stay near 2 GiB, well inside tokenize's 8Gi.
    tokenize_shard_bytes: int = Field(
        256 << 20,
        ge=1 << 20,
        description="input bytes per tokenize task when a run conf leaves `tokenize_shards` at 0 (genai_finetune)",
    )
    stages: dict[StageName, StageOverride] = Field(
        default_factory=dict, description="per-stage overrides of resources, time limit, image, priority class"
    )
    local: LocalSettings = Field(default_factory=LocalSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    docker: DockerSettings = Field(default_factory=DockerSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    costs: CostSettings = Field(default_factory=CostSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    _source: str = PrivateAttr("embedded default")

    @property
    def source(self) -> str:
        """Where the settings came from (a path, the Airflow Variable, the embedded default), for messages."""
        return self._source

    def image_for(self, stage: str) -> str:
        """The image of one stage: a per-stage override, else ``<repository>/<image>:<tag>`` (images/).

        A digest (kubernetes) pins the shared stage base ``<repository>@<digest>`` instead, which runs every stage.
        """
        override = self.stages.get(stage)
        if override and override.image:
            return override.image
        if self.runtime == "docker":
            return f"{self.docker.image.repository}/{STAGES[stage].image}:{self.docker.image.tag}"
        image = self.kubernetes.image
        if image.digest:
            return f"{image.repository}@{image.digest}"
        return f"{image.repository}/{STAGES[stage].image}:{image.tag}"

    def stage(self, name: str) -> ResolvedStage:
        """The stage's spec with this platform's overrides applied."""
        spec = STAGES[name]
        o = self.stages.get(name) or StageOverride()
        return ResolvedStage(
            spec=spec,
            cpu=o.cpu or spec.cpu,
            memory=o.memory or spec.memory,
            gpu=spec.gpu if o.gpu is None else o.gpu,
            timeout=timedelta(minutes=o.timeout_minutes) if o.timeout_minutes else spec.timeout,
            image=self.image_for(name),
            priority_class=o.priority_class or "",
        )

    def stage_resources(self, name: str, capacity: str = "") -> dict[str, Any]:
        """What an attempt of the stage runs with and is priced at: ``STAGE_RESOURCES`` (``stages.core.costs``).

        ``capacity="on-demand"`` is a GPU stage's last try, on ``gpu-on-demand``. The local and docker
        runtimes have no node pools: their attempts are priced as the stage's pool on a cluster would be.
        """
        stage = self.stage(name)
        pool = "gpu-on-demand" if stage.uses_gpu and capacity == "on-demand" else stage.node_pool
        capacity = "spot" if pool == "gpu-spot" else "on-demand"
        price = self.costs.prices.get(pool)
        return {
            "runtime": self.runtime,
            "node_pool": pool,
            "capacity": capacity,
            "cpu": stage.cpu,
            "memory": stage.memory,
            "gpu": stage.gpu,
            "unit": "gpu" if stage.uses_gpu else "vcpu",
            "units": stage.gpu if stage.uses_gpu else cpu_cores(stage.cpu),
            "unit_price_per_hour": (price.spot if capacity == "spot" else price.on_demand) if price else None,
            "on_demand_unit_price_per_hour": price.on_demand if price else None,
            "currency": self.costs.currency if price else None,
        }


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity in cores: ``"4"`` -> 4.0, ``"500m"`` -> 0.5."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


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


def parse(data: Any, source: str) -> PipelineSettings:
    """Validate a parsed YAML document, resolve its paths and check what one key alone cannot say."""
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline config {source}: must be a mapping of settings, not {type(data).__name__}")
    try:
        settings = PipelineSettings.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(error) for error in exc.errors()]
        raise ConfigError(f"pipeline config {source} is invalid:\n  " + "\n  ".join(lines)) from None
    settings._source = source
    try:
        settings.artifact_root = _absolute_uri(settings.artifact_root, settings.local.workdir)
    except ValueError as exc:
        raise ConfigError(f"pipeline config {source}: {exc}") from None
    settings.base_models = {
        name: uri.replace("{artifact_root}", settings.artifact_root) for name, uri in settings.base_models.items()
    }
    problem = _runtime_problem(settings) or _price_problem(settings) or _registry_problem(settings)
    if problem:
        raise ConfigError(f"pipeline config {source}: {problem}")
    return settings


def _runtime_problem(s: PipelineSettings) -> str | None:
    """What the chosen runtime cannot work with, in one sentence naming the key; None when all is well."""
    claim = s.kubernetes.artifact_volume_claim
    if s.runtime == "kubernetes" and s.artifact_root.startswith("file://") and not claim:
        return (
            f"artifact_root={s.artifact_root!r}: the kubernetes runtime needs shared object storage "
            "(s3://, gs://, abfs://) or a shared volume (kubernetes.artifact_volume_claim): each stage "
            "runs in its own pod"
        )
    if s.runtime == "kubernetes" and claim and not s.artifact_root.startswith("file://"):
        return (
            f"kubernetes.artifact_volume_claim={claim!r} mounts a volume at artifact_root's path, but "
            f"artifact_root={s.artifact_root!r} is object storage: remove one of the two"
        )
    if s.runtime == "kubernetes" and not s.kubernetes.node_pools["gpu-spot"].node_selector:
        return (
            "kubernetes.node_pools.gpu-spot.node_selector is empty: GPU stages would land on any node; "
            "name the cloud's spot label (see values/<cloud>/pipeline.yaml)"
        )
    if s.runtime == "kubernetes":
        for name in STAGES:
            gpus = s.stage(name).gpu
            for pool in ("gpu-spot", "gpu-on-demand"):
                per_node = s.kubernetes.node_pools[pool].gpus_per_node
                if gpus and per_node is not None and gpus > per_node:
                    return (
                        f"stages.{name}.gpu={gpus} is more than kubernetes.node_pools.{pool}.gpus_per_node="
                        f"{per_node}: a pod's GPUs are on one node, so it would never schedule"
                    )
    if s.runtime == "docker" and not s.artifact_root.startswith("file://"):
        return (
            f"artifact_root={s.artifact_root!r}: the docker runtime mounts a local artifact root into each "
            "container; use a path (or file://)"
        )
    return None


def _price_problem(s: PipelineSettings) -> str | None:
    """A price table that leaves out a price some attempt would need; None without a table (time only)."""
    prices = s.costs.prices
    if not prices:
        return None
    gpu = any(s.stage(name).uses_gpu for name in STAGES)
    cpu = any(not s.stage(name).uses_gpu for name in STAGES)
    needed = [("cpu", "on_demand", "CPU stages run on the cpu pool")] if cpu else []
    if gpu:
        needed += [
            ("gpu-spot", "spot", "GPU stages run on spot capacity of gpu-spot"),
            ("gpu-spot", "on_demand", "spot attempts are compared with the same hours on demand"),
            ("gpu-on-demand", "on_demand", "a GPU stage's last try runs on gpu-on-demand"),
        ]
    for pool, kind, why in needed:
        if getattr(prices.get(pool) or PoolPrice(), kind) is None:
            return (
                f"costs.prices.{pool}.{kind} is missing: {why}; give its price per "
                f"{'vCPU' if pool == 'cpu' else 'GPU'}-hour (or remove costs.prices to time runs without pricing them)"
            )
    return None


def _registry_problem(s: PipelineSettings) -> str | None:
    """MLflow registers a version by its adapter's URI, and its server refuses a local path as a version's source."""
    if s.registry.mlflow.tracking_uri and s.artifact_root.startswith("file://"):
        return (
            f"registry.mlflow.tracking_uri is set, but artifact_root={s.artifact_root!r} is a local path: MLflow "
            "registers a version by its adapter's URI and refuses a local path as a model version's source; use "
            "object storage (s3://, gs://, abfs://) or leave registry.mlflow.tracking_uri empty"
        )
    return None


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _all_keys(model: type[BaseModel] = PipelineSettings) -> set[str]:
    keys = set(model.model_fields)
    for field in model.model_fields.values():
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if _is_model(arg):
                keys |= _all_keys(arg)
    return keys


_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def _describe(error: dict[str, Any]) -> str:
    """One line per problem: the key's dotted path, what is wrong, and the value given (shortened)."""
    loc = tuple(p for p in error["loc"] if p not in ("[key]",))
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), sorted(_all_keys()), n=1)
        return f"{_key_path(loc)}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    value = error.get("input")
    text = _USERINFO.sub("***@", str(value))  # a URL's user:password@ is never echoed back into a log
    shown = "" if isinstance(value, dict) else f" (got {text[:80]!r})"
    return f"{_key_path(loc)}: {error['msg']}{shown}"


def _absolute_uri(value: str, base: Path) -> str:
    """A plain path becomes an absolute file:// URI (relative to the local workdir); schemes are checked."""
    match = re.match(r"^([a-z][a-z0-9+.-]*)://", value)
    if not match:
        return "file://" + str((base / value).resolve())
    if match.group(1) not in URI_SCHEMES:
        raise ValueError(f"artifact_root={value!r} uses scheme {match.group(1)!r}; allowed: {', '.join(URI_SCHEMES)}")
    return value.rstrip("/")


# ---- The reference documentation, generated from the model (dags/README.md holds its output) ----


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`[{', '.join(map(str, value))}]`"
    return f"`{value}`"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = field.annotation
        args = getattr(field.annotation, "__args__", ())
        if _is_model(nested):
            rows += _rows(nested, f"{key}.")
            continue
        if getattr(field.annotation, "__origin__", None) is dict and _is_model(args[-1]):
            key = f"{key}.<{'pool' if args[0] is NodePoolName else 'stage'}>"
            description = field.description or ""
            fields = ", ".join(f"`{n}`" for n in args[-1].model_fields)
            rows.append(f"| `{key}` | - | {description} ({fields}) |")
            continue
        rows.append(f"| `{key}` | {_default_text(field)} | {field.description or ''} |")
    return rows


def reference() -> str:
    """The platform config's keys, defaults and meanings as a Markdown table."""
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *_rows(PipelineSettings, "")]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m genai_dags.settings reference | schema``: the Markdown reference or the JSON Schema."""
    import json
    import sys

    what = (argv if argv is not None else sys.argv[1:]) or ["reference"]
    if what[0] == "schema":
        print(json.dumps(PipelineSettings.model_json_schema(), indent=2))
    else:
        print(reference(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
