"""Pod security on every pod the kubernetes runtime builds, for every cloud configuration found in
``values/*/pipeline.yaml`` (a new cloud is covered without touching this file), on the first try and
on the last one (the on-demand fallback of GPU stages builds a different pod).

The invariants themselves (non-root, read-only root filesystem, no privilege escalation, every
capability dropped, RuntimeDefault seccomp, no service-account token, no secrets) are the checks of
``tests/test_pods.py``, which runs them on the first-try pods of gke, eks and aks; they are called
here, not copied.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from genai_dags import render_pods, settings
from tests import test_pods

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_CONFIGS = sorted(
    p for p in ROOT.glob("values/*/pipeline.yaml") if settings.load_file(p).runtime == "kubernetes"
)


def test_every_kubernetes_config_is_one_test_pods_knows():
    # values/bed is the cluster tier's own cluster (tests/cluster); test_pods checks its shared volume.
    assert {p.parent.name for p in KUBERNETES_CONFIGS} == {*test_pods.CLOUDS, "bed"}


@pytest.mark.parametrize("config", KUBERNETES_CONFIGS, ids=[p.parent.name for p in KUBERNETES_CONFIGS])
def test_every_pod_of_every_try_is_hardened(config, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GENAI_BED", test_pods.BED_CONNECTION)  # values/bed names this connection
    cloud = config.parent.name
    last_try = settings.load_file(config).retries + 1
    for try_number in (1, last_try):
        pods = render_pods.render_all(config, try_number=try_number)
        assert pods
        problems = []
        for name, pod in pods.items():
            try:
                test_pods.test_pods_run_non_root_read_only_without_privileges_or_capabilities({name: pod})
                test_pods.test_pods_carry_no_secrets_and_use_the_configured_identity(cloud, {name: pod})
            except AssertionError as exc:
                problems.append(f"{name} (try {try_number}): {exc}")
        assert not problems, problems
