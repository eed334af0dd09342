"""`make build-images` with bad input fails fast, exit 2, with a message that says what to do."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.docker.conftest import ROOT, build_env


def build(**env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(
        ["make", "--no-print-directory", "build-images"], cwd=ROOT, env=build_env(**env),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return done, time.monotonic() - start


def test_no_docker_engine_says_how_to_start_one():
    done, seconds = build(DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert done.returncode != 0 and seconds < 30
    assert "cannot reach a Docker engine" in done.stderr and "dockerd" in done.stderr


@pytest.mark.parametrize("registry", ["Example.com/Genai", "registry.example.com/genai stages", "-bad/x"])
def test_a_bad_registry_name_shows_valid_examples(registry):
    done, seconds = build(REGISTRY=registry)
    assert done.returncode != 0 and seconds < 10
    assert "is not a valid image repository prefix" in done.stderr
    assert "dkr.ecr" in done.stderr and "docker.pkg.dev" in done.stderr and "azurecr.io" in done.stderr


@pytest.mark.docker
def test_a_missing_base_image_names_the_setting_and_the_stand_in(docker_engine):
    done, seconds = build(IMAGES="stage-base", BASE_IMAGE="registry.invalid/genai/no-such-python:0")
    assert done.returncode != 0 and seconds < 300
    assert "registry.invalid/genai/no-such-python:0" in done.stderr
    assert "BASE_IMAGE=" in done.stderr and "images/standins.sh" in done.stderr
