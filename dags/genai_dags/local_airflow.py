"""Run the DAGs through a real Airflow on this machine (SQLite under ``airflow_home/``).

    make airflow     # PYTHONPATH=dags python -m genai_dags.local_airflow serve [--port 8080]

- ``serve`` starts the Airflow components (api-server, scheduler with the LocalExecutor,
  dag-processor, triggerer) as separate process groups with low parallelism, records their PIDs in
  ``airflow_home/pids``, and on Ctrl-C (or SIGTERM) stops every group, children included.
- :func:`run_dag` runs one DAG run through ``dag.test()``: the real scheduling logic (params
  validation, dependencies, retries, XCom, callbacks) with every task in this process; each stage
  task still starts its stage as a subprocess. ``make demo`` and the tests use it.

Call :func:`configure` before anything imports ``airflow``: Airflow reads its home at import time.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from genai_dags.settings import ENV_VAR, REPO_ROOT

DAGS_DIR = REPO_ROOT / "dags"


def airflow_env(home: Path) -> dict[str, str]:
    """The environment of a small local Airflow: SQLite, these DAGs, no examples, low parallelism."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        # Four task slots: the stages use every core anyway; Airflow's default of 32 costs gigabytes.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # Store every parse of a DAG: with Airflow's default (at most one write per 30 s), a DAG parsed again
        # under another pipeline config within 30 s would run as the stale version (old outlets, old args).
        "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "0",
        "AIRFLOW__API__BASE_URL": os.environ.get("AIRFLOW__API__BASE_URL", "http://localhost:8080"),
    }


def configure(home: str | os.PathLike) -> Path:
    """Use ``home`` as AIRFLOW_HOME for this process (and the stage subprocesses it starts)."""
    home = Path(home).resolve()
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(home):
        raise RuntimeError("genai_dags.local_airflow.configure() must run before airflow is imported")
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(airflow_env(home))
    return home


def configure_for_tests() -> Path:
    """One throw-away AIRFLOW_HOME per test process (every test module calls this before importing airflow)."""
    import tempfile

    return configure(Path(tempfile.gettempdir()) / f"genai-airflow-tests-{os.getpid()}")


def migrate() -> None:
    """Create or upgrade the metadata database (about 5 s on SQLite; a no-op when it is current)."""
    from airflow.utils import db

    db.upgradedb()


def load_dag(dag_id: str, config: str | os.PathLike | None = None) -> Any:
    from genai_dags.render_pods import load_dags

    return load_dags(config)[dag_id]


def run_dag(dag_id: str, conf: dict[str, Any], config: str | os.PathLike | None = None) -> Any:
    """One DAG run through Airflow under the given pipeline config; returns the finished DagRun."""
    from genai_dags.render_pods import pipeline_config

    dag = load_dag(dag_id, config)
    retire_other_assets(dag)
    # The tasks run in this process and read the config again when they are parsed for execution.
    with pipeline_config(config if config is not None else os.environ.get(ENV_VAR)):
        return dag.test(run_conf=conf)


def retire_other_assets(dag: Any) -> None:
    """Deactivate assets that share a name with this DAG's outlets but not its URI (another config's).

    The DAG processor retires assets that no DAG declares any more; ``dag.test()`` does not, so after
    a run under another artifact root the asset ``genai_models`` would stay bound to the old URI and
    the new run's publish task would be refused for an inactive outlet.
    """
    from airflow.models.asset import AssetActive
    from airflow.sdk import Asset
    from airflow.utils.session import create_session

    outlets = [o for task in dag.tasks for o in (getattr(task, "outlets", None) or []) if isinstance(o, Asset)]
    with create_session() as session:
        for asset in outlets:
            session.query(AssetActive).filter(AssetActive.name == asset.name, AssetActive.uri != asset.uri).delete()


COMPONENTS = {
    "api-server": ["api-server", "--port", "{port}"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}


def serve(port: int = 8080, home: Path = REPO_ROOT / "airflow_home") -> int:
    """Start Airflow's components, wait, and stop all of them (and their children) on Ctrl-C or SIGTERM."""
    import signal
    import subprocess
    import time

    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **airflow_env(home),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "True",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(DAGS_DIR), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault(ENV_VAR, str(REPO_ROOT / "values" / "local" / "pipeline.yaml"))
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    (home / "logs").mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name, args in COMPONENTS.items():
        log = (home / "logs" / f"{name}.log").open("ab")
        # Each component leads its own process group, so stopping it also stops the workers it forked.
        procs[name] = subprocess.Popen(
            [airflow, *(a.format(port=port) for a in args)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (home / "pids").write_text("".join(f"{name} {p.pid}\n" for name, p in procs.items()))
    password_file = home / "simple_auth_manager_passwords.json.generated"
    print(f"Airflow is starting on http://localhost:{port} (config {env[ENV_VAR]}; logs {home / 'logs'})")
    print(f"  user admin, password in {password_file} once the api-server is up")
    print("  trigger a run:  make trigger CONF=examples/finetune-demo.json     stop: Ctrl-C")
    try:
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; see {home / 'logs' / (name + '.log')}")
                    stopping = True
            time.sleep(0.5)
    finally:
        print("stopping Airflow ...")
        for proc in procs.values():
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers: forked workers, stuck task processes
            proc.wait()
        (home / "pids").unlink(missing_ok=True)
        print("stopped")
    return 0


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, sig)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="start Airflow on this machine until Ctrl-C")
    serve_parser.add_argument("--port", type=int, default=8080)
    serve_parser.add_argument("--home", type=Path, default=REPO_ROOT / "airflow_home", help="AIRFLOW_HOME")
    args = parser.parse_args(argv)
    return serve(port=args.port, home=args.home)


def task_states(dag_run: Any) -> dict[str, str]:
    """``{task_id (or task_id[map_index]): state}`` of a finished run."""
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = dag_run.get_task_instances(session=session)
        return {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state) for ti in tis}


def xcom(dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, key=key, map_index=map_index)
            .one_or_none()
        )
        return None if row is None else XComModel.deserialize_value(row)


if __name__ == "__main__":
    sys.exit(main())
