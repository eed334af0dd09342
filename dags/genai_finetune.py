"""
# genai_finetune

LoRA fine-tuning of a base model on your text, gated by evaluation, then batch inference and publication:

    plan -> [tokenize_shard x N] -> tokenize -> train_lora -> evaluate -> quality_gate -> batch_infer
         -> publish -> promote

- **plan** checks the whole run conf (unknown keys included) and fixes the stage run id: the conf's
  `run_id`, or a hash of the conf and a listing of its input files, so triggering the same conf again
  reuses every stage's committed output (cache hits); after a code change only the stages whose code or
  inputs changed recompute. It also estimates train_lora's peak memory per GPU from the base model's
  `config.json` and fails, with the numbers and the settings that would fit, when the GPU pools'
  `gpu_memory_gib` is too small, before any GPU node scales up (`genai_dags/memory_plan.py`). When the
  model has a champion (the `champion` alias) on the same base model, evaluate scores it too.
- **tokenize_shard** (big inputs only) tokenizes slices of the input side by side (whole files, and line
  ranges of JSONL and row groups of Parquet), one task each: `tokenize_shards` in the conf, or one per
  platform `tokenize_shard_bytes` of input; **tokenize** then merges them into the dataset a single task
  would have written, byte for byte (duplicates dropped across slices too). Small inputs: tokenize alone.
- **quality_gate** reads evaluate's `metrics.quality_gate` and stops the run before inference and
  publication when it failed; the reason is in its log and in the failure notification.
- **publish** copies the adapter, the evaluation and a `lineage.json` to
  `<artifact_root>/models/<model_name>/<version>/` and updates the `genai_models` asset.
- **promote** moves the `champion` alias to the new version when it beat the champion on the same
  held-out data (a model's first version: when it passed its gate); otherwise the version stays
  published, marked rejected, with the comparison in its evaluation (`genai_dags/registry.py`). With
  `registry.mlflow.tracking_uri` set, it first registers the version in MLflow (lineage as params, evaluation
  as metrics), then sets MLflow's `champion` alias where ours went (`genai_dags/mlflow_registry.py`).

Each stage is `python -m stages.<name> key=value ...` on the configured runtime (a local subprocess,
a Kubernetes pod on the stage's node pool, or a local container); the platform config is described in
`dags/README.md`.

Trigger it with a conf such as `examples/finetune-demo.json`:

    make trigger CONF=examples/finetune-demo.json
    airflow dags trigger genai_finetune --conf "$(cat examples/finetune-demo.json)"
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import Asset, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from genai_dags import mlflow_registry, params, planner, registry
from genai_dags.cost_estimate import measured_throughput, train_estimate
from genai_dags.dag_defaults import dag_kwargs, last_task_kwargs
from genai_dags.operators import mapped_stage_task, stage_task
from genai_dags.settings import load_settings

SETTINGS = load_settings()
PARAMS = params.finetune_params(SETTINGS)
# One asset for every published model; each event's extra says which model and version it was.
log = logging.getLogger(__name__)
MODELS = Asset(name="genai_models", uri=f"{SETTINGS.artifact_root}/models")


@dag(dag_id="genai_finetune", params=PARAMS, **dag_kwargs(SETTINGS, __doc__, ["fine-tuning"]))
def genai_finetune() -> None:
    @task(multiple_outputs=True)
    def plan() -> dict[str, Any]:
        """Validate the whole conf and build every stage's arguments; no stage starts on a bad conf."""
        context = get_current_context()
        try:
            params.check_conf(dict(context["dag_run"].conf or {}), PARAMS)
            conf = dict(context["params"])
            memory, memory_note = planner.train_memory_plan(conf, SETTINGS)
            inputs = planner.input_fingerprint(planner.finetune_inputs(conf, SETTINGS))
            _, version = planner.finetune_version(conf, inputs)
            champion, champion_note = planner.champion_to_compare(conf, SETTINGS, version)
            shards = planner.tokenize_shard_count(conf, SETTINGS)
            result = planner.finetune_plan(conf, SETTINGS, inputs, memory, champion, shards)
        except (params.ConfError, planner.PlanError, registry.RegistryError) as exc:
            raise AirflowFailException(str(exc)) from None
        log.info("%s", memory_note)
        log.info("%s", train_estimate(conf, SETTINGS, measured_throughput(conf, SETTINGS)))
        log.info("%s", champion_note)
        log.info(
            "stage run id %s: artifacts under %s/runs/%s/", result["run_id"], SETTINGS.artifact_root, result["run_id"]
        )
        return result

    @task
    def shard_input(steps: dict[str, Any]) -> list[list[str]]:
        """Each tokenize_shard task's arguments (none for an input that one task tokenizes)."""
        return steps["tokenize_shards"]

    @task
    def quality_gate(evaluation: dict[str, Any]) -> str:
        """Stop before batch inference and publication when the evaluation missed its threshold."""
        try:
            reason = planner.check_quality_gate(evaluation)
        except planner.GateFailed as exc:
            raise AirflowFailException(str(exc)) from None
        log.info("quality gate passed: %s", reason)
        return reason

    @task(**last_task_kwargs(SETTINGS))
    def promote(steps: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
        """Move the model's champion alias to the new version when it beat the champion (or, first, the base)."""
        name, version = steps["model_name"], steps["version"]
        metrics = evaluation["metrics"]
        mlflow = mlflow_registry.from_settings(SETTINGS)
        try:
            decision = mlflow_registry.promote(SETTINGS.artifact_root, name, version, metrics, steps["run_id"], mlflow)
        except registry.AliasMoved as exc:  # another run promoted meanwhile: this one decides again on retry
            raise AirflowFailException(str(exc)) from None
        except mlflow_registry.MlflowRegistryError as exc:  # down: retried; it registers before ours moves
            if exc.retryable:
                raise
            raise AirflowFailException(str(exc)) from None
        log.info("%s %s: %s (%s)", name, version, decision["decision"], decision.get("reason", ""))
        return decision

    steps = plan()
    # Big inputs: slices tokenized side by side, then merged by the tokenize task (none: it tokenizes alone).
    shards = mapped_stage_task("tokenize", SETTINGS, arguments=shard_input(steps), task_id="tokenize_shard")
    tokenize = stage_task("tokenize", SETTINGS, arguments=steps["tokenize"], trigger_rule="none_failed")
    train = stage_task("train_lora", SETTINGS, arguments=steps["train_lora"])
    evaluate = stage_task("evaluate", SETTINGS, arguments=steps["evaluate"])
    gate = quality_gate(evaluate.output)
    infer = stage_task("batch_infer", SETTINGS, arguments=steps["batch_infer"])
    publish = stage_task("publish", SETTINGS, arguments=steps["publish"], outlets=[MODELS])

    shards >> tokenize >> train >> evaluate
    gate >> infer >> publish >> promote(steps, evaluate.output)


genai_finetune()
