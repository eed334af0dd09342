"""The kubernetes runtime, offline: every stage pod for every cloud config, validated and inspected.

Each stage task of each DAG gets the arguments its plan task would give it, its templates are
rendered, and its pod is built with ``build_pod_request_obj(context, dry_run=True)`` and validated
against the strict Kubernetes JSON schemas (oldest and newest supported versions). The kill path and
the exit-code mapping run the real provider code against a fake Kubernetes API over HTTP.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest

from genai_dags import local_airflow, render_pods, settings
from genai_dags.stage_specs import STAGES

ROOT = Path(__file__).resolve().parents[1]

CLOUDS = ["gke", "eks", "aks"]
K8S_VERSIONS = ["1.25.0", "1.37.0"]  # the oldest and newest schemas kubernetes-validate ships
GPU_STAGES = {name for name, spec in STAGES.items() if spec.gpu}
SPOT_KEYS = {
    "gke": "cloud.google.com/gke-spot",
    "eks": "karpenter.sh/capacity-type",
    "aks": "kubernetes.azure.com/scalesetpriority",
}


def config_path(cloud: str) -> Path:
    return ROOT / "values" / cloud / "pipeline.yaml"


@pytest.fixture(scope="module", params=CLOUDS)
def cloud(request):
    return request.param


@pytest.fixture(scope="module")
def pods(cloud):
    """{'<dag>.<task>': pod} on the first try."""
    return render_pods.render_all(config_path(cloud))


@pytest.fixture(scope="module")
def last_try_pods(cloud):
    retries = settings.load_file(config_path(cloud)).retries
    return render_pods.render_all(config_path(cloud), try_number=retries + 1)


def stage_of(pod: dict) -> str:
    return pod["spec"]["containers"][0]["command"][-1].removeprefix("stages.")


def base_container(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")


def test_every_stage_task_of_every_dag_has_a_pod(pods):
    names = {name.split("[")[0] for name in pods}
    assert names == {
        "genai_finetune.tokenize",
        "genai_finetune.train_lora",
        "genai_finetune.evaluate",
        "genai_finetune.batch_infer",
        "genai_finetune.publish",
        "genai_batch_inference.batch_infer",
        "genai_batch_inference.merge_predictions",
    }
    assert sum(name.startswith("genai_batch_inference.batch_infer[") for name in pods) == 3  # one per shard


def test_the_command_line_writes_only_pod_yaml_to_stdout_and_its_logs_to_stderr():
    import subprocess
    import sys

    import yaml

    proc = subprocess.run(
        [sys.executable, "-m", "genai_dags.render_pods", "values/gke/pipeline.yaml"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "dags"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    documents = list(yaml.safe_load_all(proc.stdout))
    assert documents and {d["kind"] for d in documents} == {"Pod"}
    assert "Building pod" in proc.stderr  # Airflow's log lines are still shown, on stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_pod_validates_against_the_strict_kubernetes_schema(pods, last_try_pods, version):
    for name, pod in [*pods.items(), *last_try_pods.items()]:
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} is not a valid Pod for Kubernetes {version}: {exc}")


def test_the_container_runs_the_stage_command_with_key_value_arguments(cloud, pods):
    cfg = settings.load_file(config_path(cloud))
    for name, pod in pods.items():
        container = base_container(pod)
        stage = stage_of(pod)
        assert container["command"] == ["dumb-init", "--", "python", "-m", f"stages.{stage}"], name
        assert name.split(".")[1].split("[")[0] == stage
        assert container["image"] == cfg.image_for(stage)
        assert container["args"][0] == f"artifact_root={cfg.artifact_root}"
        assert all(re.fullmatch(r"[a-z_]+=\S+", arg) for arg in container["args"]), container["args"]


def test_gpu_stages_request_a_gpu_and_run_on_spot_capacity_first(cloud, pods):
    cfg = settings.load_file(config_path(cloud))
    spot = cfg.kubernetes.node_pools["gpu-spot"]
    for name, pod in pods.items():
        resources = base_container(pod)["resources"]
        if stage_of(pod) in GPU_STAGES:
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1", name
            assert pod["spec"]["nodeSelector"] == spot.node_selector
            assert SPOT_KEYS[cloud] in pod["spec"]["nodeSelector"]
            assert pod["metadata"]["labels"]["genai-pipelines.io/capacity"] == "spot"
            keys = {t["key"] for t in pod["spec"]["tolerations"]}
            assert "nvidia.com/gpu" in keys or cloud == "aks"
            if cloud in ("gke", "aks"):  # these clouds taint their spot nodes
                assert SPOT_KEYS[cloud] in keys
        else:
            assert "nvidia.com/gpu" not in resources["requests"], name
            assert pod["spec"]["nodeSelector"] == cfg.kubernetes.node_pools["cpu"].node_selector
            assert SPOT_KEYS[cloud] not in pod["spec"]["nodeSelector"]


def test_training_and_inference_get_their_own_priority_class_on_every_try(pods, last_try_pods):
    """train_lora and batch_infer share the GPU pools; their PriorityClasses let inference preempt training."""
    expected = {"train_lora": "genai-training", "evaluate": "genai-inference", "batch_infer": "genai-inference"}
    for name, pod in [*pods.items(), *last_try_pods.items()]:
        assert pod["spec"].get("priorityClassName") == expected.get(stage_of(pod)), name


def test_aks_spot_pods_tolerate_the_spot_taint_exactly():
    pods = render_pods.render_all(config_path("aks"))
    trainer = pods["genai_finetune.train_lora"]
    assert trainer["spec"]["nodeSelector"]["kubernetes.azure.com/scalesetpriority"] == "spot"
    assert {
        "key": "kubernetes.azure.com/scalesetpriority",
        "operator": "Equal",
        "value": "spot",
        "effect": "NoSchedule",
    } in trainer["spec"]["tolerations"]
    assert trainer["metadata"]["labels"]["azure.workload.identity/use"] == "true"


def test_the_last_try_of_a_gpu_stage_falls_back_to_on_demand_capacity(cloud, pods, last_try_pods):
    cfg = settings.load_file(config_path(cloud))
    on_demand = cfg.kubernetes.node_pools["gpu-on-demand"]
    for name, pod in last_try_pods.items():
        if stage_of(pod) not in GPU_STAGES:
            assert pod["spec"]["nodeSelector"] == pods[name]["spec"]["nodeSelector"]  # CPU stages don't move
            continue
        assert pod["metadata"]["labels"]["genai-pipelines.io/capacity"] == "on-demand", name
        assert pod["spec"]["nodeSelector"] == on_demand.node_selector
        assert pod["spec"]["nodeSelector"].get(SPOT_KEYS[cloud]) != "spot"
        assert pod["spec"]["nodeSelector"].get(SPOT_KEYS[cloud]) != "true"
        assert SPOT_KEYS[cloud] not in {t["key"] for t in pod["spec"].get("tolerations") or []}
        assert base_container(pod)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_every_try_but_the_last_stays_on_spot(cloud):
    cfg = settings.load_file(config_path(cloud))
    trainer = local_airflow.load_dag("genai_finetune", config_path(cloud)).get_task("train_lora")
    capacities = [trainer.capacity_for_try(n)[0] for n in range(1, cfg.retries + 2)]
    assert capacities == ["spot"] * cfg.retries + ["on-demand"]


def test_pods_run_non_root_read_only_without_privileges_or_capabilities(pods):
    for name, pod in pods.items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert not spec.get("hostNetwork")
        for container in spec["containers"]:  # the stage and the XCom sidecar alike
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, name
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert not sc.get("privileged")
        mounts = {m["mountPath"]: m["name"] for m in base_container(pod)["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]  # the only writable place besides the XCom folder
        env = {e["name"]: e.get("value") for e in base_container(pod)["env"]}
        assert env["HOME"] == "/tmp" and env["HF_HOME"].startswith("/tmp/")


def test_pods_carry_no_secrets_and_use_the_configured_identity(cloud, pods):
    cfg = settings.load_file(config_path(cloud))
    for pod in pods.values():
        assert pod["metadata"]["namespace"] == cfg.kubernetes.namespace
        assert pod["spec"]["serviceAccountName"] == cfg.kubernetes.service_account
        for container in pod["spec"]["containers"]:
            assert not container.get("envFrom")
            for var in container.get("env") or []:
                assert "valueFrom" not in var
                assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", var["name"]), var
        assert not any("secret" in v for v in pod["spec"]["volumes"])


def test_the_stage_result_reaches_xcom_through_the_sidecar(pods):
    for pod in pods.values():
        env = {e["name"]: e.get("value") for e in base_container(pod)["env"]}
        assert env["STAGE_RESULT_PATH"] == "/airflow/xcom/return.json"
        assert env["STAGE_IMAGE"] == base_container(pod)["image"]  # recorded in every manifest
        (sidecar,) = [c for c in pod["spec"]["containers"] if c["name"] == "airflow-xcom-sidecar"]
        # Its container's PID 1: without a trap it would outlive a deletion by the grace period (cluster tier).
        assert sidecar["command"][:2] == ["sh", "-c"] and 'trap "exit 0" INT TERM;' in sidecar["command"][2]


def test_resources_and_time_limits_come_from_the_stage_spec(pods):
    for name, pod in pods.items():
        spec = STAGES[stage_of(pod)]
        resources = base_container(pod)["resources"]
        assert resources["requests"]["cpu"] == spec.cpu, name
        assert resources["requests"]["memory"] == resources["limits"]["memory"] == spec.memory
        assert "cpu" not in resources["limits"]  # no CPU throttling
        assert pod["spec"]["terminationGracePeriodSeconds"] >= 60  # room for a checkpoint on SIGTERM
        assert pod["spec"]["activeDeadlineSeconds"] >= spec.timeout.total_seconds()
        assert pod["spec"]["restartPolicy"] == "Never"


def test_platform_overrides_change_resources_without_touching_dag_files(tmp_path):
    text = config_path("gke").read_text() + "stages:\n  evaluate: {gpu: 0, cpu: '16', memory: 64Gi}\n"
    config = tmp_path / "pipeline.yaml"
    config.write_text(text)
    pod = render_pods.render_all(config)["genai_finetune.evaluate"]
    resources = base_container(pod)["resources"]
    assert resources["requests"] == {"cpu": "16", "memory": "64Gi"}
    assert "cloud.google.com/gke-spot" not in pod["spec"]["nodeSelector"]  # no GPU: the CPU pool


def test_a_multi_gpu_trainer_gets_its_gpus_shared_memory_and_nccl_settings(tmp_path):
    """Eight GPUs on one node: train_lora starts one process per GPU; NCCL talks through /dev/shm."""
    text = config_path("gke").read_text() + "stages:\n  train_lora: {gpu: 8}\n"
    config = tmp_path / "pipeline.yaml"
    config.write_text(text)
    pods = render_pods.render_all(config)
    trainer = pods["genai_finetune.train_lora"]
    resources = base_container(trainer)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "8"
    shm = next(v for v in trainer["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}  # 2 GiB per GPU
    for name, pod in pods.items():
        env = {e["name"]: e.get("value") for e in base_container(pod).get("env", [])}
        assert (env.get("NCCL_DEBUG") == "WARN") == (stage_of(pod) in GPU_STAGES), name
    kubernetes_validate.validate(trainer, K8S_VERSIONS[-1], strict=True)


def test_more_gpus_than_a_node_has_is_refused_naming_both_keys(tmp_path):
    text = config_path("gke").read_text().replace("gpu_memory_gib: 22", "gpu_memory_gib: 22\n      gpus_per_node: 4")
    assert "gpus_per_node: 4" in text
    config = tmp_path / "pipeline.yaml"
    config.write_text(text + "stages:\n  train_lora: {gpu: 8}\n")
    with pytest.raises(settings.ConfigError, match=r"stages.train_lora.gpu=8 is more than kubernetes.node_pools"):
        settings.load_file(config)


@pytest.mark.parametrize("cloud_name", CLOUDS)
def test_operator_settings_clean_up_stream_logs_and_wait_for_gpu_scale_up(cloud_name):
    dags = render_pods.load_dags(config_path(cloud_name))
    for dag in dags.values():
        for task in dag.tasks:
            if getattr(task, "stage", None) is None and "stage" not in (task.partial_kwargs if task.is_mapped else {}):
                continue  # not a stage task: plan, the gates, genai_retrain's trigger
            kwargs = task.partial_kwargs if task.is_mapped else vars(task)
            assert (
                str(
                    kwargs["on_finish_action"].value
                    if hasattr(kwargs["on_finish_action"], "value")
                    else kwargs["on_finish_action"]
                )
                == "delete_pod"
            )
            assert kwargs["get_logs"] is True
            assert kwargs["do_xcom_push"] is True
            assert kwargs["startup_timeout_seconds"] >= 900  # a GPU node from zero: 15-20 minutes
            assert kwargs["schedule_timeout_seconds"] >= 900
            assert kwargs["execution_timeout"] is not None


# ---------------------------------------------------------------------------------------------
# The kill path and the exit codes, against a fake Kubernetes API (HTTP is the only thing faked)


class FakeKubernetesAPI(ThreadingHTTPServer):
    """Just enough of the core/v1 pod API: create, list, read, patch, delete; events are empty."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pods: dict[str, dict] = {}
        self.calls: list[tuple[str, str, dict | None]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeKubernetesAPI

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else None

    def _handle(self, method: str) -> None:
        path = self.path.split("?")[0]
        body = self._body()
        with self.server.lock:
            self.server.calls.append((method, self.path, body))
            match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/(pods|events)(?:/([^/]+))?", path)
            if not match:
                return self._reply(404, {"kind": "Status", "code": 404})
            namespace, kind, name = match.groups()
            if kind == "events":
                return self._reply(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": []})
            if method == "GET" and name is None:
                return self._reply(
                    200,
                    {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": list(self.server.pods.values())},
                )
            if method == "POST":
                pod = {**body, "status": {"phase": "Pending"}}
                pod["metadata"]["namespace"] = namespace
                self.server.pods[pod["metadata"]["name"]] = pod
                return self._reply(201, pod)
            pod = self.server.pods.get(name)
            if pod is None:
                return self._reply(404, {"kind": "Status", "code": 404})
            if method == "DELETE":
                pod["status"] = {"phase": "Failed"}  # what a deleted, still-terminating pod reports
                return self._reply(200, pod)
            return self._reply(200, pod)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")


@pytest.fixture
def fake_api(tmp_path):
    server = FakeKubernetesAPI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
                "users": [{"name": "fake", "user": {}}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "genai-stages"}}
                ],
            }
        )
    )
    server.kubeconfig = str(kubeconfig)
    yield server
    server.shutdown()


def trainer_against(fake_api) -> tuple:
    dag = local_airflow.load_dag("genai_finetune", config_path("gke"))
    op = copy.deepcopy(dag.get_task("train_lora"))
    op.arguments = ["artifact_root=gs://b/x", "run_id=r1", "base_model=gs://b/m"]
    op.in_cluster = False
    op.config_file = fake_api.kubeconfig
    op.startup_check_interval_seconds = 0.1
    op.log_events_on_startup = False
    ti = render_pods.FakeTaskInstance(dag_id=dag.dag_id, task_id=op.task_id)
    context = {"ti": ti, "task_instance": ti, "dag": dag, "run_id": ti.run_id, "params": {}, "task": op}
    op.render_template_fields(context)
    return op, context


def test_killing_the_task_deletes_its_pod(fake_api):
    op, context = trainer_against(fake_api)
    outcome = {}

    def run():
        try:
            op.execute(context)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    # Wait until the pod exists and the operator knows it (``self.pod`` is set once the create call returns).
    while not (fake_api.pods and getattr(op, "pod", None) is not None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_api.pods, "the operator never created its pod"
    (name,) = fake_api.pods
    assert op.pod.metadata.name == name
    assert not any(method == "DELETE" for method, _, _ in fake_api.calls)

    op.on_kill()  # what Airflow calls when the task is killed (UI, timeout, SIGTERM to the worker)

    deletes = [(path, body) for method, path, body in fake_api.calls if method == "DELETE"]
    assert len(deletes) == 1
    path, body = deletes[0]
    assert path.startswith(f"/api/v1/namespaces/genai-stages/pods/{name}")
    grace = (body or {}).get("gracePeriodSeconds") or int(re.search(r"gracePeriodSeconds=(\d+)", path).group(1))
    assert grace == 120  # the trainer gets its checkpoint window
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert "error" in outcome  # the task ends failed, not succeeded


def _finished_pod(name: str, exit_code: int):
    from kubernetes.client import models as k8s

    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, reason="Error")
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, namespace="genai-stages", labels={}),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base"), k8s.V1Container(name="airflow-xcom-sidecar")]),
        status=k8s.V1PodStatus(
            phase="Failed",
            container_statuses=[
                k8s.V1ContainerStatus(
                    name="base",
                    image="x",
                    image_id="",
                    ready=False,
                    restart_count=0,
                    state=k8s.V1ContainerState(terminated=terminated),
                ),
            ],
        ),
    )


@pytest.mark.parametrize(("exit_code", "retried"), [(2, False), (1, True), (143, True)])
def test_exit_2_fails_without_retry_and_other_failures_retry_and_the_pod_is_deleted(fake_api, exit_code, retried):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    op, context = trainer_against(fake_api)
    pod = _finished_pod("genai-train-lora-abc", exit_code)
    from kubernetes.client import ApiClient

    fake_api.pods[pod.metadata.name] = ApiClient().sanitize_for_serialization(pod)
    with pytest.raises(AirflowException) as exc:
        op.cleanup(pod, pod, context=context)
    assert isinstance(exc.value, AirflowFailException) is (not retried)
    assert any(method == "DELETE" and pod.metadata.name in path for method, path, _ in fake_api.calls)


@pytest.mark.parametrize(("reason", "statuses"), [("DeadlineExceeded", "running"), ("Evicted", None)])
def test_a_pod_that_has_ended_runs_no_container_whatever_its_last_statuses_say(fake_api, reason, statuses):
    """After a deadline the kubelet leaves the statuses "running"; after an eviction it may leave none."""
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    op, _ = trainer_against(fake_api)
    running = k8s.V1ContainerState(running=k8s.V1ContainerStateRunning())
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="genai-train-lora-ended", namespace="genai-stages"),
        status=k8s.V1PodStatus(
            phase="Failed",
            reason=reason,
            container_statuses=statuses
            and [
                k8s.V1ContainerStatus(name=n, image="x", image_id="", ready=False, restart_count=0, state=running)
                for n in ("base", "airflow-xcom-sidecar")
            ],
        ),
    )
    fake_api.pods[pod.metadata.name] = ApiClient().sanitize_for_serialization(pod)
    for container in ("base", "airflow-xcom-sidecar"):
        assert not op.pod_manager.container_is_running(pod, container)
        assert op.pod_manager.container_is_terminated(pod, container)
    fake_api.pods[pod.metadata.name]["status"]["phase"] = "Running"  # the same statuses on a live pod
    assert op.pod_manager.container_is_running(pod, "base") is (statuses == "running")


# values/bed reaches its cluster through this Airflow connection; rendering a pod reads it (the provider
# looks up the XCom sidecar image there).
BED_CONNECTION = '{"conn_type": "kubernetes", "extra": {}}'


def test_a_shared_volume_claim_is_mounted_at_the_artifact_roots_own_path(monkeypatch):
    """values/bed (the cluster tier's cluster): a file artifact root reaches every pod through its claim."""
    monkeypatch.setenv("AIRFLOW_CONN_GENAI_BED", BED_CONNECTION)
    config = settings.load_file(ROOT / "values" / "bed" / "pipeline.yaml")
    root = config.artifact_root.removeprefix("file://")
    for name, pod in render_pods.render_all(ROOT / "values" / "bed" / "pipeline.yaml").items():
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {"artifacts": "genai-artifacts"}, name
        assert {"name": "artifacts", "mountPath": root} in base_container(pod)["volumeMounts"], name
        assert root in " ".join(base_container(pod)["args"]), name  # the URIs name that same path
