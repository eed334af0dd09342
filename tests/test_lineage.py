"""OpenLineage end to end: real Airflow runs (local runtime, real stages) send their events to an HTTP receiver.

    .venv/bin/python -m pytest tests/test_lineage.py -s      # -s also prints one COMPLETE event

The receiver is a small HTTP server on 127.0.0.1, configured as the provider's HTTP transport through
``AIRFLOW__OPENLINEAGE__TRANSPORT``. The DAG runs run in a process of their own: the provider decides
once per process, when Airflow loads its plugin, whether lineage is on, and this session's Airflow may have
loaded it already with lineage off. One short genai_finetune run succeeds, one fails at tokenize (bad data).
Credentials are planted where a stage task could see them: an Airflow connection, a cloud variable in the
worker's environment, the Pushgateway URL's password (an attribute of every stage operator), with the
provider's ``include_full_task_info`` on (which serialises every operator attribute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attr
import jsonschema
import pytest

from genai_dags import render_pods, settings
from genai_dags.lineage_facets import GenaiStageRunFacet
from tests.conftest import ROOT
from tests.test_metrics import free_port

NAMESPACE = "genai-lineage-test"
STAGE_TASKS = ("tokenize", "train_lora", "evaluate", "batch_infer", "publish")
SECRETS = {
    "connection": "planted-Conn-Password-7c1d9e",
    "environment": "planted-Cloud-Secret-52ab0f",
    "pushgateway": "planted-Push-Password-e83a41",
}
FACET_SCHEMA = json.loads((ROOT / "docs/openlineage/GenaiStageRunFacet.json").read_text())
# Stands in for the stage interpreter (the config's local.python): records the parent run each stage got.
STAGE_PYTHON = """#!/bin/sh
echo "$2 $OPENLINEAGE_PARENT_ID $OPENLINEAGE_ROOT_PARENT_ID" >> "{record}"
exec {python} "$@"
"""
HARNESS = """
import json, sys
from genai_dags import local_airflow
local_airflow.configure(sys.argv[1])
local_airflow.migrate()
runs = []
for conf in json.loads(sys.argv[3]):
    run = local_airflow.run_dag("genai_finetune", conf, sys.argv[2])
    runs.append({"state": str(run.state), "tasks": local_airflow.task_states(run),
                 "run_id": local_airflow.xcom(run, "plan", key="run_id")})
print("RUNS " + json.dumps(runs))
"""


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[bytes]]]:
    """An OpenLineage HTTP endpoint on 127.0.0.1: (its URL, every body POSTed to it).

    It refuses every START event (HTTP 400, which the client does not retry): a lineage endpoint that fails
    must cost the stages nothing. COMPLETE and FAIL events are accepted.
    """
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            bodies.append(body)
            start = json.loads(body).get("eventType") == "START"
            self.send_response(400 if start or self.path != "/api/v1/lineage" else 200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


def run_finetune(tmp_path: Path, transport: dict, confs: list[dict], config: Path, env: dict) -> list[dict]:
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    done = subprocess.run(
        [sys.executable, str(harness), str(tmp_path / "airflow"), str(config), json.dumps(confs)],
        cwd=ROOT,
        env={
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "dags"), str(ROOT)]),
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(transport),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": NAMESPACE,
            "AIRFLOW__OPENLINEAGE__INCLUDE_FULL_TASK_INFO": "True",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    line = next((x for x in done.stdout.splitlines() if x.startswith("RUNS ")), None)
    assert done.returncode == 0 and line, out[-6000:]
    return json.loads(line.removeprefix("RUNS "))


def datasets(event: dict, key: str) -> set[tuple[str, str]]:
    return {(d["namespace"], d["name"]) for d in event.get(key) or []}


@pytest.mark.integration
def test_stage_tasks_report_their_datasets_and_failures_and_no_secret(
    receiver, tmp_path, tiny_base_model, folio_corpus
):
    url, bodies = receiver
    root = tmp_path / "artifacts"
    record = tmp_path / "parents.txt"
    python = tmp_path / "stage_python"
    python.write_text(STAGE_PYTHON.format(record=record, python=sys.executable))
    python.chmod(0o755)
    closed = free_port()  # nothing listens: every push fails, which never fails a stage
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"runtime: local\nartifact_root: {root}\nretries: 0\nbase_models: {{tiny: '{tiny_base_model}'}}\n"
        f"local: {{python: '{python}', workdir: '{ROOT}'}}\n"
        f"metrics: {{pushgateway_url: 'http://genai:{SECRETS['pushgateway']}@127.0.0.1:{closed}'}}\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "O Romeo"}\n{"id": "b", "prompt": "Enter"}\n')
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "blank.txt").write_text("  \n\n")
    conf = {
        "model_name": "lineage-tiny",
        "base_model": "tiny",
        "train_data_uri": str(folio_corpus),
        "prompts_uri": str(prompts),
        "tokenize": {"block_size": 64},
        "train": {"rank": 4, "max_steps": 2, "batch_size": 4},
        "evaluate": {"max_eval_docs": 8, "min_relative_improvement": -1, "num_samples": 1, "sample_max_new_tokens": 4},
        "inference": {"max_new_tokens": 4},
    }
    transport = {"type": "http", "url": url, "endpoint": "api/v1/lineage"}
    env = {
        "AIRFLOW_CONN_GENAI_STORE": json.dumps({"conn_type": "aws", "login": "x", "password": SECRETS["connection"]}),
        "AWS_SECRET_ACCESS_KEY": SECRETS["environment"],
    }

    good, failed = run_finetune(
        tmp_path, transport, [conf, {**conf, "model_name": "lineage-bad", "train_data_uri": str(bad)}], config, env
    )

    # Every START was refused by the endpoint, and every stage ran all the same.
    assert good["state"] == "success", good
    assert failed["state"] == "failed" and failed["tasks"]["tokenize"] == "failed", failed
    events = [json.loads(b) for b in bodies]
    refused = {e["job"]["name"] for e in events if e["eventType"] == "START"}
    assert refused >= {f"genai_finetune.{task}" for task in STAGE_TASKS}
    by_task: dict[tuple[str, str], dict] = {}
    for event in events:
        by_task[(event["eventType"], event["job"]["name"])] = event

    # Each stage task's COMPLETE names what the stage read (defaults resolved) and the folder it committed.
    run = root / "runs" / good["run_id"]
    base = tiny_base_model.removeprefix("file://")
    expected = {  # the input folders as the stages record them: an upstream stage's output is one dataset
        "tokenize": ({str(folio_corpus), base}, run / "tokenize"),
        "train_lora": ({base, str(run / "tokenize")}, run / "train_lora"),
        "evaluate": ({base, str(run / "train_lora"), str(run / "tokenize")}, run / "evaluate"),
        "batch_infer": ({base, str(run / "train_lora"), str(prompts)}, run / "batch_infer"),
        "publish": (
            {str(run / "train_lora"), str(run / "evaluate"), str(run / "batch_infer")},
            root / "models/lineage-tiny" / good["run_id"],
        ),
    }
    parents = set(record.read_text().splitlines())  # "<stage module> <parent id> <root parent id>", both runs
    for task in STAGE_TASKS:
        event = by_task[("COMPLETE", f"genai_finetune.{task}")]
        inputs, output = expected[task]
        assert datasets(event, "inputs") == {("file", p) for p in inputs}, task
        assert datasets(event, "outputs") == {("file", str(output))}, task
        # Versioned by content hash; tokenize counts the base model by its tokenizer alone: no version of it.
        partial = {base} if task == "tokenize" else set()
        versioned = [d for d in event["inputs"] + event["outputs"] if d["name"] not in partial]
        assert all(d["facets"]["version"]["datasetVersion"] for d in versioned), task
        assert not any(d["facets"] for d in event["inputs"] if d["name"] in partial), task
        facet = event["run"]["facets"]["genaiStage"]
        assert facet["stage"] == task and facet["cacheHit"] is False and len(facet["cacheKey"]) == 64
        assert facet["manifestUri"] == f"file://{output}/manifest.json"
        jsonschema.validate(facet, FACET_SCHEMA["$defs"]["GenaiStageRunFacet"]["allOf"][1])
        # The stage's process got this task's run as its parent, and the DAG run as its root.
        parent = f"{NAMESPACE}/genai_finetune.{task}/{event['run']['runId']}"
        root_parent = f"{NAMESPACE}/genai_finetune/{event['run']['facets']['parent']['run']['runId']}"
        assert f"stages.{task} {parent} {root_parent}" in parents, (task, parents)
    evaluation = by_task[("COMPLETE", "genai_finetune.evaluate")]["run"]["facets"]["genaiStage"]["metrics"]
    assert "passed" in evaluation["quality_gate"]
    published = by_task[("COMPLETE", "genai_finetune.publish")]["run"]["facets"]["genaiStage"]["publishedModel"]
    model_uri = expected["publish"][1].as_uri()
    assert published == {"model_name": "lineage-tiny", "version": good["run_id"], "uri": model_uri}
    assert set(FACET_SCHEMA["$defs"]["GenaiStageRunFacet"]["allOf"][1]["properties"]) == {
        f.name for f in attr.fields(GenaiStageRunFacet) if not f.name.startswith("_")
    }

    # The failing stage: FAIL with the stage's own error line, and the inputs its arguments named.
    fail = by_task[("FAIL", "genai_finetune.tokenize")]
    message = fail["run"]["facets"]["errorMessage"]["message"]
    assert "stage tokenize rejected its settings or input (exit 2, not retried)" in message, message
    assert ("file", str(bad)) in datasets(fail, "inputs") and not fail.get("outputs")

    # No planted credential in any event, anywhere (the receiver got every byte the provider sent).
    for body in bodies:
        for where, secret in SECRETS.items():
            assert secret.encode() not in body, f"the {where} secret is in an event: {body[:300]!r}"

    sample = by_task[("COMPLETE", "genai_finetune.evaluate")]
    print("\nOne COMPLETE event (evaluate), as the receiver got it:\n" + json.dumps(sample, indent=2))


@dataclass
class RunningTaskInstance(render_pods.FakeTaskInstance):
    """The fields of a running task instance that the provider's lineage macros read."""

    dag_run: Any = None

    def get_template_context(self) -> dict[str, Any]:
        return {"dag_run": self.dag_run}


def test_a_stage_pod_gets_its_tasks_run_as_parent_and_no_lineage_transport(monkeypatch):
    transport = {"type": "http", "url": "https://lineage.example.com", "auth": {"type": "api_key", "apiKey": "k3y"}}
    monkeypatch.setenv("AIRFLOW__OPENLINEAGE__TRANSPORT", json.dumps(transport))
    monkeypatch.setenv("AIRFLOW__OPENLINEAGE__NAMESPACE", NAMESPACE)
    from genai_dags.pod_operator import StagePodOperator, pod_kwargs

    config = settings.load_file(ROOT / "values/gke/pipeline.yaml")
    op = StagePodOperator(task_id="train_lora", stage="train_lora", **pod_kwargs(config.stage("train_lora"), config))
    when = datetime(2026, 1, 2, tzinfo=UTC)
    ti = RunningTaskInstance(
        dag_id="genai_finetune",
        task_id="train_lora",
        dag_run=SimpleNamespace(logical_date=when, run_after=when, clear_number=0, conf={}),
    )
    context = {"ti": ti, "task_instance": ti, "run_id": ti.run_id, "dag": SimpleNamespace(dag_id="genai_finetune")}
    pod = op.build_pod_request_obj(context, dry_run=True)

    env = {c.name: {v.name: v.value for v in c.env or []} for c in pod.spec.containers}
    namespace, job, run_id = env["base"]["OPENLINEAGE_PARENT_ID"].split("/")
    assert (namespace, job, len(run_id)) == (NAMESPACE, "genai_finetune.train_lora", 36)
    assert env["base"]["OPENLINEAGE_ROOT_PARENT_ID"].startswith(f"{NAMESPACE}/genai_finetune/")
    # Stages get the parent run only: never the transport, whose auth is a secret.
    assert not any("k3y" in str(v) or "lineage.example.com" in str(v) for vs in env.values() for v in vs.values())
    assert not any(name.startswith("OPENLINEAGE") for name in env.get("airflow-xcom-sidecar", {}))
