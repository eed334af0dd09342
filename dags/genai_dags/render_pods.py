"""Render, offline, the pod every stage task would create under a pipeline config: review it before deploying.

    PYTHONPATH=dags python -m genai_dags.render_pods values/gke/pipeline.yaml [--try-number 4] > pods.yaml

Loads the DAGs under that config, feeds each stage task the arguments its ``plan`` task would
produce for the example confs in ``examples/``, renders its templates and builds the pod with
``build_pod_request_obj(context, dry_run=True)``: no cluster, no kubeconfig. The tests validate
these pods against the strict Kubernetes schema; the chart's tests can compare node pools with them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genai_dags import planner
from genai_dags.settings import ENV_VAR, REPO_ROOT, PipelineSettings

DAGS_DIR = REPO_ROOT / "dags"
EXAMPLES_DIR = REPO_ROOT / "examples"


@contextlib.contextmanager
def pipeline_config(path: str | os.PathLike | None) -> Iterator[None]:
    """Point ``GENAI_PIPELINE_CONFIG`` at ``path`` (None: the embedded default) for the duration."""
    old = os.environ.get(ENV_VAR)
    if path is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def load_dags(config: str | os.PathLike | None = None) -> dict[str, Any]:
    """Parse the DAG folder the way the DAG processor does, under the given pipeline config."""
    from airflow.dag_processing.dagbag import BundleDagBag

    with pipeline_config(config):
        bag = BundleDagBag(dag_folder=str(DAGS_DIR), bundle_path=str(DAGS_DIR), bundle_name="genai-render")
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.dags


@dataclass
class FakeTaskInstance:
    """The few task-instance fields that rendering and pod labels read."""

    dag_id: str
    task_id: str
    try_number: int = 1
    map_index: int = -1
    run_id: str = "manual__render"
    xcoms: dict[tuple[str, str], Any] = field(default_factory=dict)

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value", **_: Any) -> Any:
        return self.xcoms.get((task_ids or "", key))

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[(self.task_id, key)] = value


def example_conf(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES_DIR / name).read_text())


def plan_arguments(dag_id: str, settings: PipelineSettings, conf: dict[str, Any], params: Any) -> dict[str, Any]:
    """What the DAG's plan task returns for ``conf`` (the published model is faked for batch inference)."""
    resolved = {**{k: p.value for k, p in params.items()}, **conf}
    inputs = {"render": "example"}  # no files are listed: the run id only has to be stable
    if dag_id == "genai_finetune":  # as many tokenize shards as the conf asks for (0: one, no input is listed)
        return planner.finetune_plan(resolved, settings, inputs, tokenize_shards=resolved["tokenize_shards"] or 1)
    lineage = {"base_model": settings.base_models.get("tiny-shakespeare", f"{settings.artifact_root}/base")}
    return planner.batch_plan(resolved, settings, inputs, lineage, records=resolved["records_per_shard"] * 3)


# The plan's key of each mapped task's argument lists, where it is not the stage's name.
MAPPED_PLAN_KEYS = {"tokenize_shard": "tokenize_shards"}


def stage_tasks(dag: Any, settings: PipelineSettings, conf: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(name, operator) for every stage task with its arguments filled in; mapped tasks once per shard."""
    plan = plan_arguments(dag.dag_id, settings, conf, dag.params)
    for task in dag.tasks:
        stage = getattr(task, "stage", None) or (task.partial_kwargs.get("stage") if task.is_mapped else None)
        if stage is None:
            continue
        if task.is_mapped:
            for index, arguments in enumerate(plan[MAPPED_PLAN_KEYS.get(task.task_id, stage)]):
                op = task.unmap({"arguments": arguments})
                yield f"{task.task_id}[{index}]", op
        else:
            op = copy.deepcopy(task)
            op.arguments = plan[stage]
            yield task.task_id, op


def render_pod(op: Any, dag: Any, try_number: int = 1, map_index: int = -1) -> dict[str, Any]:
    """Render the operator's templates, then build its pod offline, in the Kubernetes API's JSON form."""
    from kubernetes.client import ApiClient

    ti = FakeTaskInstance(dag_id=dag.dag_id, task_id=op.task_id, try_number=try_number, map_index=map_index)
    context = {"ti": ti, "task_instance": ti, "dag": dag, "run_id": ti.run_id, "params": {}, "task": op}
    op.render_template_fields(context)
    pod = op.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def render_all(config: str | os.PathLike, try_number: int = 1) -> dict[str, dict[str, Any]]:
    """``{"<dag_id>.<task>": pod}`` for every stage task of every DAG under ``config``."""
    from genai_dags.settings import load_file

    settings = load_file(config)
    confs = {
        "genai_finetune": example_conf("finetune-demo.json"),
        "genai_batch_inference": example_conf("batch-inference.json"),
    }
    pods = {}
    for dag_id, dag in sorted(load_dags(config).items()):
        if dag_id not in confs:  # genai_promote: no stage tasks, no pods
            continue
        for name, op in stage_tasks(dag, settings, confs[dag_id]):
            map_index = int(name.rsplit("[", 1)[1].rstrip("]")) if "[" in name else -1
            pods[f"{dag_id}.{name}"] = render_pod(op, dag, try_number=try_number, map_index=map_index)
    return pods


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="pipeline config YAML (values/<target>/pipeline.yaml)")
    parser.add_argument("--try-number", type=int, default=1, help="which try to render (the last one is on-demand)")
    args = parser.parse_args(argv)
    # Only the YAML goes to stdout: Airflow logs to stdout through handlers made before we could redirect
    # sys.stdout, so the file descriptor itself points at stderr while the DAGs load and the pods render.
    sys.stdout.flush()
    stdout_fd = sys.stdout.fileno()
    saved = os.dup(stdout_fd)
    os.dup2(sys.stderr.fileno(), stdout_fd)
    try:
        pods = render_all(args.config, args.try_number)
    finally:
        sys.stdout.flush()
        os.dup2(saved, stdout_fd)
        os.close(saved)
    yaml.safe_dump_all(list(pods.values()), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
