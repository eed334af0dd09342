"""The publish stage (stable, versioned model location with lineage) and merge_predictions (shards joined in order).

Upstream outputs are committed by hand with the real manifest code, so each case is exact and fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from stages import merge_predictions, publish
from stages.core import layout, manifest


@pytest.fixture(autouse=True)
def restore_logging():
    """The stage runner points the root logger at this test's captured stderr; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def commit(folder: Path, files: dict[str, str], record: dict) -> str:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    uri = f"file://{folder}"
    (folder / manifest.MANIFEST).unlink(missing_ok=True)  # a re-commit in a test: the old one goes first
    manifest.commit(uri, {"cache_key": "k" * 64, "code": {"source_sha256": "c" * 64, "image": "stages:1"}, **record})
    return uri


@pytest.fixture
def run_root(tmp_path) -> Path:
    """A run with committed tokenize, train_lora and evaluate outputs, as the stages leave them."""
    run = tmp_path / "runs" / "r1"
    commit(run / "tokenize", {"dataset/data.bin": "blocks"}, {"stage": "tokenize", "inputs": {}, "config": {}})
    commit(
        run / "train_lora",
        {
            "adapter/adapter_config.json": '{"r": 4}',
            "adapter/adapter_model.safetensors": "weights",
            "adapter/training_base.json": '{"sha256": "b"}',
            "train_log.jsonl": '{"step": 1, "loss": 3.0}\n',
        },
        {
            "stage": "train_lora",
            "inputs": {"base_model": {"uri": "file:///base", "sha256": "b" * 64}},
            "config": {"base_model": "file:///base", "dataset_uri": f"file://{run}/tokenize"},
        },
    )
    evaluate(run, passed=True)
    return tmp_path


def evaluate(run: Path, passed: bool) -> None:
    gate = {"passed": passed, "reason": "word_perplexity improved 9.0% (>= 2.0% required)"}
    commit(
        run / "evaluate",
        {"metrics.json": json.dumps({"quality_gate": gate}), "report.md": "# Evaluation report\n"},
        {"stage": "evaluate", "inputs": {}, "config": {}, "metrics": {"quality_gate": gate}},
    )


def run_publish(root: Path, *args: str) -> tuple[int, dict | None]:
    code = publish.main([f"artifact_root={root}", "run_id=r1", "model_name=folio", *args])
    return code, manifest.read(f"file://{root}/models/folio/{dict(a.split('=', 1) for a in args).get('version', 'r1')}")


def test_publish_copies_adapter_evaluation_and_lineage_to_a_versioned_location(run_root, capsys):
    code, committed = run_publish(run_root, 'run_conf={"model_name": "folio", "train": {"rank": 8}}')
    assert code == 0 and committed is not None
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = run_root / "models" / "folio" / "r1"
    assert result["metrics"]["uri"] == f"file://{model}" and result["metrics"]["version"] == "r1"
    assert (model / "adapter/adapter_model.safetensors").read_text() == "weights"
    assert (model / "train_log.jsonl").exists() and (model / "evaluation/report.md").exists()
    lineage = json.loads((model / "lineage.json").read_text())
    assert lineage["run_id"] == "r1" and lineage["base_model"] == "file:///base"
    assert lineage["base_model_sha256"] == "b" * 64
    assert lineage["conf"] == {"model_name": "folio", "train": {"rank": 8}}  # what retraining starts from
    assert set(lineage["stages"]) == {"tokenize", "train_lora", "evaluate"}
    assert lineage["stages"]["train_lora"]["code"]["image"] == "stages:1" and lineage["images"] == ["stages:1"]
    assert set(committed["outputs"]) >= {"lineage.json", "adapter/adapter_config.json", "evaluation/metrics.json"}


def test_publishing_the_same_content_again_is_a_cache_hit_and_a_version_is_immutable(run_root, capsys):
    assert run_publish(run_root, "version=v1")[0] == 0
    assert run_publish(run_root, "version=v1")[0] == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache_hit"] is True
    trained = manifest.read(f"file://{run_root}/runs/r1/train_lora")
    record = {k: trained[k] for k in ("stage", "inputs", "config")}
    commit(run_root / "runs/r1/train_lora", {"adapter/adapter_model.safetensors": "other weights"}, record)
    code, _ = run_publish(run_root, "version=v1")
    assert code == 2
    assert "already committed for other inputs (adapter_uri); it is immutable" in capsys.readouterr().err


def test_newer_publish_code_republishing_the_same_content_keeps_the_version(run_root, capsys, monkeypatch):
    assert run_publish(run_root, "version=v1")[0] == 0
    before = (run_root / "models/folio/v1/manifest.json").read_bytes()
    monkeypatch.setattr(manifest, "code_version", lambda stage_file: {"source_sha256": "edited"})
    capsys.readouterr()
    assert run_publish(run_root, "version=v1")[0] == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache_hit"] is True
    assert (run_root / "models/folio/v1/manifest.json").read_bytes() == before


def test_publish_refuses_an_adapter_whose_quality_gate_failed(run_root, capsys):
    evaluate(run_root / "runs" / "r1", passed=False)
    code, committed = run_publish(run_root)
    assert code == 2 and committed is None
    assert "did not pass its quality gate (word_perplexity improved 9.0%" in capsys.readouterr().err
    assert run_publish(run_root, "require_gate=false")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model_name=../x"], "model_name='../x' must be"),
        (["version=a/b"], "version='a/b' must be"),
        (["evaluation_uri=/nowhere"], "evaluation_uri='file:///nowhere' is not a committed evaluate output"),
        (["predictions_uri=/nowhere"], "predictions_uri="),
        (["run_conf={'rank': 8}"], "run_conf is not JSON"),
        (["run_conf=[1, 2]"], "run_conf must be a JSON object, not list"),
    ],
)
def test_publish_bad_settings_exit_2_naming_the_field(run_root, capsys, args, message):
    assert run_publish(run_root, *args)[0] == 2
    assert message in capsys.readouterr().err


def shards(root: Path, counts: list[int], n: int | None = None) -> None:
    n = n or len(counts)
    start = 0
    for i, count in enumerate(counts):
        lines = "".join(json.dumps({"id": f"p{start + j}", "completion": "x"}) + "\n" for j in range(count))
        commit(
            root / "runs/b1/batch_infer" / layout.shard_name(i, n),
            {"predictions.jsonl": lines},
            {"stage": "batch_infer", "inputs": {}, "config": {}},
        )
        start += count


def run_merge(root: Path, *args: str) -> int:
    return merge_predictions.main([f"artifact_root={root}", "run_id=b1", *args])


def test_merge_concatenates_shards_in_order(tmp_path):
    shards(tmp_path, [2, 1, 3])
    assert run_merge(tmp_path, "num_shards=3") == 0
    merged = (tmp_path / "runs/b1/merge_predictions/predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in merged] == [f"p{i}" for i in range(6)]
    assert manifest.read(f"file://{tmp_path}/runs/b1/merge_predictions")["metrics"]["records_per_shard"] == [2, 1, 3]


def test_merge_of_one_shard_takes_the_unsharded_output(tmp_path):
    commit(
        tmp_path / "runs/b1/batch_infer",
        {"predictions.jsonl": '{"id": 1}\n{"id": 2}\n'},
        {"stage": "batch_infer", "inputs": {}, "config": {}},
    )
    assert run_merge(tmp_path) == 0
    assert len((tmp_path / "runs/b1/merge_predictions/predictions.jsonl").read_text().splitlines()) == 2


def test_merge_refuses_a_missing_shard_and_duplicate_ids(tmp_path, capsys):
    shards(tmp_path, [2, 2], n=3)  # shard 2 of 3 never committed
    assert run_merge(tmp_path, "num_shards=3") == 2
    assert "1 of 3 batch_infer shard(s) are not committed" in capsys.readouterr().err
    shards(tmp_path / "dup", [2, 2])
    (tmp_path / "dup/runs/b1/batch_infer/shard-00001-of-00002/predictions.jsonl").write_text('{"id": "p0"}\n')
    assert run_merge(tmp_path / "dup", "num_shards=2") == 2
    assert "id 'p0' appears in more than one record" in capsys.readouterr().err
