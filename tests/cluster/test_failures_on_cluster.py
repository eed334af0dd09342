"""Failures that only a cluster produces, each classified and messaged (genai_dags.pod_failures).

Most cases run genai_finetune under a copy of the bed's pipeline config with one setting made wrong; its
first task, tokenize, fails. The others run one stage's operator alone, its container running a short
script, against a full ResourceQuota, a tiny scratch volume or a deadline of seconds. The table the
tests print (cause -> task outcome -> tries used -> message) is the one in docs/cluster-tier.md.

    make test-cluster
"""

from __future__ import annotations

import copy
import time

import pytest
import yaml
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from genai_dags import local_airflow
from tests.cluster.conftest import STAGE_NAMESPACE, pods_left
from tests.cluster.test_pipelines_on_cluster import finetune_conf

pytestmark = pytest.mark.cluster
RETRIES = 2


def failing_run(platform, tmp_path, capfd, change) -> tuple[str, int, str]:
    """Run the DAG with ``change`` applied to the bed config: tokenize's state, tries used, and the log."""
    config = yaml.safe_load(platform.pipeline_config.read_text())
    config["retries"] = RETRIES
    change(config)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    run = local_airflow.run_dag("genai_finetune", finetune_conf(platform.artifact_root, "folio-failing"), path)
    assert str(run.state) == "failed"
    ti = next(t for t in run.get_task_instances() if t.task_id == "tokenize")
    out, err = capfd.readouterr()
    return str(ti.state), ti.try_number, out + err


def stage_setting(stage: str, **values):
    def change(config: dict) -> None:
        config.setdefault("stages", {}).setdefault(stage, {}).update(values)

    return change


CASES = {
    "image missing": (stage_setting("tokenize", image="ghcr.io/genai-pipelines/stages/nope:0"), 1, "cannot be used"),
    "OOMKilled": (stage_setting("tokenize", memory="48Mi"), 1, "OOMKilled"),
    "LimitRange": (stage_setting("tokenize", memory="8Gi"), 1, "LimitRange"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_cluster_failure_fails_with_its_message(case, platform, bed_inputs, tmp_path, capfd):
    change, tries, words = CASES[case]
    state, used, log = failing_run(platform, tmp_path, capfd, change)
    assert state == "failed" and used == tries, (case, state, used)
    message = next((line for line in log.splitlines() if words in line and "stage tokenize" in line), None)
    assert message, log[-3000:]
    print(f"| {case} | failed | {used} of {RETRIES + 1} | {message[-300:]} |")
    assert pods_left(platform.cluster) == []


def test_a_full_quota_is_waited_for_then_named_and_retried(platform, tmp_path):
    from kubernetes import client

    core = platform.cluster.core()
    full = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="full"), spec=client.V1ResourceQuotaSpec(hard={"pods": "0"})
    )

    def wait_a_minute(config: dict) -> None:
        config["kubernetes"]["startup_timeout_seconds"] = 60  # the room a full quota gets to free up

    core.create_namespaced_resource_quota(STAGE_NAMESPACE, full)
    # Admission enforces a quota once the quota controller has counted it (its status): until then a pod
    # may be admitted or refused with "status unknown".
    deadline = time.monotonic() + 30
    while not (core.read_namespaced_resource_quota("full", STAGE_NAMESPACE).status.hard or {}):
        assert time.monotonic() < deadline, "the quota controller never counted the quota"
        time.sleep(0.5)
    try:
        error = stage_alone(platform, tmp_path, "tokenize", "pass", wait_a_minute)
    finally:
        core.delete_namespaced_resource_quota("full", STAGE_NAMESPACE)
    assert not isinstance(error, AirflowFailException), error  # retried: other runs may free it
    assert "had no room for its pod within 60 s" in str(error) and "exceeded quota: full" in str(error), error
    assert "resourceQuota.hard" in str(error)
    print(f"| ResourceQuota full for the startup timeout | failed (tokenize) | retried | {str(error)[-300:]} |")


def test_an_unschedulable_pod_names_its_pool(platform, bed_inputs, tmp_path, capfd):
    def no_such_pool(config: dict) -> None:
        config["retries"] = 0  # each try waits the startup timeout
        config["kubernetes"]["startup_timeout_seconds"] = 60
        config["kubernetes"]["node_pools"]["cpu"]["node_selector"] = {"cloud.google.com/gke-nodepool": "absent"}

    state, used, log = failing_run(platform, tmp_path, capfd, no_such_pool)
    assert state == "failed" and used == 1
    assert "no node of pool cpu (selector cloud.google.com/gke-nodepool=absent)" in log, log[-3000:]
    assert "didn't match" in log  # the scheduler's own words


def stage_alone(platform, tmp_path, stage: str, script: str, change=lambda config: None, **attributes) -> Exception:
    """Run one stage task's operator by itself, its container running ``script``: the error it raises."""
    from genai_dags.render_pods import FakeTaskInstance

    config = yaml.safe_load(platform.pipeline_config.read_text())
    change(config)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    dag = local_airflow.load_dag("genai_finetune", path)
    op = copy.deepcopy(dag.get_task(stage))
    op.cmds, op.arguments = ["python", "-c", script], []
    for name, value in attributes.items():
        setattr(op, name, value)
    ti = FakeTaskInstance(dag_id=dag.dag_id, task_id=op.task_id)
    context = {"ti": ti, "task_instance": ti, "dag": dag, "run_id": ti.run_id, "params": {}, "task": op}
    with pytest.raises(AirflowException) as failure:
        op.execute(context)
    assert pods_left(platform.cluster) == []
    return failure.value


def test_scratch_over_its_size_limit_is_evicted_and_retried(platform, tmp_path):
    def tiny_scratch(config: dict) -> None:
        config["kubernetes"]["scratch_size"] = "1Ki"  # the kubelet checks emptyDir usage every 10 s

    fill = "import time; open('/tmp/fill', 'wb').write(bytes(1 << 20)); time.sleep(600)"
    error = stage_alone(platform, tmp_path, "evaluate", fill, tiny_scratch)
    # Evicted pods keep no container statuses: the provider alone would wait 15 minutes for the XCom sidecar.
    assert not isinstance(error, AirflowFailException), error  # retried as infrastructure
    assert "the kubelet evicted its pod" in str(error) and "exceeds the limit" in str(error), error
    assert "kubernetes.scratch_size (now 1Ki)" in str(error)
    print(f"| emptyDir over its sizeLimit | failed (evaluate) | retried | {str(error)[-300:]} |")


def test_a_pod_past_its_active_deadline_is_stopped_and_retried(platform, tmp_path):
    """The pod's deadline (the stage's timeout plus its startup timeout) backs up Airflow's own timeout when
    the worker dies; here it is cut to seconds."""
    sleep = "import time; time.sleep(600)"
    error = stage_alone(platform, tmp_path, "train_lora", sleep, active_deadline_seconds=15)
    assert not isinstance(error, AirflowFailException), error  # retried: training resumes from its checkpoint
    assert "reached its activeDeadlineSeconds" in str(error) and "stages.train_lora.timeout_minutes" in str(error)
    print(f"| activeDeadlineSeconds | failed (train_lora) | retried | {str(error)[-300:]} |")
