"""values/<target>/airflow.yaml: valid for the official Airflow chart and wired to our chart and pipeline.yaml.

    .venv/bin/pytest tests/chart/test_airflow_values.py -q

The official chart cannot be downloaded here, so its values are validated against an excerpt of its
values.schema.json (tests/chart/airflow_values_schema_excerpt.json; source and licence inside), and the
Kubernetes objects inside them (volumes, mounts, resources) against the strict Kubernetes schemas.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import jsonschema
import pytest

from tests.chart.conftest import CLOUDS, KUBERNETES_VERSIONS, REPO, TARGETS

EXCERPT = json.loads((REPO / "tests" / "chart" / "airflow_values_schema_excerpt.json").read_text())
CONFIG_READERS = ("workers", "scheduler", "dagProcessor")  # processes that load the DAG files
LOG_SCHEMES = {"gke": "gs://", "eks": "s3://", "aks": "wasb"}
IDENTITY_ANNOTATION = {
    "gke": "iam.gke.io/gcp-service-account",
    "eks": "eks.amazonaws.com/role-arn",
    "aks": "azure.workload.identity/client-id",
}


def env(values: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in values.get("env", [])}


def section(values: dict, component: str) -> dict:
    """A component's values; the KubernetesExecutor's worker pods are under workers.kubernetes since chart 1.21."""
    return values["workers"]["kubernetes"] if component == "workers" else values.get(component, {})


class TestAirflowValues:
    def test_the_schema_excerpt_names_its_source_and_licence(self):
        assert "apache/airflow chart/values.schema.json" in EXCERPT["$comment"]
        assert "Apache License 2.0" in EXCERPT["$comment"]

    @pytest.mark.parametrize("target", TARGETS)
    def test_validates_against_the_official_charts_schema(self, target, airflow_values):
        errors = sorted(jsonschema.Draft7Validator(EXCERPT).iter_errors(airflow_values[target]), key=str)
        assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)

    def test_the_excerpt_catches_a_misspelt_key(self, airflow_values):
        gke = airflow_values["gke"]
        misspelt = {**gke, "workers": {**gke["workers"], "kubernetes": {**section(gke, "workers"), "extraVolume": []}}}
        assert list(jsonschema.Draft7Validator(EXCERPT).iter_errors(misspelt))
        # A key that chart 1.21 deprecated (workers.extraVolumes for workers.kubernetes.extraVolumes) fails too.
        deprecated = {**gke, "workers": {**gke["workers"], "extraVolumes": []}}
        assert list(jsonschema.Draft7Validator(EXCERPT).iter_errors(deprecated))

    @pytest.mark.parametrize("target", TARGETS)
    def test_volumes_mounts_and_resources_are_valid_kubernetes_objects(
        self, target, airflow_values, kubernetes_schemas
    ):
        for component in ("workers", "scheduler", "dagProcessor", "apiServer", "triggerer"):
            values = section(airflow_values[target], component)
            container = {"name": "c", "image": "i", "volumeMounts": values.get("extraVolumeMounts", [])}
            if "resources" in values:
                container["resources"] = values["resources"]
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": component.lower()},
                "spec": {"containers": [container], "volumes": values.get("extraVolumes", [])},
            }
            for version in (KUBERNETES_VERSIONS[0], KUBERNETES_VERSIONS[-1]):
                assert not kubernetes_schemas.errors(pod, version), (
                    f"{target} {component}: {kubernetes_schemas.errors(pod, version)}"
                )

    @pytest.mark.parametrize("target", TARGETS)
    def test_mounts_the_pipeline_config_map_where_genai_pipeline_config_points(self, target, airflow_values, rendered):
        values = airflow_values[target]
        config_map = next(o for o in rendered[target] if o["kind"] == "ConfigMap")
        (key,) = config_map["data"]
        path = env(values)["GENAI_PIPELINE_CONFIG"]
        for component in CONFIG_READERS:
            reader = section(values, component)
            volume = next(v for v in reader["extraVolumes"] if v.get("configMap"))
            assert volume["configMap"]["name"] == config_map["metadata"]["name"], component
            mount = next(m for m in reader["extraVolumeMounts"] if m["name"] == volume["name"])
            assert mount["readOnly"] is True
            assert path == f"{mount['mountPath']}/{key}", (
                f"{component}: GENAI_PIPELINE_CONFIG={path} is not the mounted file"
            )

    @pytest.mark.parametrize("target", TARGETS)
    def test_the_worker_service_account_is_the_one_our_rbac_binds(
        self, target, airflow_values, genai_values, chart_defaults
    ):
        worker = section(airflow_values[target], "workers")["serviceAccount"]
        bound = (
            genai_values[target]
            .get("airflow", {})
            .get("workerServiceAccount", chart_defaults["airflow"]["workerServiceAccount"])
        )
        assert worker["create"] is True and worker["name"] == bound
        # Only one ServiceAccount is named airflow-worker: the older worker one is not rendered.
        assert airflow_values[target]["workers"]["serviceAccount"] == {"create": False}

    @pytest.mark.parametrize("target", CLOUDS)
    def test_the_airflow_image_sits_beside_the_stage_image(self, target, airflow_values, pipeline_configs):
        stage = pipeline_configs[target]["kubernetes"]["image"]
        airflow = airflow_values[target]["images"]["airflow"]
        assert airflow["repository"] == re.sub(r"/[^/]+$", "/airflow", stage["repository"])
        assert airflow["tag"] == stage["tag"]

    def test_airflow_version_is_the_one_the_project_pins(self, airflow_values):
        pinned = next(
            d
            for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["airflow"]
            if d.startswith("apache-airflow==")
        )
        for target in TARGETS:
            assert airflow_values[target]["airflowVersion"] == pinned.split("==")[1]

    @pytest.mark.parametrize("target", TARGETS)
    def test_uses_the_kubernetes_executor_with_low_parallelism_and_no_broker(self, target, airflow_values):
        values = airflow_values[target]
        assert values["executor"] == "KubernetesExecutor"
        assert values["redis"]["enabled"] is False
        assert values["config"]["core"]["parallelism"] <= 32

    @pytest.mark.parametrize("target", TARGETS)
    def test_airflows_own_metrics_are_configured_and_off_by_default(self, target, airflow_values):
        values = airflow_values[target]
        assert values["statsd"]["enabled"] is False  # the chart's own default is true: a statsd-exporter pod
        metrics = values["config"]["metrics"]
        assert metrics["otel_on"] == "False"
        assert {"otel_host", "otel_port"} <= metrics.keys()
        assert "statsd_on" not in metrics, "the chart derives statsd_on from statsd.enabled: one switch"

    @pytest.mark.parametrize("target", CLOUDS)
    def test_uses_an_external_database_through_a_secret_and_no_password_anywhere(self, target, airflow_values):
        values = airflow_values[target]
        assert values["postgresql"]["enabled"] is False
        assert values["data"]["metadataSecretName"]
        text = (REPO / "values" / target / "airflow.yaml").read_text()
        assert not re.search(r"(?im)^\s*[\w.-]*(password|pass|secretkey|fernetkey)\s*:", text), (
            "a secret value in values"
        )
        assert "metadataConnection" not in text

    @pytest.mark.parametrize("target", CLOUDS)
    def test_ships_task_logs_to_the_clouds_object_storage(self, target, airflow_values, pipeline_configs):
        values = airflow_values[target]
        logging = values["config"]["logging"]
        assert logging["remote_logging"] == "True"
        assert logging["remote_base_log_folder"].startswith(LOG_SCHEMES[target])
        if target != "aks":  # same bucket as the artifacts (AKS: container airflow-logs of the same account)
            bucket = pipeline_configs[target]["artifact_root"].split("/")[2]
            assert logging["remote_base_log_folder"].split("/")[2] == bucket
        assert f"AIRFLOW_CONN_{logging['remote_log_conn_id'].upper()}" in env(values), (
            "the log connection is not defined"
        )

    @pytest.mark.parametrize("target", CLOUDS)
    def test_log_writers_and_readers_have_workload_identity(self, target, airflow_values):
        values = airflow_values[target]
        for component in ("workers", "apiServer", "triggerer"):
            assert IDENTITY_ANNOTATION[target] in section(values, component)["serviceAccount"]["annotations"], component
            if target == "aks":
                assert section(values, component)["labels"]["azure.workload.identity/use"] == "true", component


class TestChartVersion:
    """One place names the official chart's version (the Makefile); every other mention agrees with it."""

    PIN = re.search(r"^AIRFLOW_CHART_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)

    def test_every_mention_of_the_official_charts_version_is_the_pinned_one(self):
        mention = re.compile(
            r"apache-airflow/airflow --version (\S+)|official (?:Apache )?Airflow\s+chart (\d+\.\d+\.\d+)"
        )
        files = [*REPO.glob("values/*/airflow.yaml"), *REPO.glob("docs/*.md"), REPO / "README.md"]
        found = {(f.relative_to(REPO).as_posix(), m.group(1) or m.group(2)) for f in files
                 for m in mention.finditer(f.read_text())}  # fmt: skip
        named = {f"values/{t}/airflow.yaml" for t in TARGETS} | {f"docs/deploy-{c}.md" for c in CLOUDS} | {"README.md"}
        assert {f for f, _ in found} >= named
        assert {v for _, v in found} == {self.PIN}, sorted(found)

    def test_an_older_helm_is_refused_with_the_version_it_needs(self, tmp_path):
        for version, code in (("v3.18.4", 2), ("v3.19.0", 0), ("v4.3.1", 0)):
            helm = tmp_path / f"helm-{version}"
            helm.write_text(f"#!/bin/sh\necho {version}\n")
            helm.chmod(0o755)
            done = subprocess.run(["make", "-s", "helm-version", f"HELM={helm}"], cwd=REPO, capture_output=True,
                                  text=True)  # fmt: skip
            assert done.returncode == code, (version, done.stderr)
            if code:
                assert f"helm 3.18.4 at {helm} is older than 3.19.0" in done.stderr
                assert f"the official Airflow chart {self.PIN} supports" in done.stderr
