"""The local runtime: a stage as a subprocess with live logs, exit codes respected, and nothing left behind.

The stages here are stand-ins written to a temporary ``stages`` package (the operator runs
``python -m stages.<name>`` in its working directory), so each behaviour is exact and fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from genai_dags.local_operator import LocalStageOperator
from genai_dags.stage_contract import StageUserError

ROOT = Path(__file__).resolve().parents[1]

FAKE_STAGES = {
    "echo": """
        import json, os, sys
        print("loading config", file=sys.stderr, flush=True)
        print("working on", " ".join(sys.argv[1:]), flush=True)
        result = {"stage": "echo", "cache_hit": False, "output_uri": "file:///out", "manifest_uri": "file:///m",
                  "metrics": {"args": sys.argv[1:]}}
        if os.environ.get("STAGE_RESULT_PATH"):
            open(os.environ["STAGE_RESULT_PATH"], "w").write(json.dumps(result))
        print(json.dumps(result))
    """,
    "stdout_only": """
        import json
        print('{"not": "the result"}')
        print(json.dumps({"stage": "stdout_only", "cache_hit": True, "output_uri": "u", "manifest_uri": "m",
                          "metrics": {}}))
    """,
    "user_error": """
        import sys
        print("error: user_error: input_uri='/nope' does not exist", file=sys.stderr)
        sys.exit(2)
    """,
    "crash": """
        raise RuntimeError("a bug in the stage")
    """,
    "silent": """
        pass
    """,
    # Starts a grandchild (like a tokenizer worker pool), records both pids, then works "forever".
    "sleeper": """
        import os, signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.environ["PIDS_FILE"], "w").write(f"{os.getpid()} {child.pid}")
        print("started", flush=True)
        time.sleep(600)
    """,
    # Checkpoints on SIGTERM like the trainer, then exits 143.
    "checkpointer": """
        import os, signal, sys, time
        def on_term(signum, frame):
            open(os.environ["PIDS_FILE"] + ".checkpoint", "w").write("saved")
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        open(os.environ["PIDS_FILE"], "w").write(f"{os.getpid()}")
        print("training", flush=True)
        time.sleep(600)
    """,
}


@pytest.fixture
def workdir(tmp_path):
    package = tmp_path / "stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, code in FAKE_STAGES.items():
        (package / f"{name}.py").write_text(textwrap.dedent(code))
    return tmp_path


def operator(stage: str, workdir: Path, **kwargs) -> LocalStageOperator:
    return LocalStageOperator(task_id=stage, stage=stage, workdir=str(workdir), kill_grace_seconds=5, **kwargs)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def gone(pids: list[int], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


class RecordingLog:
    """Stands in for the task logger (Airflow's structlog logger does not go through caplog)."""

    def __init__(self):
        self.lines: list[str] = []

    def _record(self, message, *args, **_):
        self.lines.append(message % args if args else message)

    info = warning = error = debug = exception = _record


def test_runs_the_stage_streams_its_output_and_returns_its_result(workdir):
    op = operator("echo", workdir, arguments=["run_id=r1", "artifact_root=/tmp/x"])
    op._cached_logger = RecordingLog()
    result = op.execute({})
    assert result["stage"] == "echo"
    assert result["metrics"]["args"] == ["run_id=r1", "artifact_root=/tmp/x"]
    logged = "\n".join(op._cached_logger.lines)
    assert "loading config" in logged and "working on run_id=r1 artifact_root=/tmp/x" in logged
    assert "python" in logged and "-m stages.echo run_id=r1" in logged  # the exact command is logged


def test_without_a_result_file_the_last_json_line_of_stdout_is_the_result(workdir):
    assert operator("stdout_only", workdir).execute({})["cache_hit"] is True


def test_exit_2_is_the_users_mistake_and_is_not_retried(workdir):
    with pytest.raises(StageUserError, match=r"exit 2, not retried\): error: user_error: input_uri='/nope'"):
        operator("user_error", workdir).execute({})
    assert issubclass(StageUserError, AirflowFailException)  # Airflow fails such a task without retrying


def test_any_other_failure_is_an_ordinary_failure_that_airflow_retries(workdir):
    with pytest.raises(AirflowException) as exc:
        operator("crash", workdir).execute({})
    assert not isinstance(exc.value, AirflowFailException)
    assert "exited 1" in str(exc.value) and "a bug in the stage" in str(exc.value)


def test_a_stage_that_prints_no_result_fails(workdir):
    with pytest.raises(AirflowException, match="printed no JSON result"):
        operator("silent", workdir).execute({})


def run_in_thread(op: LocalStageOperator) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = op.execute({})
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_killing_the_task_kills_the_stage_and_its_children(workdir, tmp_path, monkeypatch):
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    op = operator("sleeper", workdir)
    thread, outcome = run_in_thread(op)
    pids = [int(p) for p in wait_for(pids_file).split()]
    assert all(alive(p) for p in pids)

    op.on_kill()

    assert gone(pids), f"orphans left: {[p for p in pids if alive(p)]}"
    thread.join(timeout=30)
    assert isinstance(outcome.get("error"), AirflowException)


def test_sigterm_gives_the_stage_its_grace_period_to_checkpoint(workdir, tmp_path, monkeypatch):
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    op = operator("checkpointer", workdir)
    thread, outcome = run_in_thread(op)
    (pid,) = [int(p) for p in wait_for(pids_file).split()]
    op.on_kill()
    thread.join(timeout=30)
    assert Path(f"{pids_file}.checkpoint").read_text() == "saved"
    assert "exited 143" in str(outcome["error"])
    assert not alive(pid)


HARNESS = """
import json, os, signal, sys
sys.path.insert(0, {dags!r})
from genai_dags import local_airflow
local_airflow.configure({home!r})
from genai_dags.local_operator import LocalStageOperator
op = LocalStageOperator(task_id="sleeper", stage="sleeper", workdir={workdir!r}, kill_grace_seconds=5)
# Exactly what Airflow's task runner does on SIGTERM (airflow.sdk.execution_time.task_runner._on_term).
signal.signal(signal.SIGTERM, lambda signum, frame: op.on_kill())
try:
    op.execute({{}})
except Exception as exc:
    print("task failed:", exc, flush=True)
    sys.exit(1)
"""


def test_a_task_process_terminated_by_airflow_leaves_no_orphan(workdir, tmp_path):
    """The worker sends SIGTERM to the task process; the stage and its children must all go."""
    pids_file = tmp_path / "pids"
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS.format(dags=str(ROOT / "dags"), home=os.environ["AIRFLOW_HOME"], workdir=str(workdir)))
    task = subprocess.Popen(
        [sys.executable, str(harness)],
        env={**os.environ, "PIDS_FILE": str(pids_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        pids = [int(p) for p in wait_for(pids_file, timeout=120).split()]
        task.send_signal(signal.SIGTERM)
        out, _ = task.communicate(timeout=60)
    finally:
        task.kill()
    assert task.returncode == 1, out
    assert "task failed: stage sleeper exited" in out
    assert gone(pids), f"orphans left: {[p for p in pids if alive(p)]}"


def test_a_timed_out_task_leaves_no_orphan(workdir, tmp_path, monkeypatch):
    """Airflow's execution_timeout raises inside execute (SIGALRM); the stage group is stopped on the way out."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    pids_file = tmp_path / "pids"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    op = operator("sleeper", workdir)

    def on_alarm(signum, frame):
        raise AirflowTaskTimeout("timed out")

    old = signal.signal(signal.SIGALRM, on_alarm)
    threading.Thread(
        target=lambda: (wait_for(pids_file), signal.setitimer(signal.ITIMER_REAL, 0.2)), daemon=True
    ).start()
    try:
        with pytest.raises(AirflowTaskTimeout):
            op.execute({})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pids = [int(p) for p in pids_file.read_text().split()]
    assert gone(pids), f"orphans left: {[p for p in pids if alive(p)]}"


def test_the_result_file_wins_over_stdout(workdir):
    result = operator("echo", workdir, arguments=["a=b"]).execute({})
    assert json.dumps(result["metrics"]) == json.dumps({"args": ["a=b"]})
