"""MLflow as a second model registry, kept in step with the artifact root's by promotion (off unless configured).

    registry:
      mlflow:
        tracking_uri: http://mlflow.mlflow.svc.cluster.local:5000

Credentials come from Airflow's environment, never from the config: MLflow's own ``MLFLOW_TRACKING_USERNAME``
and ``MLFLOW_TRACKING_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``. The artifact root stays the registry of
record (``genai_dags/registry.py``): it decides, MLflow follows. For each version that promotion sees, MLflow
gets:

- a registered model named like ours (``folio-lora``);
- a run in the experiment ``registry.mlflow.experiment``, named after the version, with the version's
  ``lineage.json`` as params (run id, base model, each stage's cache key, code and inputs) and its
  ``evaluation/metrics.json`` as metrics;
- a model version linked to that run whose source is the published adapter
  (``<artifact_root>/models/<name>/<version>/adapter``), tagged ``genai.version``, ``genai.run_id``,
  ``genai.base_model``, ``genai.<stage>.cache_key`` and ``genai.<stage>.code``, and ``genai.decision`` once
  promotion decided;
- the alias (``champion``) set with MLflow's alias API on the model version of the version ours points at.

The order keeps the artifact root consistent when MLflow is down or refuses ("publish not half done"):

1. register the version in MLflow; a version already tagged ``genai.version=<version>`` is found, not
   registered again, so a retry adds nothing;
2. decide and move our alias (its create-only write settles races, ``registry.move_alias``);
3. set MLflow's alias where ours points now, reading ours again after the write until it stood still.

A down MLflow fails step 1, before anything of ours moved and before any decision was written; the error is
one line naming the tracking URI, and Airflow retries the task. HTTP calls retry briefly (unless MLflow's
``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``_BACKOFF_FACTOR`` and ``_TIMEOUT`` say otherwise), so that a down server
fails the attempt within seconds and Airflow's retries, not the client's, do the waiting. A failure at step 3
leaves our alias moved and MLflow's behind: the retry finds ours already there (``already``) and does step 3
again, so the two converge. A version published before MLflow was configured is registered when an alias
first points at it (a rollback, for instance).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec

from genai_dags import registry

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from genai_dags.settings import PipelineSettings

# What a promote attempt waits for a server that does not answer, unless the environment says otherwise.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
ADAPTER = "adapter"  # the published version's adapter folder (stages.publish)
VERSION_TAG = "genai.version"
MAX_PARAMS_PER_CALL = 100  # MLflow's limit on one log_batch
MAX_PARAM_LENGTH = 6000
_RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)  # MLflow's own: `latest`, `v<n>`


class MlflowRegistryError(RuntimeError):
    """MLflow did not do what promotion asked; one line that names the tracking URI and never a credential."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable  # the server down, failing (5xx) or busy (429), not a refusal (4xx)


def from_settings(settings: PipelineSettings) -> MlflowRegistry | None:
    """The configured MLflow registry, or None when ``registry.mlflow.tracking_uri`` is empty."""
    mlflow = settings.registry.mlflow
    return MlflowRegistry(mlflow.tracking_uri, mlflow.experiment) if mlflow.tracking_uri else None


def check_alias(alias: str) -> str:
    """MLflow reserves ``latest`` and ``v<n>``: refused before anything moves, not after ours did."""
    registry.check_alias(alias)
    if _RESERVED_ALIAS.fullmatch(alias):
        raise registry.RegistryError(f"alias={alias!r} is reserved by MLflow (latest, v<number>): choose another")
    return alias


# ---------------------------------------------------------------------------------------------
# The two ways an alias moves, with MLflow in step when one is configured


def promote(
    root: str,
    name: str,
    version: str,
    evaluation: dict[str, Any],
    run_id: str,
    mlflow: MlflowRegistry | None,
    alias: str = registry.CHAMPION,
) -> dict[str, Any]:
    """``registry.promotion_decision``, with the version registered in MLflow first and MLflow's alias after."""
    if mlflow is None:
        return registry.promotion_decision(root, name, version, evaluation, run_id, alias)
    number = mlflow.register(root, name, version)  # before anything of ours can move
    decision = registry.promotion_decision(root, name, version, evaluation, run_id, alias)
    mlflow.follow(root, name, alias)
    mlflow.tag_decision(name, number, decision)
    return decision


def move_by_hand(
    root: str, name: str, version: str, alias: str, reason: str, run_id: str, mlflow: MlflowRegistry | None
) -> dict[str, Any]:
    """``registry.move_by_hand`` (a rollback), with the version registered in MLflow first and its alias after."""
    if mlflow is None:
        return registry.move_by_hand(root, name, version, alias, reason, run_id)
    registry.check_published(root, name, version)
    check_alias(alias)
    number = mlflow.register(root, name, version)  # before anything of ours can move
    decision = registry.move_by_hand(root, name, version, alias, reason, run_id)
    mlflow.follow(root, name, alias)
    mlflow.tag_decision(name, number, decision)
    return decision


# ---------------------------------------------------------------------------------------------
# MLflow itself


@dataclass(frozen=True)
class MlflowRegistry:
    tracking_uri: str  # validated by the settings: http(s), no credentials in it
    experiment: str

    def register(self, root: str, name: str, version: str) -> str:
        """The MLflow version number of our published ``version``, registered (model, run, version) if new."""
        uri = registry.version_uri(root, name, version)
        source = f"{uri}/{ADAPTER}"
        lineage = _read_json(f"{uri}/lineage.json", {})
        metrics = _read_json(f"{uri}/evaluation/metrics.json", {})
        with self._client(f"registering {name} {version}") as client:
            # The same source, not only the same version name: two artifact roots may share one MLflow.
            found = client.search_model_versions(f"name = '{name}' and tags.`{VERSION_TAG}` = '{version}'")
            if numbers := [int(v.version) for v in found if v.source == source]:
                return str(min(numbers))
            self._ensure_model(client, name, registry.model_uri(root, name))
            run = self._run(client, name, version, uri, lineage, metrics)
            created = client.create_model_version(
                name,
                source,
                run_id=run,
                tags=version_tags(version, uri, lineage),
                description=f"{name} {version}, published at {uri}",
            )
            return str(created.version)

    def follow(self, root: str, name: str, alias: str) -> str | None:
        """Set MLflow's ``alias`` on the version ours points at; the MLflow version number, None when ours is unset."""
        for _ in range(10):
            ours = registry.read_alias(root, name, alias)
            if ours is None:
                return None
            number = self.register(root, name, ours.version)
            with self._client(f"setting {name}@{alias} to {ours.version}") as client:
                client.set_registered_model_alias(name, alias, number)
            again = registry.read_alias(root, name, alias)
            if again is not None and again.number == ours.number:  # no move since the read: MLflow is in step
                return number
        raise MlflowRegistryError(
            f"MLflow registry {self.tracking_uri}: {name}@{alias} kept moving while it was set; promote again",
            retryable=True,
        )

    def tag_decision(self, name: str, number: str, decision: dict[str, Any]) -> None:
        """What promotion concluded, on the model version (a retry's ``already`` keeps the first conclusion)."""
        if decision["decision"] == "already":
            return
        with self._client(f"tagging {name} version {number}") as client:
            client.set_model_version_tag(name, number, "genai.decision", decision["decision"])
            if decision.get("reason"):
                client.set_model_version_tag(name, number, "genai.decision_reason", decision["reason"][:5000])

    def alias_version(self, name: str, alias: str) -> str | None:
        """The MLflow version number MLflow's ``alias`` is on (None: unset), for reports and tests."""
        with self._client(f"reading {name}@{alias}") as client:
            from mlflow.exceptions import MlflowException

            try:
                return str(client.get_model_version_by_alias(name, alias).version)
            except MlflowException as exc:
                if exc.get_http_status_code() == 404:
                    return None
                raise

    def _ensure_model(self, client: MlflowClient, name: str, model_uri: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if exc.get_http_status_code() != 404:
                raise
            with contextlib.suppress(_AlreadyExists):  # another promotion created it meanwhile
                _create(client.create_registered_model, name, tags={"genai.model_uri": model_uri},
                        description=f"Mirrors the registry at {model_uri} (genai-pipelines)")  # fmt: skip

    def _run(
        self,
        client: MlflowClient,
        name: str,
        version: str,
        uri: str,
        lineage: dict[str, Any],
        metrics: dict[str, Any],
    ) -> str:
        """The finished run holding the version's lineage (params) and evaluation (metrics); a half-logged one is
        completed, not started again."""
        from mlflow.entities import Metric, Param, RunStatus

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            with contextlib.suppress(_AlreadyExists):
                _create(client.create_experiment, self.experiment)
            experiment = client.get_experiment_by_name(self.experiment)
        runs = client.search_runs(
            [experiment.experiment_id],
            f"tags.`genai.model_name` = '{name}' and tags.`{VERSION_TAG}` = '{version}'",
            max_results=100,
        )
        runs = [r for r in runs if r.data.tags.get("genai.version_uri") == uri]
        if runs and runs[0].info.status == RunStatus.to_string(RunStatus.FINISHED):
            return runs[0].info.run_id
        run = runs[0] if runs else None
        if run is None:
            tags = {"genai.model_name": name, VERSION_TAG: version, "genai.version_uri": uri}
            run = client.create_run(experiment.experiment_id, run_name=version, tags=tags)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in lineage_params(lineage).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_CALL):
            client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_CALL])
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in evaluation_metrics(metrics).items()])
        client.set_terminated(run_id)
        return run_id

    @contextlib.contextmanager
    def _client(self, doing: str) -> Iterator[MlflowClient]:
        """An MLflow client with short HTTP retries; its failures become one :class:`MlflowRegistryError` line."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        added = {k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        except MlflowException as exc:
            status = exc.get_http_status_code()
            raise MlflowRegistryError(
                f"MLflow registry {self.tracking_uri}: {doing} failed: {_cause(str(exc))}",
                retryable=status >= 500 or status == 429,
            ) from None
        finally:
            for key in added:
                os.environ.pop(key, None)


# ---------------------------------------------------------------------------------------------
# What a published version tells MLflow


def version_tags(version: str, uri: str, lineage: dict[str, Any]) -> dict[str, str]:
    """The model version's identity: ours, the run, the base model, each stage's cache key and code version."""
    tags = {
        VERSION_TAG: version,
        "genai.version_uri": uri,
        "genai.run_id": lineage.get("run_id"),
        "genai.base_model": lineage.get("base_model"),
        "genai.base_model_sha256": lineage.get("base_model_sha256"),
    }
    for stage, record in (lineage.get("stages") or {}).items():
        tags[f"genai.{stage}.cache_key"] = record.get("cache_key")
        tags[f"genai.{stage}.code"] = (record.get("code") or {}).get("source_sha256")
    return {k: str(v) for k, v in tags.items() if v is not None}


def lineage_params(lineage: dict[str, Any]) -> dict[str, str]:
    """``lineage.json`` flattened to MLflow params: ``stages.train_lora.cache_key`` -> its value."""
    return {key: value[:MAX_PARAM_LENGTH] for key, value in _flatten(lineage).items()}


def evaluation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The evaluation's numbers flattened to MLflow metrics: ``adapted.word_perplexity`` -> its value."""
    return {
        key: float(value)
        for key, value in _flatten(metrics, keep_numbers=True).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def _flatten(value: Any, prefix: str = "", keep_numbers: bool = False) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out |= _flatten(item, f"{prefix}{key}.", keep_numbers)
        return out
    key = prefix.rstrip(".")
    if value is None:
        return {}
    if keep_numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return {key: value}
    return {key: value if isinstance(value, str) else json.dumps(value)}


def _read_json(uri: str, default: dict[str, Any]) -> dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return default


class _AlreadyExists(Exception):
    pass


def _create(create: Any, *args: Any, **kwargs: Any) -> Any:
    """``create`` (a model, an experiment), with MLflow's RESOURCE_ALREADY_EXISTS as :class:`_AlreadyExists`."""
    from mlflow.exceptions import MlflowException

    try:
        return create(*args, **kwargs)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_ALREADY_EXISTS":
            raise _AlreadyExists from None
        raise


def _cause(message: str) -> str:
    """MLflow's message in one short line: the socket error when the server did not answer."""
    errno = re.search(r"\[Errno -?\d+\] [^\"')]+", message)
    if errno:
        return f"no answer ({errno.group(0)})"
    if "timed out" in message.lower():
        return "no answer (timed out)"
    return re.sub(r"\s+", " ", message).strip()[:300]
