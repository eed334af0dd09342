"""Worker loss: the Airflow process running train_lora is SIGKILLed while its pod trains.

The pod does not depend on the worker: it keeps training. The next attempt of the same task instance
finds it (the provider's reattach: the pod identity it stored, else the task's labels) and monitors it
to the end instead of starting over; the pod's uid before and after proves which happened.

Here Airflow is ``dag.test()`` in a child process, killed with SIGKILL (no on_kill, no cleanup), and the
next attempt is ``airflow tasks test`` on the same run: a deployed scheduler would start it after
detecting the lost worker; the operator's side (find the pod, reattach or delete the orphan) is the same.

    make test-cluster
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster.conftest import STAGE_NAMESPACE, pods_left
from tests.cluster.test_pipelines_on_cluster import finetune_conf
from tests.docker.conftest import ROOT

pytestmark = pytest.mark.cluster
RUN = (
    "import json, sys; from genai_dags import local_airflow; "
    "local_airflow.run_dag('genai_finetune', json.loads(sys.argv[1]), sys.argv[2])"
)


def airflow_env(platform) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "dags"), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path, "GENAI_PIPELINE_CONFIG": str(platform.pipeline_config)}


def running_train_pod(core, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(STAGE_NAMESPACE, label_selector="app.kubernetes.io/component=train-lora")
        running = [p for p in pods.items if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
        if running:
            return running[0]
        time.sleep(0.3)
    raise TimeoutError("train_lora's pod never ran")


def test_a_lost_worker_does_not_lose_the_training(platform, bed_inputs, tmp_path):
    from airflow.models import DagRun

    core = platform.cluster.core()
    conf = finetune_conf(platform.artifact_root, "folio-worker-loss")
    worker = subprocess.Popen(
        [sys.executable, "-c", RUN, json.dumps(conf), str(platform.pipeline_config)],
        env=airflow_env(platform),
        stdout=(tmp_path / "worker.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        pod = running_train_pod(core)
        while "tokens/s" not in core.read_namespaced_pod_log(pod.metadata.name, STAGE_NAMESPACE, container="base"):
            time.sleep(0.2)  # it trains
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # the worker is gone: no on_kill, no cleanup
        worker.wait()
    time.sleep(2)
    still = core.read_namespaced_pod(pod.metadata.name, STAGE_NAMESPACE)
    assert still.metadata.uid == pod.metadata.uid and still.status.phase == "Running"  # training goes on

    run = max(DagRun.find(dag_id="genai_finetune"), key=lambda r: r.start_date)
    # The run's conf travels as the task's params (`tasks test` validates them, as a real try would).
    attempt = subprocess.run(
        [
            sys.executable,
            "-m",
            "airflow",
            "tasks",
            "test",
            "genai_finetune",
            "train_lora",
            run.run_id,
            "-t",
            json.dumps(conf),
        ],
        env=airflow_env(platform),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = attempt.stdout + attempt.stderr
    assert attempt.returncode == 0, log[-4000:]
    reattached = (
        f"Found matching pod {pod.metadata.name}",
        f"Reconnecting to pod {STAGE_NAMESPACE}/{pod.metadata.name}",
    )
    assert any(r in log for r in reattached), log[-4000:]
    how = next(line for line in log.splitlines() if any(r in line for r in reattached))
    print(f"worker loss: pod uid {pod.metadata.uid} before and after; the next attempt: {how[-200:]}")
    assert '"stage": "train_lora"' in log  # the result the reattached attempt read from the pod
    assert pods_left(platform.cluster) == []  # no orphan
