"""`make build-images` with bad input fails before any image build starts, with a message that says what to do."""

from __future__ import annotations

import subprocess

import pytest

from tests.docker.conftest import ROOT, build_env


def build(**env: str) -> subprocess.CompletedProcess:
    """make build-images that must stop before building anything (images/build.sh echoes "== building")."""
    done = subprocess.run(
        ["make", "--no-print-directory", "build-images"], cwd=ROOT, env=build_env(**env),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "== building" not in done.stdout, done.stdout[-2000:]
    return done


def test_no_docker_engine_says_how_to_start_one():
    done = build(DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert "cannot reach a Docker engine" in done.stderr and "dockerd" in done.stderr


@pytest.mark.parametrize("registry", ["Example.com/Genai", "registry.example.com/genai stages", "-bad/x"])
def test_a_bad_registry_name_shows_valid_examples(registry):
    done = build(REGISTRY=registry)
    assert "is not a valid image repository prefix" in done.stderr
    assert "dkr.ecr" in done.stderr and "docker.pkg.dev" in done.stderr and "azurecr.io" in done.stderr


@pytest.mark.docker
def test_a_missing_base_image_names_the_setting_and_the_stand_in(docker_engine):
    done = build(IMAGES="stage-base", BASE_IMAGE="registry.invalid/genai/no-such-python:0")
    assert "registry.invalid/genai/no-such-python:0" in done.stderr
    assert "BASE_IMAGE=" in done.stderr and "images/standins.sh" in done.stderr
