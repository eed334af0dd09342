"""Drift -> retraining through a real Airflow (scheduler, api-server, dag-processor; the local runtime).

A champion is trained on three First Folio plays. ``genai_monitor`` then measures the newest batch under
its data prefix: two other Folio plays (no drift: no asset event, no retraining), then a batch of support
tickets (drifted: an event on ``genai_drift``, which schedules ``genai_retrain``, which starts
``genai_finetune`` on the tickets, whose version beats the champion on them and is promoted). The
scheduler creates the asset-triggered run itself; nothing is triggered by hand but the monitor.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from genai_dags import registry, trigger
from stages import drift
from tests.served_airflow import ServedAirflow, serve

pytestmark = pytest.mark.integration
MODEL = "folio-watch"


def test_js_divergence_is_zero_for_the_same_frequencies_and_one_for_disjoint_tokens():
    import numpy as np

    assert drift.js_divergence(np.array([5, 3, 0, 2]), np.array([10, 6, 0, 4])) == pytest.approx(0.0, abs=1e-12)
    assert drift.js_divergence(np.array([5, 0]), np.array([0, 0, 7])) == pytest.approx(1.0)
    assert 0 < drift.js_divergence(np.array([5, 5]), np.array([9, 1])) < 1


def support_tickets(path: Path, count: int = 2000) -> None:
    """Text nothing like the plays: ids, amounts, statuses."""
    rng = random.Random(0)
    items = ["router", "invoice", "cable", "laptop", "license", "printer", "server"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            f"Ticket #{rng.randint(10000, 99999)}: {rng.choice(items)} order {rng.randint(1, 500)} units at "
            f"{rng.randint(1, 999)}.{rng.randint(10, 99)} USD, status {rng.choice(['open', 'closed'])}.\n\n"
            for _ in range(count)
        )
    )


def run_to_end(airflow: ServedAirflow, dag_id: str, run_id: str) -> dict:
    run = trigger.wait(airflow.url, dag_id, run_id, airflow.token, poll_seconds=2, timeout=600)
    states = {t["task_id"]: t["state"] for t in trigger.task_instances(airflow.url, dag_id, run_id, airflow.token)}
    assert run["state"] == "success", (dag_id, states, airflow.log_tail())
    return {**run, "task_states": states}


def xcom(airflow: ServedAirflow, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
    api = f"{trigger._run_api(airflow.url, dag_id, run_id)}/taskInstances/{task_id}/xcomEntries/return_value"
    found = trigger.request("GET", f"{api}?map_index={map_index}&deserialize=true&stringify=false", token=airflow.token)
    return found["value"]


def runs_of(airflow: ServedAirflow, dag_id: str) -> list[dict]:
    api = f"{airflow.url}/api/v2/dags/{dag_id}/dagRuns?limit=100"
    return sorted(trigger.request("GET", api, token=airflow.token)["dag_runs"], key=lambda r: r["run_after"])


def wait_for_new_run(airflow: ServedAirflow, dag_id: str, known: int, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while len(runs := runs_of(airflow, dag_id)) <= known:
        assert time.monotonic() < deadline, (f"no new run of {dag_id}", airflow.log_tail())
        time.sleep(2)
    return runs[-1]


def test_a_drifted_batch_retrains_the_champion_by_itself_and_a_similar_one_does_not(
    tiny_base_model, folio_corpus, texts_dir, tmp_path
):
    root, incoming = tmp_path / "artifacts", tmp_path / "incoming"
    shutil.copytree(tiny_base_model.removeprefix("file://"), root / "base/model")
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"runtime: local\nartifact_root: {root}\nretries: 0\nbase_models: {{tiny: '{{artifact_root}}/base/model'}}\n"
        f"monitor:\n  model_name: {MODEL}\n  data_prefix: {incoming}\n"
        "  max_perplexity_ratio: 1.25\n  max_token_divergence: 0.1\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "prompt": "Romeo. What saies"}) + "\n")
    conf = {
        "model_name": MODEL,
        "base_model": "tiny",
        "train_data_uri": str(folio_corpus),
        "prompts_uri": str(prompts),
        "tokenize": {"block_size": 64},
        "train": {"rank": 4, "max_steps": 12, "batch_size": 8, "learning_rate": 0.003},
        "evaluate": {"max_eval_docs": 40, "min_relative_improvement": -1, "num_samples": 0},
        "inference": {"max_new_tokens": 4},
    }
    with serve(config, tmp_path / "airflow-home") as airflow:
        url, token = airflow.url, airflow.token
        first = trigger.trigger(url, "genai_finetune", conf, token)["dag_run_id"]
        run_to_end(airflow, "genai_finetune", first)
        champion = registry.read_alias(str(root), MODEL, registry.CHAMPION)
        assert champion is not None

        # Two other Folio plays: the same world. Triggered with no conf, as its schedule would run it.
        (incoming / "2026-11-01").mkdir(parents=True)
        for play in ("tempest", "twelfe-night"):
            shutil.copy(texts_dir / f"{play}_gut_f.txt", incoming / "2026-11-01" / f"{play}.txt")
        similar = trigger.trigger(url, "genai_monitor", {}, token)["dag_run_id"]
        measured = run_to_end(airflow, "genai_monitor", similar)
        verdict = xcom(airflow, "genai_monitor", similar, "drift")["metrics"]
        print("similar batch:", json.dumps(verdict, sort_keys=True))
        assert not verdict["drifted"] and measured["task_states"]["decide"] == "skipped"
        assert verdict["perplexity"]["ratio"] < 1.25 and verdict["tokens"]["js_divergence"] < 0.1
        report = root / "runs" / xcom(airflow, "genai_monitor", similar, "plan")["run_id"] / "drift"
        assert {"drift.json", "report.md", "drift.png", "manifest.json"} <= {p.name for p in report.iterdir()}
        assert "no drift" in (report / "report.md").read_text()

        # Support tickets, landed later: drifted on both measures; retraining starts by itself.
        support_tickets(incoming / "2026-12-01" / "tickets.txt")
        drifted = trigger.trigger(url, "genai_monitor", {}, token)["dag_run_id"]
        measured = run_to_end(airflow, "genai_monitor", drifted)
        verdict = xcom(airflow, "genai_monitor", drifted, "drift")["metrics"]
        print("drifted batch:", json.dumps(verdict, sort_keys=True))
        assert verdict["drifted"] and measured["task_states"]["decide"] == "success"
        assert verdict["perplexity"]["drifted"] and verdict["tokens"]["drifted"]

        retrain = wait_for_new_run(airflow, "genai_retrain", known=0)
        assert retrain["run_type"] == "asset_triggered"
        run_to_end(airflow, "genai_retrain", retrain["dag_run_id"])
        finetunes = runs_of(airflow, "genai_finetune")
        assert len(finetunes) == 2, finetunes
        second = finetunes[-1]
        # The champion's own conf, on the drifted batch.
        assert second["conf"] == {**conf, "tokenize_shards": 0, "train_data_uri": f"file://{incoming / '2026-12-01'}"}
        run_to_end(airflow, "genai_finetune", second["dag_run_id"])
        decision = xcom(airflow, "genai_finetune", second["dag_run_id"], "promote")
        assert decision["decision"] == "promoted", decision  # it beat the champion on the tickets' held-out part
        assert registry.read_alias(str(root), MODEL, registry.CHAMPION).version != champion.version

        # The similar batch's run stayed alone: one retraining, for the drifted batch only.
        assert len(runs_of(airflow, "genai_retrain")) == 1
