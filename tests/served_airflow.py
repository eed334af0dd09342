"""Airflow's own components, started as ``make airflow`` starts them, for tests that need a real scheduler.

Unlike ``dag.test()``, the scheduler runs mapped tasks side by side, retries a failed try itself and
creates the runs that asset events schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServedAirflow:
    """Reached through its REST API."""

    url: str
    token: str
    home: Path

    def log_tail(self, chars: int = 3000) -> str:
        return (self.home / "serve.log").read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def serve(pipeline_config: Path, home: Path, env: dict[str, str] | None = None) -> Iterator[ServedAirflow]:
    """api-server, scheduler (LocalExecutor), dag-processor and triggerer under ``pipeline_config``."""
    from genai_dags import trigger
    from genai_dags.settings import ENV_VAR

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **(env or {}), ENV_VAR: str(pipeline_config), "PYTHONPATH": str(ROOT / "dags")}
    command = [sys.executable, "-m", "genai_dags.local_airflow", "serve", "--port", str(port), "--home", str(home)]
    home.mkdir(parents=True, exist_ok=True)
    with (home / "serve.log").open("wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    passwords = home / "simple_auth_manager_passwords.json.generated"
    dag_files = len(list((ROOT / "dags").glob("genai_*.py")))

    def ready() -> str | None:
        """A token once the api-server answers and every DAG is parsed."""
        with contextlib.suppress(trigger.TriggerError, OSError, ValueError):
            token = trigger.login(url, *next(iter(json.loads(passwords.read_text()).items())))
            dags = trigger.request("GET", f"{url}/api/v2/dags?dag_id_pattern=genai_", token=token)
            return token if dags["total_entries"] >= dag_files else None
        return None

    deadline = time.monotonic() + 180
    try:
        while (token := ready()) is None:
            assert proc.poll() is None and time.monotonic() < deadline, (home / "serve.log").read_text()[-3000:]
            time.sleep(1)
        yield ServedAirflow(url, token, home)
    finally:
        proc.send_signal(signal.SIGTERM)  # serve stops every component's process group, workers included
        proc.wait(timeout=60)
