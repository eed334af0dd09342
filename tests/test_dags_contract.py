"""The contract between DAG tasks and stages: what a task passes is exactly what the stage's parser accepts.

DAG files never import ``stages``; this test does. For every stage task of every DAG (for the example
confs and for boundary values of every setting a run conf may carry), the task's ``key=value``
arguments are fed to the stage's own ``load_config`` and must build a valid config.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from pathlib import Path

import pytest

from genai_dags import params, planner, render_pods, settings
from genai_dags.stage_specs import STAGES
from stages.core.config import load_config
from stages.core.runner import StageConfig

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {"local": ROOT / "values/local/pipeline.yaml", "gke": ROOT / "values/gke/pipeline.yaml"}


def stage_config_class(stage: str) -> type[StageConfig]:
    """The config dataclass a stage module declares (the one its ``run_stage`` call parses into)."""
    module = importlib.import_module(f"stages.{stage}")
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, StageConfig)
        and obj is not StageConfig
        and obj.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"stages.{stage} should declare exactly one StageConfig subclass: {classes}"
    return classes[0]


def parse(stage: str, arguments: list[str]) -> StageConfig:
    return load_config(stage_config_class(stage), None, list(arguments))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_spec_names_a_stage_module_with_a_main(stage):
    spec = importlib.util.find_spec(f"stages.{stage}")
    assert spec is not None, f"stage spec {stage!r} has no module stages/{stage}.py"
    assert STAGES[stage].command == ["python", "-m", f"stages.{stage}"]
    assert callable(importlib.import_module(f"stages.{stage}").main)


@pytest.mark.parametrize("config", sorted(CONFIGS), ids=sorted(CONFIGS))
def test_the_arguments_every_task_passes_are_accepted_by_its_stage(config):
    cfg = settings.load_file(CONFIGS[config])
    dags = render_pods.load_dags(CONFIGS[config])
    confs = {
        "genai_finetune": {**json.loads((ROOT / "examples/finetune-demo.json").read_text()), "tokenize_shards": 2},
        "genai_batch_inference": json.loads((ROOT / "examples/batch-inference.json").read_text()),
    }
    checked = set()
    for dag_id, conf in confs.items():  # genai_promote and genai_retrain run no stage
        for name, op in render_pods.stage_tasks(dags[dag_id], cfg, conf):
            parsed = parse(op.stage, op.arguments)
            assert parsed.artifact_root == cfg.artifact_root, name
            checked.add(op.stage)
    assert checked == set(STAGES) - {"drift"}  # genai_monitor's: test_monitor_tasks_agree_on_the_batch_and_the_champion


def test_finetune_tokenize_shards_tile_the_input_and_the_merge_reads_them():
    from stages.tokenize import shard_uris

    cfg = settings.load_file(CONFIGS["local"])
    dag = render_pods.load_dags(CONFIGS["local"])["genai_finetune"]
    conf = {**json.loads((ROOT / "examples/finetune-demo.json").read_text()), "tokenize_shards": 3}
    plan = render_pods.plan_arguments(dag.dag_id, cfg, conf, dag.params)
    shards = [parse("tokenize", args) for args in plan["tokenize_shards"]]
    merge = parse("tokenize", plan["tokenize"])
    assert [(s.shard_index, s.num_shards, s.merge) for s in shards] == [(0, 3, False), (1, 3, False), (2, 3, False)]
    assert merge.merge and [s.output_uri("tokenize") for s in shards] == shard_uris(merge)
    assert merge.output_uri("tokenize") == f"{cfg.artifact_root}/runs/{plan['run_id']}/tokenize"  # train_lora's input


def test_monitor_tasks_agree_on_the_batch_and_the_champion(tmp_path):
    from genai_dags import monitor, registry

    root = tmp_path / "artifacts"
    cfg = settings.load_file(CONFIGS["local"]).model_copy(update={"artifact_root": root.as_uri()})
    conf = json.loads((ROOT / "examples/finetune-demo.json").read_text())
    version = root / "models/shakespeare-folio/ft-1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    trained = {"tokenize": {"output_uri": f"{root.as_uri()}/runs/ft-1/tokenize"}}
    dag = render_pods.load_dags(CONFIGS["local"])["genai_finetune"]
    published = parse("publish", render_pods.plan_arguments(dag.dag_id, cfg, conf, dag.params)["publish"])
    lineage = {"run_id": "ft-1", "base_model": "file:///b", "stages": trained, "conf": json.loads(published.run_conf)}
    (version / "lineage.json").write_text(json.dumps(lineage))  # what publish writes, as far as the monitor reads
    registry.move_alias(cfg.artifact_root, conf["model_name"], registry.CHAMPION, "ft-1", None)
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch/new.txt").write_text("new text\n")

    plan = monitor.monitor_plan({"data_uri": str(tmp_path / "batch"), "model_name": conf["model_name"]}, cfg)
    tokenize, evaluate, drift = (parse(s, plan[s]) for s in ("tokenize", "evaluate", "drift"))
    run_uri = f"{cfg.artifact_root}/runs/{plan['run_id']}"
    assert (
        tokenize.input_uri == f"file://{tmp_path / 'batch'}" and tokenize.block_size == conf["tokenize"]["block_size"]
    )
    assert evaluate.adapter_uri == version.as_uri() and evaluate.num_samples == 0  # the champion, measured only
    assert evaluate.dataset_uri == drift.dataset_uri == f"{run_uri}/tokenize"
    assert drift.evaluation_uri == f"{run_uri}/evaluate" and drift.reference_uri == trained["tokenize"]["output_uri"]
    assert drift.reference_evaluation_uri == f"{version.as_uri()}/evaluation"
    resolved = {**{k: p.value for k, p in dag.params.items()}, **conf}  # what the finetune run was planned from
    retrain = {k: v for k, v in resolved.items() if k not in ("run_id", "version")}
    assert plan["retrain_conf"] == {**retrain, "train_data_uri": f"file://{tmp_path / 'batch'}"}


def test_finetune_tasks_agree_on_the_run_and_the_upstream_outputs():
    cfg = settings.load_file(CONFIGS["local"])
    dag = render_pods.load_dags(CONFIGS["local"])["genai_finetune"]
    conf = json.loads((ROOT / "examples/finetune-demo.json").read_text())
    plan = render_pods.plan_arguments(dag.dag_id, cfg, conf, dag.params)
    tokenize, train, evaluate = (parse(s, plan[s]) for s in ("tokenize", "train_lora", "evaluate"))
    infer, publish = parse("batch_infer", plan["batch_infer"]), parse("publish", plan["publish"])
    run_uri = f"{cfg.artifact_root}/runs/{plan['run_id']}"
    assert {c.run_id for c in (tokenize, train, evaluate, infer, publish)} == {plan["run_id"]}
    assert train.dataset_uri == evaluate.dataset_uri == f"{run_uri}/tokenize"
    assert evaluate.adapter_uri == infer.adapter_uri == publish.adapter_uri == f"{run_uri}/train_lora"
    assert publish.evaluation_uri == f"{run_uri}/evaluate"
    assert tokenize.base_model == train.base_model == evaluate.base_model == infer.base_model
    assert publish.output_uri("publish") == f"{cfg.artifact_root}/models/{conf['model_name']}/{plan['version']}"
    assert train.max_steps == conf["train"]["max_steps"]


def test_batch_inference_shards_cover_the_prompts_and_the_merge_finds_them():
    from stages import batch_infer

    cfg = settings.load_file(CONFIGS["local"])
    conf = {
        "model_name": "m",
        "version": "v1",
        "prompts_uri": "p/prompts.jsonl",
        "records_per_shard": 5,
        "max_shards": 8,
        "run_id": None,
        "inference": {},
    }
    plan = planner.batch_plan(conf, cfg, {}, {"base_model": "file:///base"}, records=23)
    shards = [parse("batch_infer", args) for args in plan["batch_infer"]]
    merge = parse("merge_predictions", plan["merge_predictions"])
    from stages.merge_predictions import shard_uris

    assert [s.output_uri("batch_infer") for s in shards] == shard_uris(merge)
    covered = [i for s in shards for i in range(*batch_infer.shard_bounds(23, s.shard_index, s.num_shards))]
    assert covered == list(range(23))
    assert shards[0].adapter_uri == f"{cfg.artifact_root}/models/m/v1"


def boundary_values(schema: dict) -> list:
    """The extreme values a run-conf schema allows for one setting."""
    if "enum" in schema:
        return list(schema["enum"])
    kind = schema.get("type")
    if kind == "boolean":
        return [True, False]
    if kind == "array":
        return [["q_proj", "v_proj"]]
    if kind == "string":
        return ["text_a"]
    values = []
    for key, nudge in (("minimum", 0), ("exclusiveMinimum", 1e-6), ("maximum", 0), ("exclusiveMaximum", -1e-6)):
        if key in schema:
            value = schema[key] + nudge
            values.append(int(value) if kind == "integer" else value)
    return values


TUNABLE_CASES = [
    (STAGES[stage].conf_group, stage, name, schema)
    for stage, fields in params.TUNABLES.items()
    for name, schema in fields.items()
]


@pytest.mark.parametrize(
    ("group", "stage", "name", "schema"), TUNABLE_CASES, ids=[f"{c[0]}.{c[2]}" for c in TUNABLE_CASES]
)
def test_every_setting_a_conf_may_carry_exists_in_the_stage_and_its_range_is_accepted(group, stage, name, schema):
    cls = stage_config_class(stage)
    assert name in {f.name for f in dataclasses.fields(cls)}, f"stages.{stage} has no setting {name!r}"
    # Operational settings change memory and time, not the output; a conf carries only those it may need to fit
    # a GPU (what the memory plan suggests).
    assert name not in cls.OPERATIONAL or name in ("batch_size", "gradient_checkpointing"), f"{name} changes nothing"
    cfg = settings.load_file(CONFIGS["local"])
    required = {
        "model_name": "m",
        "base_model": "tiny-shakespeare",
        "train_data_uri": "d/x",
        "prompts_uri": "p/x.jsonl",
    }
    for value in boundary_values(schema):
        if name == "max_chars":
            value = max(value, 1_000_000)  # the stage also requires max_chars >= min_chars (default 1)
        conf = {**required, group: {name: value}}
        resolved = {**{k: p.value for k, p in params.finetune_params(cfg).items()}, **conf}
        plan = planner.finetune_plan(resolved, cfg, {})
        parsed = parse(stage, plan[stage])
        expected = ",".join(value) if isinstance(value, list) else value
        got = ",".join(getattr(parsed, name)) if isinstance(value, list) else getattr(parsed, name)
        assert got == pytest.approx(expected) if isinstance(value, float) else got == expected, (name, value)


def test_stage_inputs_and_identity_cannot_be_set_from_a_conf():
    forbidden = {
        "artifact_root",
        "run_id",
        "input_uri",
        "dataset_uri",
        "adapter_uri",
        "base_model",
        "device",
        "shard_index",
        "num_shards",
        "model_name",
        "version",
    }
    for fields in params.TUNABLES.values():
        assert not forbidden & set(fields)
