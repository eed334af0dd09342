"""OpenLineage for the stage tasks: each task's events name the stage's real inputs and outputs as datasets.

Off unless an OpenLineage transport is configured for Airflow (``docs/lineage.md``), for example:

    AIRFLOW__OPENLINEAGE__TRANSPORT='{"type": "http", "url": "http://marquez:5000", "endpoint": "api/v1/lineage"}'

The provider's listener calls :class:`StageLineage`'s hooks when a stage task ends, on every runtime:

- COMPLETE: the inputs are what the stage's committed ``manifest.json`` lists (each with its content hash
  as the dataset version: what it read, even on a cache hit, defaults resolved), the output is its output
  folder (the manifest's output hash as its version); the ``genaiStage`` run facet carries the cache key,
  whether it was a cache hit, the code version, the image, the stage's metrics and, after publish, the
  model's name and version (``genai_dags.lineage_facets``);
- FAIL: the inputs named in the task's arguments (nothing was committed); the provider adds the error.

The manifest is read where the task runs (a small JSON file, through fsspec, like the ``plan`` task's
reads); when it cannot be read the event still names the output and the inputs from the arguments.
Nothing here can fail a stage: the provider runs the hooks after the task's state is decided and only
logs what they raise, and its HTTP transport only warns when the endpoint is down.

Namespaces and names follow the OpenLineage naming spec: a local path is ``file`` + the absolute path,
``s3://bucket/key`` is ``s3://bucket`` + ``key`` (likewise ``gs://``, ``abfs://container@account...``),
and a model hub id such as ``org/model`` is ``https://huggingface.co`` + ``org/model``.

Light on purpose: every operator module imports it at parse time; the provider and the OpenLineage
client are imported only when an event is built (they cost a third of a second).
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

log = logging.getLogger(__name__)

HUB_NAMESPACE = "https://huggingface.co"
# Run-conf values that mean "no such input" (batch_infer adapter_uri=none, publish predictions_uri=none).
NO_INPUT = frozenset({"", "none"})
# The upper bound of a manifest we read: it lists every output file with its hash.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def enabled() -> bool:
    """Whether this process sends OpenLineage events (the provider's own test: a transport is configured)."""
    try:
        from airflow.providers.openlineage import conf

        return not conf.is_disabled()
    except Exception as exc:  # not installed, or unreadable settings: lineage never fails a stage or a DAG import
        log.debug("lineage: off (%s)", exc)
        return False


def dataset_name(uri: str) -> tuple[str, str]:
    """``(namespace, name)`` of a URI, a local path or a model hub id, as the OpenLineage naming spec has them."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        if uri.startswith("/"):
            return "file", posixpath.normpath(uri)
        return HUB_NAMESPACE, uri.strip("/")  # a hub id: huggingface.co/<org>/<model>
    if scheme == "file":
        return "file", posixpath.normpath("/" + rest.lstrip("/"))
    authority, _, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:  # user:password@ never leaves here (stages refuse such URIs anyway)
        authority = host
    return f"{'gs' if scheme == 'gcs' else scheme}://{authority}", path.strip("/") or "/"


def _uri_arguments(arguments: Any) -> dict[str, str]:
    """The inputs named in the stage's ``key=value`` arguments: the ``*_uri`` settings and ``base_model``."""
    found = {}
    for argument in arguments or []:
        key, sep, value = str(argument).partition("=")
        if sep and (key.endswith("_uri") or key == "base_model") and value.strip().lower() not in NO_INPUT:
            found[key] = value
    return found


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The committed manifest at ``uri``, or None (logged) when it cannot be read: lineage never fails a task."""
    try:
        import fsspec

        with fsspec.open(uri, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(data)
        return manifest if isinstance(manifest, dict) else None
    except Exception as exc:
        log.warning("lineage: could not read %s (%s); the event names the arguments' inputs", uri, exc)
        return None


def _inputs(manifest: dict[str, Any], arguments: Any) -> list[tuple[str, str | None]]:
    """``[(URI or hub id, content hash)]``: the manifest's inputs when it has any, else the arguments'. An input
    the stage counted only in part (tokenize: a model's tokenizer, ``without`` its weights) has no version."""
    records = manifest.get("inputs")
    if not isinstance(records, dict):
        return [(uri, None) for uri in _uri_arguments(arguments).values()]
    found = []
    for record in records.values():
        if isinstance(record, dict) and record.get("uri"):
            found.append((record["uri"], None if record.get("without") else record.get("sha256")))
        elif isinstance(record, dict) and record.get("id"):
            found.append((record["id"], None))  # a hub id: its name is its identity
    return found


def _datasets(cls: type, uris: list[tuple[str, str | None]]) -> list[Any]:
    """OpenLineage datasets of ``cls`` (InputDataset, OutputDataset), one per name, versioned by content hash."""
    from openlineage.client.facet_v2 import dataset_version_dataset

    found: dict[tuple[str, str], Any] = {}
    for uri, sha256 in uris:
        namespace, name = dataset_name(uri)
        version = {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=sha256)}
        found.setdefault((namespace, name), cls(namespace=namespace, name=name, facets=version if sha256 else {}))
    return list(found.values())


def stage_lineage(stage: str, arguments: Any, result: dict[str, Any] | None, image: str | None = None) -> Any:
    """The ``OperatorLineage`` of one stage task: its datasets and the ``genaiStage`` run facet.

    ``result`` is the stage's result line (None when the task failed: then only the arguments are known).
    """
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.event_v2 import InputDataset, OutputDataset

    from genai_dags.lineage_facets import GenaiStageRunFacet

    done = result or {}
    manifest = (read_manifest(done["manifest_uri"]) if done.get("manifest_uri") else None) or {}
    code = manifest.get("code") if isinstance(manifest.get("code"), dict) else {}
    metrics = done.get("metrics") if isinstance(done.get("metrics"), dict) else None
    facet = GenaiStageRunFacet(
        stage=stage,
        cacheHit=None if result is None else bool(done.get("cache_hit")),
        cacheKey=manifest.get("cache_key"),
        codeVersion=code.get("package"),
        sourceSha256=code.get("source_sha256"),
        image=code.get("image") or image,
        manifestUri=done.get("manifest_uri"),
        metrics=metrics,
        publishedModel=_published_model(metrics),
    )
    outputs = [(done["output_uri"], manifest.get("outputs_sha256"))] if done.get("output_uri") else []
    return OperatorLineage(
        inputs=_datasets(InputDataset, _inputs(manifest, arguments)),
        outputs=_datasets(OutputDataset, outputs),
        run_facets={"genaiStage": facet},
    )


def _published_model(metrics: dict[str, Any] | None) -> dict[str, str] | None:
    if not metrics or not (metrics.get("model_name") and metrics.get("version")):
        return None
    return {k: str(metrics[k]) for k in ("model_name", "version", "uri") if metrics.get(k)}


class StageLineage:
    """The OpenLineage hooks of every stage operator (the provider's DefaultExtractor calls them).

    The operator keeps its stage's result in ``stage_result`` when it succeeds; the hooks run in the same
    process afterwards (the provider forks or starts a thread), so they need no XCom round trip.
    """

    stage: str
    arguments: Any
    stage_result: dict[str, Any] | None = None

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        return stage_lineage(self.stage, self.arguments, self.stage_result, getattr(self, "image", None))

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return stage_lineage(self.stage, self.arguments, None, getattr(self, "image", None))


def parent_run_environment(context: Any) -> dict[str, str]:
    """``OPENLINEAGE_PARENT_ID`` and ``OPENLINEAGE_ROOT_PARENT_ID`` of the task (``namespace/job/run id``, the
    convention of OpenLineage integrations), for the stage's process, pod or container: anything in it that
    emits lineage nests under the task's run. Empty when lineage is off. Never the transport: it may hold an
    API key, and stages get no secrets."""
    ti = context.get("ti") if context else None
    if ti is None or not enabled():
        return {}
    try:
        from airflow.providers.openlineage.plugins import macros

        return {
            "OPENLINEAGE_PARENT_ID": macros.lineage_parent_id(ti),
            "OPENLINEAGE_ROOT_PARENT_ID": macros.lineage_root_parent_id(ti),
        }
    except Exception as exc:  # lineage never fails a stage
        log.warning("lineage: no parent run for the stage's environment (%s)", exc)
        return {}


def without_operator_state(task: Any) -> Any:
    """Keep the operator's attributes out of its events even where ``[openlineage] include_full_task_info`` is on.

    That setting puts every attribute of the operator into the ``airflow`` run facet: a pod's ``env_vars``
    and the Pushgateway URL, which may carry a password. The provider's own per-task override turns it off
    for stage tasks (an admin's ``locked`` emission_policy rule would still win). Nothing to do when lineage
    is off: then the provider is not even imported.
    """
    if not enabled():
        return task
    from airflow.providers.openlineage.api.emission_policy import extend_global_openlineage_emission_policy

    return extend_global_openlineage_emission_policy(task, include_full_task_info=False)
