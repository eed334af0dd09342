"""The docker tier: a Docker engine, the stage images built by ``images/build.sh``, and helpers.

The fixtures ``docker_engine`` and ``stage_images`` live in tests/conftest.py: the cluster tier uses them
too, and one session builds the images once. Without a reachable engine every test here is skipped with
the reason, unless ``GENAI_REQUIRE_DOCKER=1`` (set by ``.ci/run``, which starts the engine itself): then
a missing engine is a failure.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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


def build_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DOCKER": DOCKER, **extra}


def numbers(value, prefix: str = "") -> dict[str, float]:
    """Every number in a stage's metrics, by dotted key: what the runtimes' outputs are compared on."""
    if isinstance(value, bool) or value is None:
        return {}
    if isinstance(value, int | float):
        return {prefix: float(value)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}.{key}").items()}
    return {}
