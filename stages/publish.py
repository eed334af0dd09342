"""Publish a fine-tuned model: adapter, evaluation and lineage under one stable, versioned location.

    python -m stages.publish artifact_root=s3://bucket/genai run_id=exp1 model_name=folio-lora

Copies from this run (or the URIs given) to ``<artifact_root>/models/<model_name>/<version>/``:

    adapter/            the PEFT adapter (adapter_config.json, adapter_model.safetensors, training_base.json)
    train_log.jsonl     the training log, so evaluate and the report tools work on a published model too
    evaluation/         metrics.json, report.md, samples.jsonl and the plots of evaluate
    lineage.json        run id, base model, every upstream stage's cache key, input and output hashes,
                        code version and image
    cost.json           what the run cost: every attempt of every stage (preempted ones included), its
                        wall time, node pool and price, per stage and in total, against the same hours
                        on demand (stages.core.costs); publish's own attempt counts up to its commit
    manifest.json       the commit marker, written last (as for every stage)

``version`` defaults to the run id. A published version is immutable: publishing different content
under an existing version is refused (exit 2); publishing the same content again is a cache hit.
The stage refuses to publish an adapter whose evaluation failed its quality gate.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from stages.core import costs, layout, manifest, store, uris
from stages.core.config import check, check_run_id, help_field
from stages.core.errors import UserError
from stages.core.runner import StageConfig, StageRun, run_stage

log = logging.getLogger("stages.publish")
NONE = "none"


@dataclass(kw_only=True)
class PublishConfig(StageConfig):
    model_name: str = help_field("", "Name to publish under: <artifact_root>/models/<model_name>/<version>/.")
    version: str = help_field("", "Version folder; empty means the run id.")
    adapter_uri: str = help_field("", "Output of train_lora (adapter/ + train_log.jsonl); empty means this run's.")
    evaluation_uri: str = help_field("", "Output of evaluate; empty means this run's.")
    predictions_uri: str = help_field(
        "", "Output of batch_infer, recorded in the lineage; empty means this run's if committed; 'none' leaves it out."
    )
    require_gate: bool = help_field(True, "Refuse to publish when evaluate's quality gate did not pass.")
    run_conf: str = help_field(
        "", "The run conf the version was made from (a JSON object), kept in lineage.json: what retraining starts from."
    )

    IMMUTABLE_OUTPUT = True  # a published version never changes; republishing the same content is a no-op

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.model_name), "model_name is required: the name to publish the model under")
        check_run_id("model_name", self.model_name)
        self.version = self.version or self.run_id
        check_run_id("version", self.version)
        self.resolve_input("adapter_uri", layout.TRAIN_LORA)
        self.resolve_input("evaluation_uri", layout.EVALUATE)
        if self.predictions_uri.strip().lower() == NONE:
            self.predictions_uri = NONE
        elif self.predictions_uri:
            self.predictions_uri = uris.normalize_uri(self.predictions_uri, "predictions_uri")
        if self.run_conf:
            try:
                conf = json.loads(self.run_conf)
            except ValueError as exc:
                raise UserError(f"run_conf is not JSON: {exc}") from None
            check(isinstance(conf, dict), f"run_conf must be a JSON object, not {type(conf).__name__}")

    def output_uri(self, stage: str) -> str:
        return uris.join(self.artifact_root, "models", self.model_name, self.version)


def _predictions(config: PublishConfig) -> str | None:
    """The batch_infer output to record, if any: an explicit one must be committed, the default may be absent."""
    if config.predictions_uri == NONE:
        return None
    if config.predictions_uri:
        return config.predictions_uri
    default = config.run_uri(layout.BATCH_INFER)
    return default if manifest.read(default) is not None else None


def inputs(config: PublishConfig) -> dict[str, str]:
    uris = {"adapter_uri": config.adapter_uri, "evaluation_uri": config.evaluation_uri}
    for field, uri in uris.items():
        if field == "evaluation_uri" and manifest.read(uri) is None:
            raise UserError(f"{field}={uri!r} is not a committed evaluate output (no manifest.json)")
    if predictions := _predictions(config):
        uris["predictions_uri"] = predictions
    return uris


def _stage_record(uri: str, committed: dict[str, Any]) -> dict[str, Any]:
    """What lineage keeps of an upstream stage: identity and hashes, not its metrics or timings."""
    return {
        "output_uri": uri,
        "stage": committed.get("stage"),
        "cache_key": committed.get("cache_key"),
        "outputs_sha256": committed.get("outputs_sha256"),
        "inputs": committed.get("inputs", {}),
        "code": committed.get("code", {}),
        "committed_at": committed.get("committed_at"),
    }


# ---------------------------------------------------------------------------------------------
# Reading and checking: every refusal comes before the first copy.


@dataclass(frozen=True)
class Adapter:
    """The adapter to publish: a committed train_lora output (``adapter/`` inside) or a bare PEFT folder."""

    uri: str  # the folder that holds adapter_config.json
    files: list[str]  # relative to uri
    trained: dict[str, Any] | None  # train_lora's manifest, when adapter_uri is a committed train_lora output
    base_model: str | None


def read_adapter(config: PublishConfig) -> Adapter:
    """The adapter's files and its base model (from train_lora's config, else ``training_base.json``)."""
    trained = manifest.read(config.adapter_uri)
    adapter_dir = uris.join(config.adapter_uri, layout.ADAPTER) if trained else config.adapter_uri
    files = store.list_files(adapter_dir)
    if layout.ADAPTER_CONFIG not in files:
        raise UserError(f"adapter_uri={config.adapter_uri!r} holds no PEFT adapter (no adapter_config.json)")
    base_model = trained.get("config", {}).get("base_model") if trained else None
    if base_model is None:
        training_base = (
            json.loads(store.read_text(uris.join(adapter_dir, layout.TRAINING_BASE)))
            if layout.TRAINING_BASE in files
            else {}
        )
        base_model = training_base.get("base_model")
    return Adapter(uri=adapter_dir, files=files, trained=trained, base_model=base_model)


def read_evaluation(config: PublishConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """evaluate's manifest and its quality-gate verdict; a failed gate is refused unless ``require_gate=false``."""
    evaluated = manifest.read(config.evaluation_uri) or {}
    gate = (evaluated.get("metrics") or {}).get("quality_gate") or {}
    if config.require_gate and not gate.get("passed"):
        raise UserError(
            f"evaluation at {config.evaluation_uri} did not pass its quality gate "
            f"({gate.get('reason', 'no verdict recorded')}); set require_gate=false to publish anyway"
        )
    return evaluated, gate


def read_predictions(config: PublishConfig) -> tuple[str, dict[str, Any]] | None:
    """The batch_infer output to record in the lineage and its manifest, if any; it must be committed."""
    predictions = _predictions(config)
    if not predictions:
        return None
    predicted = manifest.read(predictions)
    if predicted is None:
        raise UserError(f"predictions_uri={predictions!r} is not a committed batch_infer output")
    return predictions, predicted


# ---------------------------------------------------------------------------------------------
# Writing


def copy_adapter(config: PublishConfig, run: StageRun, adapter: Adapter) -> None:
    """``adapter/``, and train_lora's ``train_log.jsonl`` when there is one."""
    for rel in adapter.files:
        store.copy_file(uris.join(adapter.uri, rel), run.output(layout.ADAPTER, rel))
    if adapter.trained:
        train_log = uris.join(config.adapter_uri, layout.TRAIN_LOG)
        if store.exists(train_log):
            store.copy_file(train_log, run.output(layout.TRAIN_LOG))


def copy_evaluation(config: PublishConfig, run: StageRun) -> list[str]:
    """evaluate's report files that exist, under ``evaluation/``; returns their names."""
    copied = []
    for name in layout.EVALUATION_FILES:
        src = uris.join(config.evaluation_uri, name)
        if store.exists(src):
            store.copy_file(src, run.output("evaluation", name))
            copied.append(name)
    return copied


def build_lineage(
    config: PublishConfig,
    run: StageRun,
    adapter: Adapter,
    evaluated: dict[str, Any],
    gate: dict[str, Any],
    predictions: tuple[str, dict[str, Any]] | None,
) -> dict[str, Any]:
    """Where the published model comes from: the run, the base model, and every upstream stage's identity."""
    stages: dict[str, Any] = {}
    if adapter.trained:
        stages["train_lora"] = _stage_record(config.adapter_uri, adapter.trained)
        dataset_uri = adapter.trained.get("config", {}).get("dataset_uri")
        tokenized = manifest.read(dataset_uri) if dataset_uri else None
        if tokenized:
            stages["tokenize"] = _stage_record(dataset_uri, tokenized)
    stages["evaluate"] = _stage_record(config.evaluation_uri, evaluated)
    if predictions:
        stages["batch_infer"] = _stage_record(*predictions)
    return {
        "model_name": config.model_name,
        "version": config.version,
        "run_id": config.run_id,
        "base_model": adapter.base_model,
        "base_model_sha256": (adapter.trained or {}).get("inputs", {}).get("base_model", {}).get("sha256"),
        "quality_gate": gate,
        "inputs": run.inputs,
        "stages": stages,
        "images": sorted({s["code"]["image"] for s in stages.values() if s["code"].get("image")}),
        **({"conf": json.loads(config.run_conf)} if config.run_conf else {}),
    }


def sanity_check(run: StageRun, adapter: Adapter) -> None:
    """The published adapter is byte-identical to what was trained."""
    for rel in adapter.files:
        if store.sha256(run.output(layout.ADAPTER, rel)) != store.sha256(uris.join(adapter.uri, rel)):
            raise RuntimeError(f"published adapter file {rel} differs from its source")


def publish(config: PublishConfig, run: StageRun) -> dict[str, Any]:
    """Check what is to be published, copy it, write its lineage; the runner then commits the manifest."""
    adapter = read_adapter(config)
    evaluated, gate = read_evaluation(config)
    predictions = read_predictions(config)

    copy_adapter(config, run, adapter)
    copied = copy_evaluation(config, run)
    lineage = build_lineage(config, run, adapter, evaluated, gate, predictions)
    store.write_text(run.output("lineage.json"), json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    cost = costs.run_cost(config.artifact_root, config.run_id, current=run.attempt)
    store.write_text(run.output(costs.COST_FILE), json.dumps(cost, indent=2, sort_keys=True) + "\n")
    log.info("%s", costs.render(cost))

    sanity_check(run, adapter)
    log.info(
        "published %s version %s at %s (%d adapter files, evaluation: %s)",
        config.model_name,
        config.version,
        run.out_uri,
        len(adapter.files),
        ", ".join(copied) or "none",
    )
    return {
        "model_name": config.model_name,
        "version": config.version,
        "uri": run.out_uri,
        "adapter_uri": run.output(layout.ADAPTER),
        "base_model": adapter.base_model,
        "quality_gate_passed": bool(gate.get("passed")),
        "cost": {
            "currency": cost["currency"],
            "total": cost["total"]["cost"],
            "on_demand": cost["total"]["on_demand_cost"],
            "seconds": cost["total"]["seconds"],
            "stages": {name: s["cost"] for name, s in cost["stages"].items()},
        },
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage("publish", PublishConfig, inputs, publish, argv)


if __name__ == "__main__":
    sys.exit(main())
