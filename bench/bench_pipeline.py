"""pipeline: genai_finetune through Airflow (local runtime) vs the same stages chained as plain commands.

    python -m bench.run --only pipeline

Sides (each its own process, timed from its start to its end by the parent):

- ``airflow``: what ``make demo`` does (``dags/genai_dags/demo.py``): configure a local Airflow home
  (SQLite), ``migrate`` (a no-op check once the database exists; the bench creates it beforehand,
  untimed), parse the DAGs, and run one ``genai_finetune`` run with ``dag.test()``
  (``genai_dags.local_airflow.run_dag``); every stage task starts ``python -m stages.<name>`` as a
  subprocess. The run conf names a fresh ``run_id``, so no stage is a cache hit.
- ``plain``: the same five stage commands with the same arguments, built by the same planning code the
  DAG's ``plan`` task calls (``genai_dags.planner.finetune_plan``), run one after another.

The difference of the two wall times is what Airflow adds: interpreter and Airflow imports, DAG
parsing, scheduling, task start-up, XCom, the quality-gate task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_ROOT, ROOT, child_env, child_main

DAGS = ROOT / "dags"
AIRFLOW_HOME = BENCH_ROOT / "airflow_home"
PIPELINE_ROOT = BENCH_ROOT / "pipeline"  # artifact_root of both sides' runs


def write_config(tiny_base: Path) -> Path:
    """The platform config of the bench: the local runtime, artifacts under artifacts/bench/pipeline."""
    path = BENCH_ROOT / "pipeline.yaml"
    path.write_text(
        "# Platform config of `make bench`'s pipeline row (bench/bench_pipeline.py); see dags/README.md.\n"
        "runtime: local\n"
        f"artifact_root: {PIPELINE_ROOT}\n"
        "allowed_uri_schemes: [file]\n"
        "base_models:\n"
        f"  tiny-shakespeare: file://{tiny_base}\n"
        "retries: 0\n"
    )
    return path


def conf(run_id: str, data: Path, prompts: Path) -> dict[str, Any]:
    """examples/finetune-demo.json, shorter training and evaluation, gate always passing, fresh run id."""
    demo = json.loads((ROOT / "examples" / "finetune-demo.json").read_text())
    demo.update(
        run_id=run_id,
        model_name="bench-folio",
        train_data_uri=str(data),
        prompts_uri=str(prompts),
        base_model="tiny-shakespeare",
    )
    demo["train"] = {**demo.get("train", {}), "max_steps": 20}
    demo["evaluate"] = {**demo.get("evaluate", {}), "max_eval_docs": 50, "min_relative_improvement": -1}
    return demo


def _dags_env(config: Path) -> None:
    sys.path.insert(0, str(DAGS))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DAGS), os.environ.get("PYTHONPATH")]))
    os.environ["GENAI_PIPELINE_CONFIG"] = str(config)


def migrate(params: dict[str, Any]) -> dict[str, Any]:
    """Create the bench's Airflow database (untimed setup, as after a first `make demo`)."""
    _dags_env(Path(params["config"]))
    from genai_dags import local_airflow

    local_airflow.configure(AIRFLOW_HOME)
    local_airflow.migrate()
    return {}


def airflow(params: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    _dags_env(Path(params["config"]))
    from genai_dags import local_airflow

    local_airflow.configure(AIRFLOW_HOME)
    local_airflow.migrate()
    run = local_airflow.run_dag("genai_finetune", params["conf"], params["config"])
    states = local_airflow.task_states(run)
    if str(run.state) != "success":
        raise RuntimeError(f"genai_finetune ended {run.state}: {states}")
    return {"seconds": time.perf_counter() - started, "state": str(run.state), "tasks": states}


def plain(params: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    _dags_env(Path(params["config"]))
    from genai_dags import planner
    from genai_dags.settings import load_file

    settings = load_file(params["config"])
    plan = planner.finetune_plan(params["conf"], settings, inputs={})
    stage_seconds = {}
    for stage in ("tokenize", "train_lora", "evaluate", "batch_infer", "publish"):
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", *plan[stage]],
            cwd=ROOT,
            env=child_env(),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        stage_seconds[stage] = round(time.perf_counter() - t, 2)
    return {"seconds": time.perf_counter() - started, "stage_seconds": stage_seconds}


SIDES = {"migrate": migrate, "airflow": airflow, "plain": plain}

if __name__ == "__main__":
    sys.exit(child_main(SIDES))
