"""genai_finetune and genai_batch_inference through Airflow with the kubernetes runtime on the bed.

Airflow runs the DAG (``dag.test()``, as ``make demo`` does) outside the cluster and reaches it as the
chart's Airflow worker identity (a kubeconfig of its service account token): every stage is a pod from
its own image, admitted by the apiserver (quota, LimitRange, priority classes), placed by the scheduler
on the node pool its description names, run by a kubelet, its result read through the XCom sidecar.
The same conf then runs with the local runtime; the outputs must agree as in the docker tier.

    make test-cluster
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from genai_dags import local_airflow
from tests.cluster.conftest import NODES, STAGE_NAMESPACE, pods_left
from tests.docker.conftest import ROOT

pytestmark = pytest.mark.cluster
STAGE_TASKS = ["tokenize", "train_lora", "evaluate", "batch_infer", "publish"]
REL_TOL = 1e-3  # the images' Python and libraries are built differently from the host's (docker tier)


def seed(root: Path, tiny_base_model: str, folio_corpus: Path) -> None:
    """The inputs every run starts from: the base model and the data, inside the artifact root."""
    if not (root / "base/model").exists():
        shutil.copytree(tiny_base_model.removeprefix("file://"), root / "base/model")
        shutil.copytree(folio_corpus, root / "data/folio")
        prompts = (ROOT / "examples/prompts/folio-prompts.jsonl").read_text().splitlines()[:8]
        (root / "data/prompts.jsonl").write_text("\n".join(prompts) + "\n")
    for path in [root, *root.rglob("*")]:  # the pods' uid writes beside these files
        path.chmod(0o777 if path.is_dir() else 0o666)


def finetune_conf(root: Path, name: str) -> dict:
    return {
        "model_name": name,
        "base_model": "tiny",
        "train_data_uri": str(root / "data/folio"),
        "prompts_uri": str(root / "data/prompts.jsonl"),
        "tokenize": {"block_size": 64},
        "train": {"rank": 4, "max_steps": 8, "batch_size": 8, "learning_rate": 0.003},
        "evaluate": {"max_eval_docs": 30, "min_relative_improvement": -1, "num_samples": 1, "sample_max_new_tokens": 8},
        "inference": {"max_new_tokens": 8},
    }


def local_config(path: Path, root: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "runtime": "local",
                "artifact_root": str(root),
                "retries": 0,
                "base_models": {"tiny": "{artifact_root}/base/model"},
            }
        )
    )
    return path


def numbers(value, prefix: str = "") -> dict[str, float]:
    if isinstance(value, bool) or value is None:
        return {}
    if isinstance(value, int | float):
        return {prefix: float(value)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}.{key}").items()}
    return {}


def stage_files(result: dict) -> dict[str, bytes]:
    folder = Path(result["output_uri"].removeprefix("file://"))
    skip = ("manifest.json", "config.yaml", "config.json")  # they name the root, the image and the timings
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name not in skip}


class PodWatch:
    """Every stage pod the apiserver saw during a run: its name, node and labels (pods are deleted after)."""

    def __init__(self, cluster) -> None:
        import threading

        from kubernetes import watch

        self.pods: dict[str, dict] = {}
        self._watch = watch.Watch()
        core = cluster.core()

        def run() -> None:
            for event in self._watch.stream(core.list_namespaced_pod, STAGE_NAMESPACE, timeout_seconds=3600):
                pod = event["object"]
                seen = self.pods.setdefault(pod.metadata.uid, {"name": pod.metadata.name})
                seen["labels"] = dict(pod.metadata.labels or {})
                seen["node"] = pod.spec.node_name or seen.get("node")
                seen["priority_class"] = pod.spec.priority_class_name

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> list[dict]:
        self._watch.stop()
        return list(self.pods.values())


@pytest.fixture(scope="module")
def finetune(platform, tiny_base_model, folio_corpus, tmp_path_factory) -> dict:
    seed(platform.artifact_root, tiny_base_model, folio_corpus)
    conf = finetune_conf(platform.artifact_root, "folio-cluster")
    watch = PodWatch(platform.cluster)
    local_airflow.migrate()
    run = local_airflow.run_dag("genai_finetune", conf, platform.pipeline_config)
    pods = watch.stop()
    states = local_airflow.task_states(run)
    assert str(run.state) == "success", states
    results = {task: local_airflow.xcom(run, task) for task in STAGE_TASKS}

    local_root = tmp_path_factory.mktemp("local-runtime") / "artifacts"
    local_root.mkdir()
    seed(local_root, tiny_base_model, folio_corpus)
    config = local_config(local_root.parent / "pipeline.yaml", local_root)
    local_run = local_airflow.run_dag("genai_finetune", finetune_conf(local_root, "folio-cluster"), config)
    assert str(local_run.state) == "success", local_airflow.task_states(local_run)
    local = {task: local_airflow.xcom(local_run, task) for task in STAGE_TASKS}
    return {"results": results, "local": local, "pods": pods}


def test_every_stage_ran_as_a_pod_on_its_node_pool(finetune, platform):
    by_stage: dict[str, list[dict]] = {}
    for pod in finetune["pods"]:
        by_stage.setdefault(pod["labels"]["app.kubernetes.io/component"], []).append(pod)
    assert sorted(by_stage) == sorted(s.replace("_", "-") for s in STAGE_TASKS)
    for stage, pods in by_stage.items():
        assert len(pods) == 1, (stage, pods)  # no retries were needed
        expected = NODES["spot"] if stage in ("train-lora", "evaluate", "batch-infer") else NODES["on-demand"]
        assert pods[0]["node"] == expected, (stage, pods[0])
    assert by_stage["train-lora"][0]["labels"]["genai-pipelines.io/capacity"] == "spot"
    assert by_stage["train-lora"][0]["priority_class"] == "genai-training"
    assert pods_left(platform.cluster) == []  # every pod deleted after its task


def test_outputs_equal_the_local_runtime(finetune):
    cluster, local = finetune["results"], finetune["local"]
    assert not any(r["cache_hit"] for r in cluster.values())
    assert stage_files(cluster["tokenize"]) == stage_files(local["tokenize"])  # byte for byte
    for stage in ("train_lora", "evaluate", "batch_infer"):
        assert set(stage_files(cluster[stage])) == set(stage_files(local[stage])), stage
        ours, theirs = numbers(cluster[stage]["metrics"]), numbers(local[stage]["metrics"])
        keys = {k for k in ours if "second" not in k and "time" not in k and "per_s" not in k}
        assert keys, stage
        for key in sorted(keys):
            assert math.isclose(ours[key], theirs[key], rel_tol=REL_TOL, abs_tol=1e-9), (stage, key)


def test_the_published_model_has_lineage_and_predictions(finetune, stage_images):
    published = Path(finetune["results"]["publish"]["metrics"]["uri"].removeprefix("file://"))
    lineage = json.loads((published / "lineage.json").read_text())
    assert stage_images["trainer"] in json.dumps(lineage)  # the image that trained it
    predictions = Path(finetune["results"]["batch_infer"]["output_uri"].removeprefix("file://"))
    assert list(predictions.rglob("*.jsonl"))
