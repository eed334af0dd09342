"""Every object the chart renders for every target validates strictly against every Kubernetes version we support.

    .venv/bin/pytest tests/chart/test_kubernetes_schemas.py -q

Strict: unknown fields are errors (kubernetes-validate's -strict schemas), for 1.30 to 1.37 (kubernetes-validate
1.37.0 ships schemas from 1.25 on). Chart.yaml declares kubeVersion >=1.20: the cluster tier (tests/cluster)
installs the chart on a live 1.20 apiserver, the oldest version it is tested on.
The Karpenter NodePool is a CRD without a schema here: test_templates.TestKarpenterNodePool checks it.
"""

from __future__ import annotations

import pytest

from tests.chart.conftest import CHART, KUBERNETES_VERSIONS, TARGETS, load_yaml

CUSTOM_RESOURCES = {("karpenter.sh/v1", "NodePool")}


LIVE_CLUSTER_VERSION = "1.20"  # tests/cluster/bed/build.sh builds this version


def test_chart_declares_the_oldest_version_we_test():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["kubeVersion"] == f">={LIVE_CLUSTER_VERSION}.0-0"
    tested = chart["annotations"]["genai-pipelines.io/kubernetes-tested"].split()
    assert tested == [LIVE_CLUSTER_VERSION, KUBERNETES_VERSIONS[0], KUBERNETES_VERSIONS[-1]]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_validates_strictly(target, version, rendered, kubernetes_schemas):
    failures = []
    for obj in rendered[target]:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue
        for error in kubernetes_schemas.errors(obj, version):
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {error}")
    assert not failures, f"values/{target} on Kubernetes {version}:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_kind_has_a_schema_or_is_a_known_custom_resource(target, rendered, kubernetes_schemas):
    for obj in rendered[target]:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_RESOURCES:
            kubernetes_schemas.validator(KUBERNETES_VERSIONS[-1], obj["kind"], obj["apiVersion"])


def test_the_validator_rejects_an_unknown_field(kubernetes_schemas):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "c", "image": "i", "securityContex": {}}]},
    }
    assert kubernetes_schemas.errors(pod, KUBERNETES_VERSIONS[-1]), "strict schemas must reject unknown fields"
