"""batch_infer: batched greedy generation equals per-prompt generate, shards, input validation."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from stages import batch_infer
from stages.core import generation, models
from stages.core.config import load_config
from stages.core.errors import ConfigError
from tests.conftest import run_stage_cli

MAX_NEW = 32
BATCH = 8
NEAR_TIE = 1e-5
# Prompt lengths in words: empty, tiny, medium, and one far longer than the context (it gets truncated).
WORDS = [0, 1, 2, 3, 5, 8, 13, 21, 34, 31, 4, 7, 9, 12, 16, 20, 25, 30, 33, 6, 11, 18, 27, 250]


def adapter_uri(finetune_run: dict) -> str:
    return f"file://{finetune_run['artifact_root']}/runs/ft/train_lora"


@pytest.fixture(scope="module")
def prompts(folio_corpus: Path) -> list[dict]:
    words = (folio_corpus / "romeo_and_juliet.txt").read_text(encoding="utf-8", errors="replace").split()
    records, start = [], 1000
    for i, n in enumerate(WORDS):
        # ids neither sorted nor of one type: output order must follow the input, not the ids
        record_id = 17 if i == 5 else f"q{(i * 7) % len(WORDS):02d}"
        records.append({"id": record_id, "prompt": " ".join(words[start : start + n]), "meta": i})
        start += n + 3
    return records


@pytest.fixture(scope="module")
def prompts_file(prompts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return path


@pytest.fixture(scope="module")
def merged(finetune_run):
    from peft import PeftModel

    base_path = finetune_run["base_model"].removeprefix("file://")
    tokenizer = models.load_tokenizer(base_path)
    base = models.load_model(base_path, torch.float32, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, adapter_uri(finetune_run).removeprefix("file://") + "/adapter")
    return model.merge_and_unload().eval(), tokenizer


@pytest.fixture(scope="module")
def prompt_ids(merged, prompts) -> list[list[int]]:
    model, tokenizer = merged
    limit = models.context_length(model.config, tokenizer) - MAX_NEW
    ids, truncated = generation.encode_prompts(tokenizer, [p["prompt"] for p in prompts], limit)
    assert truncated == [n == 250 for n in WORDS]
    return ids


@pytest.fixture(scope="module")
def per_prompt(merged, prompt_ids) -> list[list[int]]:
    """The reference: plain unbatched greedy generate, one prompt at a time, no padding."""
    model, tokenizer = merged
    outputs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )[0, len(ids) :].tolist()
            outputs.append(out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out)
    return outputs


def top_two_gap(model, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def near_ties(model, prompt_ids, reference, batched) -> dict[int, float]:
    """Prompts whose completions differ, with the top-two logit gap where they first diverge."""
    ties = {}
    for i, (ref, got) in enumerate(zip(reference, batched, strict=True)):
        if ref != got:
            k = next((k for k, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
            ties[i] = top_two_gap(model, prompt_ids[i] + ref[:k])
    return ties


@pytest.fixture(scope="module")
def batched(merged, prompt_ids) -> dict:
    """The stage's generation function, in batches of 8 (3 batches of mixed lengths, left-padded)."""
    model, tokenizer = merged
    completions, batches = generation.generate_completions(
        model, tokenizer, prompt_ids, batch_size=BATCH, max_new_tokens=MAX_NEW
    )
    return {"completions": completions, "batches": batches}


@pytest.fixture(scope="module")
def ties(merged, prompt_ids, per_prompt, batched) -> dict[int, float]:
    return near_ties(merged[0], prompt_ids, per_prompt, batched["completions"])


def test_batched_greedy_equals_per_prompt_generate(prompt_ids, per_prompt, batched, ties):
    assert batched["batches"] == len(prompt_ids) // BATCH
    print(f"{len(ties)} of {len(prompt_ids)} completions differ at a near-tie (top-two logit gap): {ties}")
    assert len(ties) <= 2
    assert all(gap < NEAR_TIE for gap in ties.values()), ties
    same = [i for i in range(len(prompt_ids)) if i not in ties]
    assert [batched["completions"][i] for i in same] == [per_prompt[i] for i in same]
    assert sum(len(c) for c in per_prompt) > len(prompt_ids) * MAX_NEW // 2  # real completions, not all eos


class ScriptedModel(torch.nn.Module):
    """generate() appends a fixed continuation per prompt (keyed by its last token), then padding."""

    def __init__(self, continuations: dict[int, list[int]], pad: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": None})()
        self.continuations, self.pad, self.calls = continuations, pad, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        rows = [(self.continuations[int(row[-1])] + [self.pad] * max_new_tokens)[:max_new_tokens] for row in input_ids]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_completions_stop_at_end_of_text_and_come_back_in_input_order(merged):
    _, tokenizer = merged
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    model = ScriptedModel({7: [20, 21, eos, 22], 8: [30], 13: [eos, 40], 15: [50, 51, 52, 53]}, pad)
    completions, batches = generation.generate_completions(model, tokenizer, prompts, batch_size=2, max_new_tokens=4)
    assert completions == [[20, 21], [30], [], [50, 51, 52, 53]]  # pad is end-of-text here too
    assert batches == 2
    first_ids, first_mask = model.calls[0]  # longest first, left-padded, masked
    assert first_ids[1, :2].tolist() == [pad, pad] and first_ids[1, 2:].tolist() == [5, 6, 7]
    assert first_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]


def test_left_padding_with_masks_is_what_makes_batches_match(merged, prompt_ids, per_prompt):
    """The control: the same batch right-padded (no left padding) does not reproduce the reference."""
    model, tokenizer = merged
    short = [i for i in range(len(prompt_ids)) if 0 < len(prompt_ids[i]) < 20][:4]
    long_ = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    chunk = [long_, *short]
    tokenizer.padding_side = "right"
    padded = tokenizer.pad({"input_ids": [prompt_ids[i] for i in chunk]}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**padded, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "left"
    width = padded["input_ids"].shape[1]
    assert any(out[j, width:].tolist() != per_prompt[i][:4] for j, i in enumerate(chunk) if j > 0)


# ---------------------------------------------------------------------------------------------
# The stage


def stage_args(finetune_run: dict, run_id: str, prompts_file: Path, *extra: str) -> list[str]:
    return [
        f"artifact_root={finetune_run['artifact_root']}",
        f"run_id={run_id}",
        f"base_model={finetune_run['base_model']}",
        f"adapter_uri={adapter_uri(finetune_run)}",
        f"prompts_uri={prompts_file}",
        f"batch_size={BATCH}",
        f"max_new_tokens={MAX_NEW}",
        *extra,
    ]


def stage_dir(finetune_run: dict, run_id: str, *parts: str) -> Path:
    return Path(finetune_run["artifact_root"], "runs", run_id, "batch_infer", *parts)


def read_predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_shard(finetune_run, prompts_file) -> dict:
    proc = run_stage_cli("batch_infer", *stage_args(finetune_run, "infer", prompts_file))
    return {"result": json.loads(proc.stdout.strip().splitlines()[-1]), "out": stage_dir(finetune_run, "infer")}


@pytest.mark.integration
def test_stage_writes_per_prompt_greedy_completions_in_input_order(
    single_shard, merged, prompts, prompt_ids, per_prompt, batched, ties
):
    _, tokenizer = merged
    predictions = read_predictions(single_shard["out"])
    assert [p["id"] for p in predictions] == [r["id"] for r in prompts]
    for i, (p, ids) in enumerate(zip(predictions, prompt_ids, strict=True)):
        # a near-tie may go either way; the stage then agrees with its own batched run
        expected = batched["completions"][i] if i in ties else per_prompt[i]
        assert p["completion"] == tokenizer.decode(expected, skip_special_tokens=True), i
        assert p["completion_tokens"] == len(expected)
        assert p["prompt_tokens"] == len(ids)
    assert [p.get("truncated", False) for p in predictions] == [n == 250 for n in WORDS]
    assert "truncated" not in predictions[0]


@pytest.mark.integration
def test_stage_metrics(single_shard, prompts):
    metrics = single_shard["result"]["metrics"]
    assert metrics["prompts"] == len(prompts)
    assert metrics["batches"] == 3
    assert metrics["truncated_prompts"] == 1
    assert metrics["generated_tokens"] == sum(p["completion_tokens"] for p in read_predictions(single_shard["out"]))
    assert metrics["tokens_per_second"] > 0
    committed = json.loads((single_shard["out"] / "manifest.json").read_text())
    assert list(committed["outputs"]) == ["predictions.jsonl"]
    assert set(committed["inputs"]) == {"base_model", "adapter_uri", "prompts_uri"}


def run_in_process(args: list[str]) -> int:
    return batch_infer.main(args)


@pytest.mark.integration
def test_three_shards_cover_every_id_once_and_equal_the_single_shard(finetune_run, prompts_file, single_shard, capsys):
    shards = []
    for i in range(3):
        args = stage_args(finetune_run, "infer-sharded", prompts_file, f"shard_index={i}", "num_shards=3")
        assert run_in_process(args) == 0
        folder = stage_dir(finetune_run, "infer-sharded", f"shard-{i:05d}-of-00003")
        committed = json.loads((folder / "manifest.json").read_text())
        assert committed["config"]["shard_index"] == i and committed["config"]["num_shards"] == 3
        shards.append(read_predictions(folder))
    assert [len(s) for s in shards] == [8, 8, 8]  # [i*24//3, (i+1)*24//3)
    ids = [p["id"] for shard in shards for p in shard]
    assert len(ids) == len(set(ids))
    assert [p for shard in shards for p in shard] == read_predictions(single_shard["out"])
    assert not (stage_dir(finetune_run, "infer-sharded") / "manifest.json").exists()
    capsys.readouterr()


def test_shard_bounds_are_contiguous_and_complete():
    for total in (0, 1, 2, 5, 24, 100, 101):
        for count in (1, 2, 3, 7, 16):
            slices = [batch_infer.shard_bounds(total, i, count) for i in range(count)]
            assert slices[0][0] == 0 and slices[-1][1] == total
            assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
            assert max(b - a for a, b in slices) - min(b - a for a, b in slices) <= 1


def test_shards_commit_under_their_own_folder(tmp_path):
    common = [f"artifact_root={tmp_path}", "run_id=r", "base_model=m", "prompts_uri=p.jsonl"]
    single = load_config(batch_infer.BatchInferConfig, None, common)
    shard = load_config(batch_infer.BatchInferConfig, None, [*common, "shard_index=2", "num_shards=12"])
    assert single.output_uri("batch_infer") == f"file://{tmp_path}/runs/r/batch_infer"
    assert shard.output_uri("batch_infer") == f"file://{tmp_path}/runs/r/batch_infer/shard-00002-of-00012"
    assert single.adapter_uri == f"file://{tmp_path}/runs/r/train_lora"
    assert load_config(batch_infer.BatchInferConfig, None, [*common, "adapter_uri=None"]).adapter_uri == "none"


def test_shard_index_out_of_range_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("shard_index=3 must be in [0, num_shards=3)")):
        load_config(
            batch_infer.BatchInferConfig,
            None,
            [f"artifact_root={tmp_path}", "base_model=m", "prompts_uri=p.jsonl", "shard_index=3", "num_shards=3"],
        )


BAD_INPUTS = {
    "broken_json": ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n', r"line 2: not valid JSON"),
    "duplicate_id": (
        '{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
        r"line 4: duplicate id 'a' \(first on line 1\)",
    ),
    "missing_prompt": ('{"id": "a", "prompt": "x"}\n{"id": "b", "text": "y"}\n', r"line 2: no 'prompt' field"),
    "prompt_not_a_string": ('{"id": "a", "prompt": ["x"]}\n', r"line 1: 'prompt' is \['x'\], not a string"),
    "missing_id": ('{"prompt": "x"}\n', r"line 1: no 'id' field"),
    "empty_file": ("\n\n", r"is empty: no prompts"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_prompts_exit_2_naming_file_line_and_value_and_leave_nothing(finetune_run, tmp_path, capsys, case):
    text, message = BAD_INPUTS[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text(text)
    run_id = f"bad-{case.replace('_', '-')}"
    # the error is found in the whole file even when this shard's slice is clean
    assert run_in_process(stage_args(finetune_run, run_id, path, "shard_index=0", "num_shards=1")) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert str(path) in err
    out = stage_dir(finetune_run, run_id)
    assert not (out / "predictions.jsonl").exists() and not (out / "manifest.json").exists()


def test_shard_index_not_below_num_shards_exits_2(finetune_run, prompts_file, capsys):
    assert run_in_process(stage_args(finetune_run, "bad-shard", prompts_file, "shard_index=2", "num_shards=2")) == 2
    assert "shard_index=2 must be in [0, num_shards=2)" in capsys.readouterr().err
    assert not stage_dir(finetune_run, "bad-shard").exists()


def test_bare_base_model_with_adapter_none(finetune_run, prompts_file, merged, capsys):
    args = stage_args(finetune_run, "infer-base", prompts_file, "adapter_uri=none", "max_new_tokens=8")
    assert run_in_process(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metrics"]["prompts"] == len(WORDS) and result["metrics"]["adapter"] == "none"
    committed = json.loads((stage_dir(finetune_run, "infer-base") / "manifest.json").read_text())
    assert "adapter_uri" not in committed["inputs"]
    assert len(read_predictions(stage_dir(finetune_run, "infer-base"))) == len(WORDS)


def make_other_base_model(base_model: str, folder: Path) -> str:
    """A randomly initialised model with the same architecture and tokenizer: another base model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base_path = base_model.removeprefix("file://")
    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path)).save_pretrained(folder)
    models.load_tokenizer(base_path).save_pretrained(folder)
    return f"file://{folder}"


def test_adapter_of_another_base_model_exits_2(finetune_run, prompts_file, tmp_path, capsys):
    other = make_other_base_model(finetune_run["base_model"], tmp_path / "other")
    args = stage_args(finetune_run, "infer-other-base", prompts_file)
    args[2] = f"base_model={other}"
    assert run_in_process(args) == 2
    assert "do not match" in capsys.readouterr().err
    assert not (stage_dir(finetune_run, "infer-other-base") / "manifest.json").exists()


def test_one_run_holds_sharded_or_unsharded_outputs_not_both(finetune_run, prompts_file, capsys):
    args = stage_args(finetune_run, "infer-mixed", prompts_file, "max_new_tokens=4")
    assert run_in_process([*args, "shard_index=0", "num_shards=2"]) == 0
    committed = stage_dir(finetune_run, "infer-mixed", "shard-00000-of-00002", "predictions.jsonl")
    assert run_in_process(args) == 2
    assert "already holds sharded outputs" in capsys.readouterr().err
    assert committed.exists()  # the unsharded attempt did not clear the committed shard


def test_sampling_is_reproducible_by_seed(finetune_run, prompts_file, capsys):
    sample = ["do_sample=true", "temperature=0.9", "top_k=50", "top_p=0.95", "max_new_tokens=12"]
    outputs = {}
    for run_id, seed in (("sample-a", 1), ("sample-b", 1), ("sample-c", 2)):
        assert run_in_process(stage_args(finetune_run, run_id, prompts_file, *sample, f"seed={seed}")) == 0
        outputs[run_id] = [p["completion"] for p in read_predictions(stage_dir(finetune_run, run_id))]
    capsys.readouterr()
    assert outputs["sample-a"] == outputs["sample-b"]
    assert outputs["sample-a"] != outputs["sample-c"]


def test_prompts_with_a_byte_order_mark_read_like_without(tmp_path):
    lines = "".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n" for i in range(3)).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines)
    (tmp_path / "plain.jsonl").write_bytes(lines)

    def read(name: str) -> list:
        config = batch_infer.BatchInferConfig(base_model="m", prompts_uri=str(tmp_path / name), artifact_root="a")
        prompts, total = batch_infer.read_prompts(config)
        return [(p.id, p.text) for p in prompts] + [total]

    assert read("bom.jsonl") == read("plain.jsonl")
