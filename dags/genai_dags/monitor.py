"""Drift monitoring: measure a new batch of data against what a model's champion was trained on.

``genai_monitor`` plans here, runs three stages, then decides:

    plan:      the champion (``<model_name>@champion``), its lineage and the conf it was trained with (both in
               its lineage.json), the newest batch
    tokenize:  the batch, tokenized the way the champion's data was (same base model, same settings)
    evaluate:  the champion scored on the batch's held-out part, as evaluate scored it on its own
    drift:     perplexity ratio and token divergence against the platform's thresholds, a report
    decide:    drifted -> an event on the ``genai_drift`` asset, whose extra holds the conf to retrain with
               (the champion's own conf, ``train_data_uri`` the batch); not drifted -> no event

``genai_retrain`` is scheduled on that asset and triggers ``genai_finetune`` with each event's conf, so a
drifted batch starts retraining without a person, and the new version must still beat the champion to be
promoted. Plain functions, no Airflow.
"""

from __future__ import annotations

from typing import Any

from genai_dags import planner, registry
from genai_dags.planner import PlanError
from genai_dags.settings import PipelineSettings

DRIFT_ASSET = "genai_drift"
# evaluate measures the champion on the batch as it was measured on its own held-out data, minus what
# only a promotion needs (samples, the gate, a champion to compare with).
MEASUREMENT_ONLY = ("num_samples=0", "min_relative_improvement=-1")
NOT_MEASUREMENT = ("num_samples", "sample_max_new_tokens", "min_relative_improvement", "min_improvement_over_champion")


class NothingNew(Exception):
    """The newest batch is what the champion was trained on: nothing to measure."""


def drift_asset_uri(settings: PipelineSettings) -> str:
    return f"{settings.artifact_root}/drift"


def newest_batch(prefix: str) -> str:
    """The newest entry (a file or a folder) directly under ``prefix``, by modification time, then name."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(prefix)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise PlanError(f"monitor.data_prefix={prefix!r} does not exist") from None
    entries = [e for e in entries if not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")]
    if not entries:
        raise PlanError(f"monitor.data_prefix={prefix!r} holds no batch yet")

    def modified(entry: dict[str, Any]) -> str:
        if entry.get("type") == "directory":  # a folder's newest file, not the folder's own stamp
            files = fs.find(entry["name"], detail=True).values()
            return max((_stamp(f) for f in files), default="")
        return _stamp(entry)

    newest = max(entries, key=lambda e: (modified(e), e["name"]))
    protocol = prefix.split("://", 1)[0] if "://" in prefix else "file"
    name = newest["name"].rstrip("/")
    return name if "://" in name else f"{protocol}://{name}"


def _stamp(info: dict[str, Any]) -> str:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            value = info[key]
            return f"{value:020.6f}" if isinstance(value, int | float) else str(value)
    return ""


def monitor_plan(conf: dict[str, Any], settings: PipelineSettings) -> dict[str, Any]:
    """Every stage's arguments, and the conf that would retrain the champion on the batch.

    Raises PlanError for what the user must fix (no model, no champion, no batch) and NothingNew when
    the batch is the one the champion was trained on.
    """
    name = conf.get("model_name") or settings.monitor.model_name
    if not name:
        raise PlanError("model_name is not set: give it in the conf or set monitor.model_name in the platform config")
    champion = registry.read_alias(settings.artifact_root, name, registry.CHAMPION)
    if champion is None:
        raise PlanError(f"model_name={name!r} has no champion yet: nothing to measure drift against")
    lineage = planner.read_published(settings, name, champion.version)
    trained = lineage.get("conf")
    if not isinstance(trained, dict):
        raise PlanError(
            f"{name}@champion ({champion.version}) was published without its run conf (before confs were kept): "
            "retrain it once with genai_finetune, or give genai_monitor another model"
        )
    if conf.get("data_uri"):
        batch = planner.resolve_uri(conf["data_uri"], settings)
    elif settings.monitor.data_prefix:
        batch = newest_batch(planner.resolve_uri(settings.monitor.data_prefix, settings))
    else:
        raise PlanError("data_uri is not set: give it in the conf or set monitor.data_prefix in the platform config")
    if batch.rstrip("/") == planner.resolve_uri(trained["train_data_uri"], settings).rstrip("/"):
        raise NothingNew(f"{batch} is what {name}@champion ({champion.version}) was trained on")

    fingerprint = planner.input_fingerprint({"data_uri": batch})
    thresholds = [settings.monitor.max_perplexity_ratio, settings.monitor.max_token_divergence]
    # Other thresholds are another drift run (a stage refuses other settings under the same run id).
    identity = {"model_name": name, "version": champion.version, "data_uri": batch, "thresholds": thresholds}
    run_id = conf.get("run_id") or planner.stable_run_id("drift", identity, fingerprint)
    published = registry.version_uri(settings.artifact_root, name, champion.version)
    base_model = lineage["base_model"]
    common = [f"artifact_root={settings.artifact_root}", f"run_id={run_id}"]
    measured = [a for a in planner.tunable_args("evaluate", trained) if a.split("=", 1)[0] not in NOT_MEASUREMENT]
    retrain = {k: v for k, v in trained.items() if k not in ("run_id", "version")}
    return {
        "run_id": run_id,
        "model_name": name,
        "champion": champion.version,
        "data_uri": batch,
        "tokenize": [
            *common,
            f"input_uri={batch}",
            f"base_model={base_model}",
            *planner.tunable_args("tokenize", trained),
        ],
        "evaluate": [*common, f"base_model={base_model}", f"adapter_uri={published}", *measured, *MEASUREMENT_ONLY],
        "drift": [
            *common,
            f"reference_uri={lineage['stages']['tokenize']['output_uri']}",
            f"reference_evaluation_uri={published}/evaluation",
            f"max_perplexity_ratio={settings.monitor.max_perplexity_ratio}",
            f"max_token_divergence={settings.monitor.max_token_divergence}",
        ],
        "retrain_conf": {**retrain, "train_data_uri": batch},
    }
