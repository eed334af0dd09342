"""Faults through Airflow, with the local runtime and real stages: a transient stage failure is
retried and the run succeeds; a user error (bad data) fails at once without burning a retry; killing
a task leaves no process behind; and planted credentials never reach a log, a manifest, XCom or a
report.

Each stage process starts through ``fault_python``, a stand-in for the interpreter (the platform
config's ``local.python``) that can fail a stage's first attempt and records what each stage process
saw in its environment. ``tests/test_dags_local_runtime.py`` has the exit-code and process-group
mechanics with stand-in stages; ``tests/test_pods.py`` the same for pods.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from genai_dags import local_airflow
from genai_dags.local_operator import LocalStageOperator
from genai_dags.render_pods import pipeline_config
from tests.conftest import ROOT
from tests.faults.conftest import tree_hashes
from tests.test_tokenize import doc, tokenizer_model

pytestmark = pytest.mark.faults
__all__ = ["tokenizer_model"]  # the fixture, imported for use here

SECRET_ENV = "AWS_SECRET_ACCESS_KEY"
SECRET = "planted-Secret-0f9e8d7c6b5a"
CONN_SECRET = "planted-Conn-Password-1a2b3c4d"
FAULT_PYTHON = """#!/bin/sh
# Stands in for the stage interpreter: records each stage process's view of the environment, and fails
# the first attempt of $FAIL_STAGE with exit $FAIL_CODE (a transient error: 1; a user error: 2).
stage="$2"
env | cut -d= -f1 | sort | tr '\\n' ' ' >> "$FAULT_DIR/env-of-$stage"; echo >> "$FAULT_DIR/env-of-$stage"
if [ "$stage" = "stages.$FAIL_STAGE" ] && [ ! -e "$FAULT_DIR/failed-once" ]; then
    touch "$FAULT_DIR/failed-once"
    echo "error: connection reset by peer (injected before the stage started)" >&2
    exit "$FAIL_CODE"
fi
exec {python} "$@"
"""


@pytest.fixture
def platform(tmp_path, tokenizer_model, monkeypatch):
    """A local platform config whose stages start through fault_python, with planted credentials."""
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    python = tmp_path / "fault_python"
    python.write_text(FAULT_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    config = tmp_path / "pipeline.yaml"

    def use_base_model(uri: str) -> None:
        config.write_text(
            f"runtime: local\nartifact_root: {tmp_path / 'artifacts'}\nretries: 1\nretry_delay_seconds: 1\n"
            f"base_models: {{tiny: '{uri}'}}\nlocal: {{python: '{python}', workdir: '{ROOT}'}}\n"
        )

    use_base_model(tokenizer_model)  # all that tokenize needs
    monkeypatch.setenv("FAULT_DIR", str(fault_dir))
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(
        "AIRFLOW_CONN_GENAI_STORE",
        json.dumps({"conn_type": "aws", "login": "AKIAPLANTED", "password": CONN_SECRET}),
    )
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(40)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Enter"}\n')
    conf = {
        "model_name": "faults",
        "base_model": "tiny",
        "train_data_uri": str(data),
        "prompts_uri": str(prompts),
        "tokenize": {"block_size": 32},
    }
    local_airflow.migrate()
    return {
        "config": config,
        "use_base_model": use_base_model,
        "conf": conf,
        "faults": fault_dir,
        "root": tmp_path / "artifacts",
        "data": data,
    }


def run_dag(platform: dict, conf: dict, fail_stage: str = "", fail_code: int = 1, mark_success: str = ""):
    os.environ.update({"FAIL_STAGE": fail_stage, "FAIL_CODE": str(fail_code)})
    try:
        dag = local_airflow.load_dag("genai_finetune", platform["config"])
        local_airflow.retire_other_assets(dag)  # an earlier test's artifact root left its asset active
        with pipeline_config(platform["config"]):
            run = dag.test(run_conf=conf, mark_success_pattern=mark_success or None)
    finally:
        for name in ("FAIL_STAGE", "FAIL_CODE"):
            os.environ.pop(name, None)
    from airflow.utils.session import create_session

    with create_session() as session:
        tries = {ti.task_id: ti.try_number for ti in run.get_task_instances(session=session)}
    return run, local_airflow.task_states(run), tries


# Only tokenize runs (the rest is marked done): the retry and error paths are the same for every stage.
DOWNSTREAM = "train_lora|evaluate|quality_gate|batch_infer|publish|promote"


def test_a_transient_stage_failure_is_retried_and_the_run_succeeds(platform, tally, capfd):
    run, states, tries = run_dag(platform, platform["conf"], fail_stage="tokenize", mark_success=DOWNSTREAM)
    logs = capfd.readouterr()
    ok = str(run.state) == "success" and tries["tokenize"] == 2 and (platform["faults"] / "failed-once").exists()
    tally.fault("DAG: a stage fails once (transient)", survived=ok)
    assert (platform["faults"] / "failed-once").exists(), "the fault was not injected"
    assert str(run.state) == "success", states
    assert tries["tokenize"] == 2  # one failure, one retry
    run_id = local_airflow.xcom(run, "plan", key="run_id")
    assert (platform["root"] / "runs" / run_id / "tokenize" / "manifest.json").is_file()
    assert_no_secret_anywhere(platform, logs.out + logs.err, tally)


def test_a_user_error_fails_at_once_without_a_retry(platform, tally):
    empty = platform["data"].parent / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    run, states, tries = run_dag(platform, {**platform["conf"], "train_data_uri": str(empty)})
    ok = str(run.state) == "failed" and states["tokenize"] == "failed" and tries["tokenize"] == 1
    tally.bad_input("DAG: bad data (exit 2)", rejected_cleanly=ok)
    assert states["tokenize"] == "failed" and tries["tokenize"] == 1, (states, tries)  # not retried
    assert states["train_lora"] == "upstream_failed"
    assert str(run.state) == "failed"


@pytest.mark.slow
def test_the_whole_finetune_dag_with_a_transient_training_failure(
    platform, tiny_base_model, folio_corpus, tally, capfd
):
    """Every stage for real; train_lora fails once; no planted secret anywhere afterwards."""
    platform["use_base_model"](tiny_base_model)
    conf = {
        **platform["conf"],
        "train_data_uri": str(folio_corpus),
        "tokenize": {"block_size": 64},
        "train": {"rank": 4, "max_steps": 6, "batch_size": 8},
        "evaluate": {"max_eval_docs": 20, "min_relative_improvement": -1, "num_samples": 1, "sample_max_new_tokens": 4},
        "inference": {"max_new_tokens": 4},
    }
    run, states, tries = run_dag(platform, conf, fail_stage="train_lora")
    logs = capfd.readouterr()
    ok = str(run.state) == "success" and tries["train_lora"] == 2
    tally.fault("DAG: a stage fails once (transient)", survived=ok)
    assert str(run.state) == "success", states
    assert tries["train_lora"] == 2 and all(tries[t] == 1 for t in ("tokenize", "evaluate", "batch_infer", "publish"))
    assert_no_secret_anywhere(platform, logs.out + logs.err, tally)


def assert_no_secret_anywhere(platform: dict, task_logs: str, tally) -> None:
    """The planted credentials: not in the task logs, Airflow's log folder or database (XCom), nor in any
    artifact (manifests, reports, predictions), nor in the environment of any stage process."""
    home = Path(os.environ["AIRFLOW_HOME"])
    places = {"task logs": task_logs.encode()}
    for folder in (home, platform["root"]):
        for rel in tree_hashes(folder):
            places[str(folder / rel)] = (folder / rel).read_bytes()
    env_files = sorted(platform["faults"].glob("env-of-*"))
    leaks = [where for where, data in places.items() for s in (SECRET, CONN_SECRET) if s.encode() in data]
    seen_by_stages = [p.name for p in env_files if "AIRFLOW_CONN_GENAI_STORE" in p.read_text()]
    tally.bad_input("secrets planted (env + connection)", rejected_cleanly=not leaks and not seen_by_stages)
    assert any(p.endswith("manifest.json") for p in places), "no manifest was searched"
    assert env_files, "no stage process started"
    assert not leaks, f"a planted secret is in: {leaks}"
    assert not seen_by_stages, f"an Airflow connection reached the stage processes: {seen_by_stages}"


# ---------------------------------------------------------------------------------------------
# Killing the Airflow task


def test_killing_the_task_checkpoints_the_trainer_and_leaves_no_process(finetune_run, tally):
    """on_kill is what Airflow calls when a task is stopped; the real trainer gets its grace period."""
    from tests.test_train_lora import complete_steps, stage_dir, train_args

    run_id = "faults-task-killed"
    out = stage_dir(finetune_run, run_id)
    op = LocalStageOperator(
        task_id="train_lora",
        stage="train_lora",
        arguments=train_args(finetune_run, run_id),
        workdir=str(ROOT),
        kill_grace_seconds=60,
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(error=_execute(op)), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not complete_steps(out) and time.time() < deadline:
        time.sleep(0.1)
    assert complete_steps(out), "no checkpoint appeared"
    pgid = op._proc.pid
    op.on_kill()
    thread.join(timeout=120)
    try:
        os.killpg(pgid, 0)
        orphans = True
    except ProcessLookupError:
        orphans = False
    error = str(outcome.get("error"))
    ok = not orphans and "exited 143" in error and not (out / "manifest.json").exists()
    tally.fault("DAG: the Airflow task is killed", survived=ok)
    assert not orphans, "processes of the stage are still running"
    assert "exited 143" in error, error  # checkpointed within the grace period, then stopped
    assert not (out / "manifest.json").exists()


def _execute(op: LocalStageOperator) -> BaseException | None:
    try:
        op.execute({})
    except BaseException as exc:
        return exc
    return None


def test_killing_leaves_nothing_even_when_the_stage_ignores_sigterm(tmp_path, tally):
    """A stage that ignores SIGTERM (and its children) is SIGKILLed after the grace period."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/__init__.py").write_text("")
    (tmp_path / "stages/stubborn.py").write_text(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        "print('started', flush=True)\ntime.sleep(600)\n"
    )
    op = LocalStageOperator(task_id="stubborn", stage="stubborn", workdir=str(tmp_path), kill_grace_seconds=1)
    thread = threading.Thread(target=lambda: _execute(op), daemon=True)
    thread.start()
    while op._proc is None:
        time.sleep(0.05)
    time.sleep(1.5)  # the child is started
    pgid = op._proc.pid
    op.on_kill()
    thread.join(timeout=60)
    deadline = time.time() + 10
    orphans = True
    while orphans and time.time() < deadline:
        try:
            os.killpg(pgid, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            orphans = False
    tally.fault("DAG: the Airflow task is killed", survived=not orphans)
    assert not orphans, f"process group {pgid} survived SIGKILL"
    _ = signal  # the signals are sent by the operator
