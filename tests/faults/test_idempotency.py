"""Idempotency: the same conf twice is all cache hits with byte-identical outputs, and runs with
different run ids never touch each other's outputs.

(Through Airflow, ``tests/test_finetune_e2e.py`` checks that a second run of the same conf is all cache
hits; across run ids, the preemption series shows train_lora's adapter bitwise equal to its reference.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stages import tokenize as tokenize_stage
from tests.faults.conftest import tree_hashes
from tests.test_tokenize import doc, tokenizer_model, write_jsonl

pytestmark = pytest.mark.faults
__all__ = ["tokenizer_model"]  # the fixture, imported for use here


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    hashes = tree_hashes(folder)
    return {rel: (digest, os.stat(folder / rel).st_mtime_ns) for rel, digest in hashes.items()}


def test_the_same_conf_twice_is_a_cache_hit_and_other_run_ids_leave_it_alone(tmp_path, tokenizer_model, capsys, tally):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": doc(i)} for i in range(60)])
    root = tmp_path / "art"
    args = [f"input_uri={data}", f"base_model={tokenizer_model}", f"artifact_root={root}", "block_size=32"]

    def run(run_id: str, *extra: str) -> dict:
        assert tokenize_stage.main([*args, f"run_id={run_id}", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    first = run("a")
    a = root / "runs/a/tokenize"
    before = snapshot(a)
    again = run("a")
    other = run("b")  # the same conf under another run id
    changed = run("c", "seed=1")  # another conf under a third
    after = snapshot(a)

    b_outputs = {k: v for k, v in tree_hashes(root / "runs/b/tokenize").items() if k != "manifest.json"}
    a_outputs = {k: v for k, v in tree_hashes(a).items() if k != "manifest.json"}
    touched = sum(after.get(rel) != value for rel, value in before.items()) + len(set(after) - set(before))
    ok = again["cache_hit"] and not first["cache_hit"] and not other["cache_hit"] and b_outputs == a_outputs
    tally.fault("same conf twice / other run ids", survived=ok and not touched, data_lost=touched)

    assert not first["cache_hit"] and again["cache_hit"]
    assert not other["cache_hit"] and not changed["cache_hit"]
    assert touched == 0, "a cache hit or another run id changed run a's files"
    assert b_outputs == a_outputs, "the same conf under another run id gave other bytes"
    assert tree_hashes(root / "runs/c/tokenize") != tree_hashes(a)
