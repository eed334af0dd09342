"""Run identity: the run id comes from the conf and its input files; each stage's cache key (which holds its
code version: its module plus stages/core/) decides what reruns when the code changes.

    .venv/bin/pytest tests/test_run_identity.py -q

The stages run as real processes from a copy of ``stages/``, which the test then edits the way a developer
would (a comment in one stage module), and runs the same chain again under the same run id.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

CHAIN = {
    "tokenize": ["block_size=128", "min_chars=20"],
    "train_lora": ["max_steps=4", "checkpoint_every=4"],
    "evaluate": ["max_eval_docs=5", "num_samples=0"],
}


@pytest.fixture
def code(tmp_path) -> Path:
    """A copy of the stage code that a test may edit; stages started in it import this copy."""
    shutil.copytree(ROOT / "stages", tmp_path / "code/stages", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "code"


def run(code: Path, stage: str, common: list[str]) -> bool:
    """Run one stage from ``code``; whether it was a cache hit."""
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *common, *CHAIN[stage]], cwd=code, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["cache_hit"]


def test_an_edit_reruns_only_the_stages_whose_code_changed(code, tiny_base_model, folio_corpus, tmp_path):
    common = [f"artifact_root={tmp_path}/art", "run_id=same", f"base_model={tiny_base_model}"]
    data = {"tokenize": [f"input_uri={folio_corpus}"]}

    def chain() -> dict[str, bool]:
        return {stage: run(code, stage, common + data.get(stage, [])) for stage in CHAIN}

    assert chain() == {"tokenize": False, "train_lora": False, "evaluate": False}
    assert chain() == {"tokenize": True, "train_lora": True, "evaluate": True}

    with (code / "stages/evaluate.py").open("a") as fh:
        fh.write("\n# an edit: evaluate's code version changes, no other stage's does\n")
    assert chain() == {"tokenize": True, "train_lora": True, "evaluate": False}

    with (code / "stages/core/errors.py").open("a") as fh:
        fh.write("\n# an edit of the shared library: every stage's code version changes\n")
    assert run(code, "tokenize", common + data["tokenize"]) is False  # tests/test_layering.py: every stage
