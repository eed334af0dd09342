"""The docker tier: a Docker engine, the stage images built by ``images/build.sh``, and helpers.

Without a reachable engine every test here is skipped with the reason, unless ``GENAI_REQUIRE_DOCKER=1``
(set by ``.ci/run``, which starts the engine itself): then a missing engine is a failure.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = os.environ.get("DOCKER", "docker")
STAGE_IMAGES = ("stage-base", "tokenizer", "trainer", "evaluator", "inferencer")


def docker(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], check=check, capture_output=True, text=True, **kwargs)


def engine_problem() -> str | None:
    try:
        done = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no docker client or engine ({exc})"
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["docker info failed"])[-1]


@pytest.fixture(scope="session")
def docker_engine() -> None:
    problem = engine_problem()
    if problem is None:
        return
    if os.environ.get("GENAI_REQUIRE_DOCKER") == "1":
        pytest.fail(f"GENAI_REQUIRE_DOCKER=1 but no Docker engine is reachable: {problem}")
    pytest.skip(f"docker tier: no Docker engine reachable ({problem}); start one (dockerd) or run .ci/run")


def build_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DOCKER": DOCKER, **extra}


@pytest.fixture(scope="session")
def stage_images(docker_engine) -> dict[str, str]:
    """{image name: reference} of the stage images, built (or found up to date) by images/build.sh."""
    env = build_env(IMAGES=" ".join(STAGE_IMAGES))
    done = subprocess.run([ROOT / "images/build.sh", "build"], cwd=ROOT, env=env, capture_output=True, text=True)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-3000:]
    refs = subprocess.run(
        [ROOT / "images/build.sh", "list"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return dict(zip(STAGE_IMAGES, refs, strict=True))
