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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from genai_dags import local_airflow
from tests.cluster.conftest import NODES, STAGE_NAMESPACE, pods_left, seed
from tests.docker.conftest import numbers

pytestmark = pytest.mark.cluster
STAGE_TASKS = ["tokenize", "train_lora", "evaluate", "batch_infer", "publish"]
REL_TOL = 1e-3  # the images' Python and libraries are built differently from the host's (docker tier)


def finetune_conf(root: Path, name: str) -> dict:
    return {
        "model_name": name,
        "base_model": "tiny",
        "train_data_uri": str(root / "data/folio"),
        "prompts_uri": str(root / "data/prompts.jsonl"),
        "tokenize": {"block_size": 64},
        # Long enough (tens of seconds in a pod) for the preemption test to strike mid-training.
        "train": {"rank": 4, "max_steps": 400, "batch_size": 8, "learning_rate": 0.003},
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


def stage_files(result: dict) -> dict[str, bytes]:
    folder = Path(result["output_uri"].removeprefix("file://"))
    skip = ("manifest.json", "config.yaml", "config.json")  # they name the root, the image and the timings
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name not in skip}


class PodWatch:
    """Every stage pod the apiserver saw during a run (pods are deleted after): its name, node, labels, when
    it was bound to a node and when its stage container ran and ended (``placed``, ``running``, ``ended``:
    monotonic seconds). ``on_running`` is called with each pod once its container runs."""

    def __init__(self, cluster, on_running=None) -> None:
        import threading
        import time

        from kubernetes import watch

        self.pods: dict[str, dict] = {}
        self.error: Exception | None = None
        self._stopped = False
        self.since = datetime.now(UTC) - timedelta(seconds=1)  # not the last run's terminating pods
        self._watch = watch.Watch()
        core = cluster.core()

        def run() -> None:
            stream = self._watch.stream(
                core.list_namespaced_pod, STAGE_NAMESPACE, label_selector="app.kubernetes.io/name=genai-stage"
            )
            try:
                for event in stream:
                    pod = event["object"]
                    if pod.metadata.creation_timestamp < self.since:
                        continue
                    seen = self.pods.setdefault(pod.metadata.uid, {"name": pod.metadata.name})
                    seen["labels"] = dict(pod.metadata.labels or {})
                    seen["node"] = pod.spec.node_name or seen.get("node")
                    if seen["node"] and "placed" not in seen:
                        seen["placed"] = time.monotonic()
                    seen["priority_class"] = pod.spec.priority_class_name
                    base = next((c for c in pod.status.container_statuses or [] if c.name == "base"), None)
                    state = base.state if base else None
                    if state and state.running and "running" not in seen:
                        seen["running"] = time.monotonic()
                        if on_running:
                            on_running(pod)
                    if (state and state.terminated) or event["type"] == "DELETED":
                        seen.setdefault("ended", time.monotonic())
            except Exception as exc:  # the stream also ends this way when stop() closes it
                self.error = None if self._stopped else exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> list[dict]:
        self._stopped = True
        self._watch.stop()
        assert self.error is None, f"the pod watch failed: {self.error!r}"
        return list(self.pods.values())


@pytest.fixture(scope="module")
def finetune(platform, bed_inputs, tiny_base_model, folio_corpus, tmp_path_factory) -> dict:
    conf = finetune_conf(platform.artifact_root, "folio-cluster")
    watch = PodWatch(platform.cluster)
    run = local_airflow.run_dag("genai_finetune", conf, platform.pipeline_config)
    pods = watch.stop()
    states = local_airflow.task_states(run)
    assert str(run.state) == "success", states
    results = {task: local_airflow.xcom(run, task) for task in STAGE_TASKS}
    ran = [ti for ti in run.get_task_instances() if ti.start_date and ti.end_date]  # not the skipped shards
    for ti in sorted(ran, key=lambda ti: ti.start_date):
        print(f"cluster stage time: {ti.task_id} {(ti.end_date - ti.start_date).total_seconds():.1f} s")

    local_root = tmp_path_factory.mktemp("local-runtime") / "artifacts"
    local_root.mkdir()
    seed(local_root, tiny_base_model, folio_corpus)
    config = local_config(local_root.parent / "pipeline.yaml", local_root)
    local_run = local_airflow.run_dag("genai_finetune", finetune_conf(local_root, "folio-cluster"), config)
    assert str(local_run.state) == "success", local_airflow.task_states(local_run)
    local = {task: local_airflow.xcom(local_run, task) for task in STAGE_TASKS}
    return {"results": results, "local": local, "pods": pods, "local_root": local_root, "local_config": config}


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


# ---- Spot preemption, for real: the kubelet's SIGTERM on delete, and an eviction by a node drain ----


class Preemptor:
    """Strikes each spot try of train_lora once it trains: try 1 is deleted, try 2 evicted by a drain."""

    def __init__(self, cluster) -> None:
        import threading

        self.cluster = cluster
        self.core = cluster.core()
        self.logs: dict[int, str] = {}  # try number -> the pod's whole log
        self.nodes: dict[int, str] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _train_pod(self, try_number: int, timeout: float = 600):
        import time

        deadline = time.monotonic() + timeout
        selector = f"app.kubernetes.io/component=train-lora,try_number={try_number}"
        while time.monotonic() < deadline:
            pods = self.core.list_namespaced_pod(STAGE_NAMESPACE, label_selector=selector).items
            if pods and pods[0].status.phase == "Running":
                return pods[0]
            time.sleep(0.3)
        raise TimeoutError(f"no running train_lora pod for try {try_number}")

    def _log(self, name: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            log = self.core.read_namespaced_pod_log(name, STAGE_NAMESPACE, container="base")
        except ApiException:
            return None  # gone
        # Once the container is removed the kubelet answers "unable to retrieve container logs".
        return log if "[train_lora]" in log else ""

    def _strike(self, try_number: int, strike) -> None:
        import time

        pod = self._train_pod(try_number)
        self.nodes[try_number] = pod.spec.node_name
        while "tokens/s" not in (self._log(pod.metadata.name) or ""):  # a step was trained
            time.sleep(0.2)
        strike(pod)
        while (log := self._log(pod.metadata.name)) is not None:  # until the kubelet has stopped it
            self.logs[try_number] = max(log, self.logs.get(try_number, ""), key=len)
            time.sleep(0.2)

    def _drain(self, pod) -> None:
        node = pod.spec.node_name
        self.core.patch_node(node, {"spec": {"unschedulable": True}})  # cordon, then evict (kubectl drain)
        eviction = {
            "apiVersion": "policy/v1beta1",
            "kind": "Eviction",
            "metadata": {"name": pod.metadata.name, "namespace": STAGE_NAMESPACE},
        }
        path = f"/api/v1/namespaces/{STAGE_NAMESPACE}/pods/{pod.metadata.name}/eviction"
        answer = self.cluster.request("POST", path, body=eviction)  # policy/v1beta1: the client speaks only v1
        assert answer.status_code < 300, answer.text

    def _run(self) -> None:
        try:
            self._strike(1, lambda pod: self.core.delete_namespaced_pod(pod.metadata.name, STAGE_NAMESPACE))
            self._strike(2, self._drain)
            last = self._train_pod(3)
            # The spot pool has capacity again (a new node, in a cloud) for the stages after training.
            self.core.patch_node(NODES["spot"], {"spec": {"unschedulable": False}})
            self.nodes[3] = last.spec.node_name
        except BaseException as exc:  # reported by the test
            self.error = exc

    def join(self) -> None:
        self._thread.join(timeout=60)
        assert self.error is None, self.error


def steps(log: str, pattern: str) -> list[int]:
    import re

    return [int(m) for m in re.findall(pattern, log)]


@pytest.fixture(scope="module")
def preempted(platform, finetune, tmp_path_factory) -> dict:
    config = yaml.safe_load(platform.pipeline_config.read_text())
    config["retries"] = 2  # tries 1 and 2 on spot, try 3 (the last) on on-demand
    path = tmp_path_factory.mktemp("preemption") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    preemptor = Preemptor(platform.cluster)
    try:
        run = local_airflow.run_dag("genai_finetune", finetune_conf(platform.artifact_root, "folio-preempted"), path)
    finally:
        platform.cluster.core().patch_node(NODES["spot"], {"spec": {"unschedulable": False}})  # uncordon
    preemptor.join()
    assert str(run.state) == "success", local_airflow.task_states(run)
    return {"run": run, "preemptor": preemptor, "result": local_airflow.xcom(run, "train_lora")}


def test_a_preempted_training_resumes_and_ends_bitwise_equal(preempted, finetune, platform):
    preemptor = preempted["preemptor"]
    assert preemptor.nodes == {1: NODES["spot"], 2: NODES["spot"], 3: NODES["on-demand"]}
    redone = []
    for try_number in (1, 2):
        log = preemptor.logs[try_number]
        assert "SIGTERM received" in log, log[-2000:]
        saved = steps(log, r"checkpoint saved at step (\d+)")
        assert saved, log[-2000:]
        redone.append(saved[-1])
    resumed = []
    # Try 2 resumed from try 1's SIGTERM checkpoint; try 3 from try 2's (its log is in the task log).
    resumed += steps(preemptor.logs[2], r"resumed from checkpoint at step (\d+)")
    assert resumed == [redone[0]], (resumed, redone)  # no step trained twice
    print(f"preemptions: SIGTERM checkpoints at steps {redone}; try 2 resumed at {resumed[0]} (0 steps redone)")
    ours = Path(preempted["result"]["output_uri"].removeprefix("file://"))
    uninterrupted = Path(finetune["results"]["train_lora"]["output_uri"].removeprefix("file://"))
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (ours / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert pods_left(platform.cluster) == []


# ---- Batch inference: the published model's shards as mapped pods, merged like the local runtime's ----


def most_at_once(pods: list[dict]) -> int:
    """The largest number of these pods that were on a node at the same moment (admitted, bound, not ended)."""
    edges = sorted([(p["placed"], 1) for p in pods] + [(p["ended"], -1) for p in pods], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def test_batch_inference_shards_run_as_parallel_pods_and_merge_like_the_local_runtime(
    finetune, platform, served_airflow
):
    """Through Airflow's own scheduler (LocalExecutor): the shards run side by side; one shard's pod is deleted
    as soon as it runs (a spot node lost), and the scheduler retries that shard alone."""
    from genai_dags import trigger

    def batch_conf(result: dict, root: Path) -> dict:
        return {
            "model_name": "folio-cluster",
            "version": result["metrics"]["version"],
            "prompts_uri": str(root / "data/prompts.jsonl"),
            "records_per_shard": 2,
            "max_shards": 4,
            "inference": {"max_new_tokens": 8},
        }

    struck: list = []

    def strike_first_shard(pod) -> None:
        if pod.metadata.labels["app.kubernetes.io/component"] == "batch-infer" and not struck:
            struck.append(pod)
            platform.cluster.core().delete_namespaced_pod(pod.metadata.name, STAGE_NAMESPACE)

    watch = PodWatch(platform.cluster, on_running=strike_first_shard)
    url, token, dag = served_airflow.url, served_airflow.token, "genai_batch_inference"
    conf = batch_conf(finetune["results"]["publish"], platform.artifact_root)
    run_id = trigger.trigger(url, dag, conf, token)["dag_run_id"]
    run = trigger.wait(url, dag, run_id, token, poll_seconds=2, timeout=900)
    pods = watch.stop()
    tries = {
        (ti["task_id"], ti["map_index"]): (ti["state"], ti["try_number"])
        for ti in trigger.task_instances(url, dag, run_id, token)
    }
    assert run["state"] == "success", tries
    shards = [p for p in pods if p["labels"]["app.kubernetes.io/component"] == "batch-infer"]
    assert len(shards) == 5 and {p["node"] for p in shards} == {NODES["spot"]}, shards  # 4 shards, 1 retried
    at_once = most_at_once(shards)
    print(f"batch inference on the cluster: at most {at_once} of 4 shard pods ran at once")
    assert at_once >= 2, shards
    shard_tries = sorted(t for (task, _), (_, t) in tries.items() if task == "batch_infer")
    assert shard_tries == [1, 1, 1, 2], tries  # the scheduler retried the struck shard, only that one
    (deleted,) = struck
    assert tries[("batch_infer", int(deleted.metadata.labels["map_index"]))] == ("success", 2), tries
    # The stage stopped on SIGTERM at once rather than being SIGKILLed at the end of its grace period (the
    # 1.20 kubelet leaves a deleted pod's container statuses as they were, so its exit code is not seen).
    gone = next(p for p in shards if p["name"] == deleted.metadata.name)
    grace = yaml.safe_load(platform.pipeline_config.read_text())["kubernetes"]["termination_grace_seconds"]
    print(f"the deleted shard pod stopped {gone['ended'] - gone['running']:.1f} s after it started running")
    assert gone["ended"] - gone["running"] < grace, gone

    local_root = finetune["local_root"]
    local_run = local_airflow.run_dag(
        "genai_batch_inference", batch_conf(finetune["local"]["publish"], local_root), finetune["local_config"]
    )
    assert str(local_run.state) == "success", local_airflow.task_states(local_run)
    xcom = f"{url}/api/v2/dags/{dag}/dagRuns/{run_id}/taskInstances/merge_predictions/xcomEntries/return_value"
    served_merge = trigger.request("GET", f"{xcom}?deserialize=true&stringify=false", token=token)["value"]

    def predictions(merged: dict) -> list[dict]:
        assert merged["metrics"]["records"] == 8 and merged["metrics"]["shards"] == 4
        lines = (Path(merged["output_uri"].removeprefix("file://")) / "predictions.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k in ("id", "prompt", "completion")} for line in lines]

    ours, theirs = predictions(served_merge), predictions(local_airflow.xcom(local_run, "merge_predictions"))
    prompts = (platform.artifact_root / "data/prompts.jsonl").read_text().splitlines()
    assert [p["id"] for p in ours] == [json.loads(line)["id"] for line in prompts]  # merged in order
    assert ours == theirs
    assert pods_left(platform.cluster) == []
