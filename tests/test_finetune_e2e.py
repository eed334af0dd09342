"""End to end through Airflow with the local runtime: fine-tune, publish, re-run from cache, batch inference.

Real stages on a tiny real model (the session's ``tiny_base_model``) and a few First Folio plays;
Airflow runs each DAG with ``dag.test()`` on SQLite, the way ``make demo`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genai_dags import local_airflow, registry
from tests.test_notifications import smtp_server  # noqa: F401 - the SMTP server fixture

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration
STAGE_TASKS = ["tokenize", "train_lora", "evaluate", "batch_infer", "publish"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    lines = (ROOT / "examples/prompts/folio-prompts.jsonl").read_text().splitlines()[:5]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def config(tmp_path_factory, tiny_base_model) -> Path:
    root = tmp_path_factory.getbasetemp() / "e2e-artifacts"
    path = tmp_path_factory.mktemp("e2e-config") / "pipeline.yaml"
    path.write_text(
        f"runtime: local\nartifact_root: {root}\nretries: 0\nbase_models: {{tiny: '{tiny_base_model}'}}\n"
        "notifications:\n  on_failure: true\n  on_success: true\n"
        "  smtp: {conn_id: genai_smtp, to: [ml@example.com], from_email: airflow@example.com}\n"
        # Priced as the cluster's pools would be: the cost arithmetic end to end (tests/test_costs.py: the rest).
        "costs:\n  currency: EUR\n  prices:\n    cpu: {on_demand: 0.05}\n"
        "    gpu-spot: {on_demand: 0.9, spot: 0.3}\n    gpu-on-demand: {on_demand: 1.0}\n"
    )
    return path


@pytest.fixture
def finetune_conf(folio_corpus, prompts) -> dict:
    return {
        "model_name": "folio-tiny",
        "base_model": "tiny",
        "train_data_uri": str(folio_corpus),
        "prompts_uri": str(prompts),
        "tokenize": {"block_size": 64},
        "train": {"rank": 4, "max_steps": 12, "batch_size": 8, "learning_rate": 0.003},
        # The gate's arithmetic is tested in test_dags.py; here any verdict with a reason will do.
        "evaluate": {"max_eval_docs": 40, "min_relative_improvement": -1, "num_samples": 1, "sample_max_new_tokens": 8},
        "inference": {"max_new_tokens": 8},
    }


def stage_results(run) -> dict[str, dict]:
    return {task: local_airflow.xcom(run, task) for task in STAGE_TASKS}


def test_finetune_publishes_then_a_rerun_is_all_cache_hits_then_batch_inference_fans_out(
    config,
    finetune_conf,
    prompts,
    smtp_server,  # noqa: F811 - the fixture
):
    local_airflow.migrate()
    finetune_conf = {**finetune_conf, "tokenize_shards": 2}  # two tasks tokenize, one merges

    # 1. A fresh run: every stage works, the model is published with its lineage.
    first = local_airflow.run_dag("genai_finetune", finetune_conf, config)
    states = local_airflow.task_states(first)
    assert str(first.state) == "success", states
    assert [states[f"tokenize_shard[{i}]"] for i in range(2)] == ["success", "success"]
    results = stage_results(first)
    assert not any(r["cache_hit"] for r in results.values())
    assert results["tokenize"]["metrics"]["shards"] == 2
    published = results["publish"]["metrics"]
    model_dir = Path(published["uri"].removeprefix("file://"))
    run_id = local_airflow.xcom(first, "plan", key="run_id")
    assert model_dir.parts[-3:] == ("models", "folio-tiny", run_id)
    for rel in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/training_base.json",
        "train_log.jsonl",
        "evaluation/metrics.json",
        "evaluation/report.md",
        "lineage.json",
        "manifest.json",
    ):
        assert (model_dir / rel).is_file(), rel
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["run_id"] == run_id and lineage["version"] == run_id
    assert lineage["base_model"].endswith("/runs/tiny/base_model/model")
    assert set(lineage["stages"]) == {"tokenize", "train_lora", "evaluate", "batch_infer"}
    for record in lineage["stages"].values():
        assert len(record["cache_key"]) == 64 and len(record["outputs_sha256"]) == 64
        assert record["code"]["source_sha256"]
    assert lineage["quality_gate"]["reason"]
    assert lineage["conf"]["model_name"] == "folio-tiny" and lineage["conf"]["tokenize_shards"] == 2
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["outputs"]["lineage.json"]
    # What the run cost: each stage's attempt at its pool's price, published beside the model.
    cost = json.loads((model_dir / "cost.json").read_text())
    assert set(STAGE_TASKS) <= set(cost["stages"]) and cost["currency"] == "EUR"
    assert all(s["attempts"] == (3 if name == "tokenize" else 1) for name, s in cost["stages"].items())  # 2 shards
    assert all(s["cost"] is not None for s in cost["stages"].values())
    assert cost["stages"]["train_lora"]["seconds"] > 0 and cost["total"]["cost"] > 0
    assert cost["stages"]["train_lora"]["pools"] == ["gpu-spot (spot)"]
    assert cost["total"]["cost"] < cost["total"]["on_demand_cost"]  # spot against the same hours on demand
    assert published["cost"]["total"] == cost["total"]["cost"]
    predictions = Path(results["batch_infer"]["output_uri"].removeprefix("file://")) / "predictions.jsonl"
    assert len(predictions.read_text().splitlines()) == 5
    # The model's first version to pass its gate becomes its champion.
    decision = local_airflow.xcom(first, "promote")
    assert decision["decision"] == "promoted" and "first version of folio-tiny" in decision["reason"]
    root = str(model_dir.parents[2])
    assert registry.read_alias(root, "folio-tiny", "champion").version == run_id

    # The asset event says which model and version were published (for data-aware DAGs).
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == "genai_models", AssetEvent.source_run_id == first.run_id)
            .all()
        )
        assert [(e.extra["model_name"], e.extra["version"]) for e in events] == [("folio-tiny", run_id)]

    # The last task's success notification.
    assert [m["Subject"] for m in smtp_server] == [f"[genai] genai_finetune succeeded (run {first.run_id})"]

    # 2. The same conf again: the same stage run id, and every stage is a cache hit.
    before = sorted((p, p.stat().st_mtime_ns) for p in model_dir.rglob("*"))
    second = local_airflow.run_dag("genai_finetune", finetune_conf, config)
    assert str(second.state) == "success"
    assert local_airflow.xcom(second, "plan", key="run_id") == run_id
    assert all(r["cache_hit"] for r in stage_results(second).values()), stage_results(second)
    assert sorted((p, p.stat().st_mtime_ns) for p in model_dir.rglob("*")) == before  # nothing rewritten
    assert local_airflow.xcom(second, "promote")["decision"] == "already"  # not compared with itself either
    # The cache hits cost their (short) time too: the run's record has them, the published cost does not.
    from stages.core import costs

    artifact_root = str(model_dir.parents[2])
    assert costs.run_cost(artifact_root, run_id)["total"]["attempts"] == 2 * cost["total"]["attempts"]
    report = costs.report(artifact_root)
    assert any(line.split()[:2] == ["folio-tiny", run_id] for line in report.splitlines()), report

    # 3. Batch inference with the champion: 5 prompts, 2 per shard -> 3 mapped tasks, merged in order.
    batch = local_airflow.run_dag(
        "genai_batch_inference",
        {
            "model_name": "folio-tiny@champion",
            "prompts_uri": str(prompts),
            "records_per_shard": 2,
            "max_shards": 4,
            "inference": {"max_new_tokens": 8},
        },
        config,
    )
    states = local_airflow.task_states(batch)
    assert str(batch.state) == "success", states
    assert sorted(t for t in states if t.startswith("batch_infer")) == [f"batch_infer[{i}]" for i in range(3)]
    assert f"adapter_uri={model_dir.as_uri()}" in local_airflow.xcom(batch, "plan")[0]  # the alias's version
    merged = local_airflow.xcom(batch, "merge_predictions")
    assert merged["metrics"]["records"] == 5 and merged["metrics"]["shards"] == 3
    lines = (Path(merged["output_uri"].removeprefix("file://")) / "predictions.jsonl").read_text().splitlines()
    expected_ids = [json.loads(line)["id"] for line in prompts.read_text().splitlines()]
    assert [json.loads(line)["id"] for line in lines] == expected_ids


def test_instruction_tuning_runs_through_the_same_dag(config, texts_dir, tmp_path):
    """task=sft end to end: the demo's conversations, the tiny model's ChatML template, chat prompts."""
    from genai_dags import demo_data

    demo_data.write(texts_dir, tmp_path, per_play=12)
    conf = {
        "model_name": "which-play-tiny",
        "base_model": "tiny",
        "train_data_uri": str(tmp_path / demo_data.TRAIN_FILE),
        "prompts_uri": str(tmp_path / demo_data.PROMPTS_FILE),
        "tokenize": {"task": "sft", "block_size": 128, "validation_fraction": 0.25},
        "train": {"rank": 4, "max_steps": 6, "batch_size": 4},
        "evaluate": {"gate_metric": "chrf", "min_relative_improvement": -1, "sample_max_new_tokens": 6},
        "inference": {"max_new_tokens": 6},
    }
    local_airflow.migrate()
    run = local_airflow.run_dag("genai_finetune", conf, config)
    assert str(run.state) == "success", local_airflow.task_states(run)
    results = stage_results(run)
    assert results["tokenize"]["metrics"]["task"] == "sft" and results["tokenize"]["metrics"]["records_kept"] == 84
    evaluation = results["evaluate"]["metrics"]
    assert evaluation["task"] == "sft" and evaluation["conversations"] == 21
    assert evaluation["quality_gate"]["metric"] == "chrf"
    predictions = Path(results["batch_infer"]["output_uri"].removeprefix("file://")) / "predictions.jsonl"
    ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()]
    assert ids == [json.loads(line)["id"] for line in (tmp_path / demo_data.PROMPTS_FILE).read_text().splitlines()]
    published = Path(results["publish"]["metrics"]["uri"].removeprefix("file://"))
    assert (published / "adapter/chat_template.jinja").read_text().startswith("{% for message in messages %}")
