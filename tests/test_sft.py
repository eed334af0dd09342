"""Supervised fine-tuning (task=sft) on every major open model family, and its bad inputs.

Each family (tests/families.py) is a tiny random-init model with a tokenizer in that family's format.
Per family: the labelled tokens are exactly the assistant turns and their end-of-turn token; a packed
block scores the sum of its examples scored alone; the chain tokenize -> train_lora -> evaluate ->
batch_infer runs (stages in-process), LoRA's default target modules are found, the adapter loads with
plain ``PeftModel.from_pretrained``, a preempted training resumes to bitwise the same adapter, and
batched greedy generation equals unbatched.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from stages import batch_infer, evaluate, tokenize, train_lora
from stages.core import chat, layout, token_blocks
from stages.core.generation import generate_completions
from tests import families


@pytest.fixture(scope="session")
def family_data(tmp_path_factory) -> Path:
    records = families.conversations(48)
    path = tmp_path_factory.mktemp("sft_data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def family_models(family_data: Path, tmp_path_factory) -> dict[str, Path]:
    """Every family's tiny model, built once (a fraction of a second each)."""
    corpus = [t["content"] for line in family_data.read_text().splitlines() for t in json.loads(line)["messages"]]
    root = tmp_path_factory.mktemp("families")
    built = {}
    for name, family in families.FAMILIES.items():
        built[name] = families.build(family, root / name, corpus)
        if family.template_file:
            (root / f"{name}.jinja").write_text(family.template_file)
    return built


def template_of(name: str, models: dict[str, Path]) -> str:
    """The tokenize setting for the family: its tokenizer's own template, or the template file."""
    return str(models[name].parent / f"{name}.jinja") if families.FAMILIES[name].template_file else ""


def renderer(name: str, models: dict[str, Path]) -> chat.Renderer:
    from transformers import AutoTokenizer

    family = families.FAMILIES[name]
    return chat.Renderer(AutoTokenizer.from_pretrained(models[name]), family.template or family.template_file)


def run(stage, capsys, *args: str) -> dict:
    """A stage in-process; its result line."""
    code = stage.main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive labelled tokens."""
    found, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != chat.IGNORE:
            assert label == token
            current.append(token)
        elif current:
            found.append(current)
            current = []
    return [*found, current] if current else found


# ---------------------------------------------------------------------------------------------
# Labels and packing, per family


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_the_labels_are_each_assistant_turn_and_its_end_of_turn_token(name, family_models):
    r = renderer(name, family_models)
    end_of_turn = r.tokenizer.convert_tokens_to_ids(families.FAMILIES[name].end_of_turn)
    turns = [
        {"role": "user", "content": "Spell golf backwards."},
        {"role": "assistant", "content": "flog"},
        {"role": "user", "content": "And kilo, twice?"},
        {"role": "assistant", "content": "olik olik it is."},
    ]
    ids, labels = r.example(turns)
    found = spans(ids, labels)
    assert len(found) == 2, [r.tokenizer.decode(s) for s in found]
    for span, turn in zip(found, (turns[1], turns[3]), strict=True):
        assert span[-1] == end_of_turn  # the model learns to stop
        assert r.tokenizer.decode(span[:-1]).strip() == turn["content"]
    assert r.stop_ids()[0] == end_of_turn
    # Everything else is the prompt side: user turns, markup, BOS.
    assert sum(len(s) for s in found) == sum(label != chat.IGNORE for label in labels)


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_a_packed_block_scores_the_sum_of_its_examples_scored_alone(name, family_models):
    from transformers import AutoModelForCausalLM

    r = renderer(name, family_models)
    model = AutoModelForCausalLM.from_pretrained(family_models[name]).eval()
    examples = [r.example(c["messages"]) for c in families.conversations(3, seed=1)]
    blocks = chat.pack(examples, sum(len(ids) for ids, _ in examples) + 5, pad_id=0, packing=True)
    assert len(blocks.input_ids) == 1 and blocks.padding == 5

    packed = loss_sum(model, **{k: torch.tensor(getattr(blocks, k)).long() for k in token_blocks.BLOCK_COLUMNS})
    alone = scored_alone(model, examples)
    assert packed == pytest.approx(alone, rel=1e-5)
    # Without the restarting position ids the examples see each other: a different number.
    unrestarted = {k: torch.tensor(getattr(blocks, k)).long() for k in ("input_ids", "labels")}
    crossed = loss_sum(model, **unrestarted)
    assert crossed != pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_evaluate_scores_a_padded_batch_as_its_conversations_scored_alone(name, family_models):
    """The evaluate stage's batches (right-padded, the head run only where a token is scored) give the
    log-likelihood of the model's own loss, conversation by conversation."""
    from transformers import AutoModelForCausalLM

    r = renderer(name, family_models)
    model = AutoModelForCausalLM.from_pretrained(family_models[name]).eval()
    examples = [r.example(c["messages"]) for c in families.conversations(5, seed=2)]
    assert len({len(ids) for ids, _ in examples}) > 1  # the batches pad
    batched = evaluate.assistant_loglikelihood(model, examples, batch_size=3, device=torch.device("cpu"))
    assert -batched == pytest.approx(scored_alone(model, examples), rel=1e-5)


def loss_sum(model, **batch) -> float:
    with torch.no_grad():  # num_items_in_batch=1: the sum of the token losses
        return float(model(**batch, use_cache=False, num_items_in_batch=1).loss)


def scored_alone(model, examples: list[tuple[list[int], list[int]]]) -> float:
    return sum(loss_sum(model, input_ids=torch.tensor([i]), labels=torch.tensor([labels])) for i, labels in examples)


def test_packing_fills_blocks_best_fit_and_keeps_every_example_whole():
    examples = [([i] * n, [i] * n) for i, n in enumerate([5, 3, 4, 2, 6, 1], start=1)]
    packed = chat.pack(examples, 8, pad_id=0, packing=True)
    unpacked = chat.pack(examples, 8, pad_id=0, packing=False)
    assert len(packed.input_ids) == 3 and packed.padding == 3 * 8 - 21
    assert len(unpacked.input_ids) == 6 and unpacked.padding == 6 * 8 - 21
    for blocks in (packed, unpacked):
        seen = []
        for row, positions in zip(blocks.input_ids.tolist(), blocks.position_ids.tolist(), strict=True):
            starts = [j for j, p in enumerate(positions) if p == 0] + [8]
            for a, b in itertools.pairwise(starts):
                if row[a]:  # padding is 0 here
                    assert set(row[a:b]) == {row[a]} and positions[a:b] == list(range(b - a))
                    seen.append((row[a], b - a))
        assert sorted(seen) == [(i, n) for i, n in enumerate([5, 3, 4, 2, 6, 1], start=1)]


# ---------------------------------------------------------------------------------------------
# The chain, per family


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_the_sft_chain_runs_on_every_family(name, family_models, family_data, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family = families.FAMILIES[name]
    base = f"file://{family_models[name]}"
    common = [f"artifact_root={tmp_path}", f"base_model={base}"]
    started = time.perf_counter()
    tokenized = run(tokenize, capsys, *common, "run_id=a", f"input_uri={family_data}", "task=sft", "block_size=64",
                    f"chat_template={template_of(name, family_models)}", "validation_fraction=0.25")  # fmt: skip
    assert tokenized["metrics"]["train_examples"] == 36 and tokenized["metrics"]["records_kept"] == 48
    train_args = ["max_steps=6", "batch_size=4", "checkpoint_every=2", "learning_rate=1e-2"]
    trained = run(train_lora, capsys, *common, "run_id=a", *train_args)
    assert 0 < trained["metrics"]["loss_token_share"] < 0.5
    scored = run(evaluate, capsys, *common, "run_id=a", "sample_max_new_tokens=6", "num_samples=2")
    assert scored["metrics"]["task"] == "sft" and scored["metrics"]["conversations"] == 12
    prompts = tmp_path / "prompts.jsonl"
    held_out = [json.loads(line)["messages"] for line in (tmp_path / "runs/a/tokenize" / layout.VALIDATION_DOCS)
                .read_text().splitlines()]  # fmt: skip
    prompts.write_text("".join(json.dumps({"id": i, "messages": m[:1]}) + "\n" for i, m in enumerate(held_out)))
    inferred = run(batch_infer, capsys, *common, "run_id=a", f"prompts_uri={prompts}", "max_new_tokens=6")
    with capsys.disabled():
        print(
            f"\nSFT chain on {name}: {time.perf_counter() - started:.1f} s (tokenize, 6 steps, evaluate, batch_infer)"
        )
    assert inferred["metrics"]["prompts"] == 12

    adapter = tmp_path / "runs/a/train_lora" / layout.ADAPTER
    targets = {
        t.rsplit(".", 1)[-1] for t in json.loads((adapter / layout.ADAPTER_CONFIG).read_text())["target_modules"]
    }
    assert set(family.targets) <= targets, targets  # the default (all-linear) found the family's own layers
    assert (adapter / layout.CHAT_TEMPLATE).read_text() == (family.template or family.template_file)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family_models[name]), adapter)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())

    # Preempted after step 3 (SIGTERM's flag), then rerun: bitwise the uninterrupted adapter.
    real_step = train_lora.LoRARecipe.train_step

    def step_then_preempt(self):
        loss = real_step(self)
        self.notice.received = self.step == 3 and self.resumed_from is None
        return loss

    monkeypatch.setattr(train_lora.LoRARecipe, "train_step", step_then_preempt)
    b = [*common, "run_id=b", f"dataset_uri={tmp_path}/runs/a/tokenize", *train_args]
    assert train_lora.main(b) == 143
    resumed = run(train_lora, capsys, *b)
    assert resumed["metrics"]["resumed_from_step"] == 3
    for file in ("adapter_model.safetensors", layout.ADAPTER_CONFIG):
        assert (tmp_path / "runs/b/train_lora/adapter" / file).read_bytes() == (adapter / file).read_bytes(), file

    # Batched greedy equals one prompt at a time.
    r = renderer(name, family_models)
    model = model.merge_and_unload().eval()
    ids = [r.prompt_ids(m[:1]) for m in held_out[:6]]
    batched, _ = generate_completions(model, r.tokenizer, ids, batch_size=6, max_new_tokens=6, stops=r.stop_ids())
    alone = [generate_completions(model, r.tokenizer, [p], batch_size=1, max_new_tokens=6, stops=r.stop_ids())[0][0]
             for p in ids]  # fmt: skip
    assert batched == alone


# ---------------------------------------------------------------------------------------------
# Data in: shapes, drop reasons, bad input


@pytest.fixture
def sft_tokenize(tmp_path, family_models, capsys):
    """tokenize task=sft in-process on a family's model: (exit code, metrics or None, stderr)."""

    def go(records: list, name: str = "llama", *overrides: str, suffix: str = ".jsonl"):
        data = tmp_path / f"data{suffix}"
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), data)
        else:
            data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
        args = [f"artifact_root={tmp_path}/art", f"base_model=file://{family_models[name]}", f"input_uri={data}",
                "task=sft", "block_size=64", f"chat_template={template_of(name, family_models)}",
                *overrides]  # fmt: skip
        code = tokenize.main(args)
        out, err = capsys.readouterr()
        return code, (json.loads(out.strip().splitlines()[-1])["metrics"] if code == 0 else None), err

    return go


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


GOOD = [{"messages": [user(f"Card {i}: spell golf."), assistant("flog")]} for i in range(8)]


def test_each_unusable_conversation_is_dropped_and_counted_by_reason(sft_tokenize):
    records = [
        *GOOD,
        GOOD[0],  # duplicate
        {"messages": [user("hi"), {"role": "narrator", "content": "x"}, assistant("ok")]},  # unknown_role
        {"messages": [user("hi"), assistant("  ")]},  # empty_assistant
        {"messages": [user("hi")]},  # no_assistant
        {"messages": [user("hi"), assistant("ok"), user("and?")]},  # not_ending_with_assistant
        {"prompt": "Card 99: spell golf.", "completion": "flog"},  # prompt/completion: kept
        {"prompt": "long " * 80, "completion": "flog"},  # too_long after templating
    ]
    code, metrics, err = sft_tokenize(records)
    assert code == 0, err
    assert metrics["records_read"] == 15 and metrics["records_kept"] == 10  # too long shows after templating
    for reason in ("duplicate", "unknown_role", "empty_assistant", "no_assistant", "not_ending_with_assistant"):
        assert metrics[f"dropped_{reason}"] == 1, reason
    assert metrics["dropped_too_long"] == 1 and metrics["train_examples"] + metrics["validation_examples"] == 9


def test_truncation_keeps_an_overlong_example_whose_assistant_turn_fits(sft_tokenize):
    records = [*GOOD, {"messages": [user("Card 0"), assistant("flog " * 60)]}]
    code, metrics, err = sft_tokenize(records, "llama", "truncation=true")
    assert code == 0, err
    assert metrics["examples_truncated"] == 1 and metrics["dropped_too_long"] == 0


def test_prompt_and_completion_field_names_are_configurable_and_parquet_holds_messages(sft_tokenize):
    records = [{"question": f"Card {i}: spell golf.", "answer": "flog"} for i in range(8)]
    code, metrics, err = sft_tokenize(records, "qwen2", "prompt_field=question", "completion_field=answer")
    assert code == 0, err
    assert metrics["records_kept"] == 8
    code, metrics, err = sft_tokenize(GOOD, "qwen2", "run_id=parquet", suffix=".parquet")
    assert code == 0, err
    assert metrics["records_kept"] == 8 and metrics["tokens_with_loss"] == 8 * 2  # "flog" + end of turn


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"messages": "user: hi"}, "'messages' is str, not a list of turns"),
        ({"messages": [{"content": "hi"}, assistant("ok")]}, "turn 0 is not an object with 'role' and 'content'"),
        ({"messages": [user("hi"), {"role": "assistant", "content": 7}]}, "turn 1: role and content must be strings"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_record_that_is_not_a_conversation_is_counted_or_refused_by_its_line(sft_tokenize, tmp_path, bad, named):
    code, metrics, err = sft_tokenize([*GOOD, bad], "llama", "max_bad_fraction=0.2")
    assert code == 0 and metrics["dropped_bad_conversation"] + metrics["dropped_bad_json"] == 1
    code, _, err = sft_tokenize([*GOOD, bad], "llama", "max_bad_fraction=0", "run_id=strict")
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert f"data.jsonl record 9: {named}" in err
    assert not (tmp_path / "art/runs/strict/tokenize/manifest.json").exists()


def test_templates_that_fail_are_refused_with_one_line(sft_tokenize, tmp_path):
    # Gemma's own template raises on a system turn.
    system = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD[0]["messages"]]}
    code, _, err = sft_tokenize([system, *GOOD[1:]], "gemma2")
    assert code == 2 and "the chat template failed" in err and "System role not supported" in err
    # A template that leaves the assistant's words out.
    silent = tmp_path / "silent.jinja"
    silent.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}")
    code, _, err = sft_tokenize(GOOD, "llama", f"chat_template={silent}")
    assert code == 2 and "produced no assistant span" in err
    # GPT-2 has no template of its own, and none is given.
    code, _, err = sft_tokenize(GOOD, "gpt2", "chat_template=")
    assert code == 2 and "has no chat template: set chat_template" in err
    # A named template whose markup the tokenizer lacks.
    code, _, err = sft_tokenize(GOOD, "gpt2", "chat_template=chatml")
    assert code == 2 and "needs the special tokens" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "art").rglob("manifest.json"))


def test_plain_text_input_is_refused_for_sft(sft_tokenize, tmp_path):
    code, _, err = sft_tokenize(["just some text"], "llama", suffix=".txt")
    assert code == 2 and "task=sft reads JSONL or Parquet records" in err


def test_the_demo_conversations_are_deterministic_and_its_prompts_are_not_trained_on(texts_dir, tmp_path):
    from genai_dags import demo_data

    demo_data.write(texts_dir, tmp_path / "a", per_play=50)
    demo_data.write(texts_dir, tmp_path / "b", per_play=50)
    files = (demo_data.TRAIN_FILE, demo_data.PROMPTS_FILE)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    lines = {name: (tmp_path / "a" / name).read_text().splitlines() for name in files}
    trained = [json.loads(line)["messages"] for line in lines[demo_data.TRAIN_FILE]]
    prompts = [json.loads(line) for line in lines[demo_data.PROMPTS_FILE]]
    assert len(trained) == 50 * len(demo_data.PLAYS) and len(prompts) == 2 * len(demo_data.PLAYS)
    assert {t[1]["content"] for t in trained} == set(demo_data.PLAYS.values())
    assert not {p["messages"][0]["content"] for p in prompts} & {t[0]["content"] for t in trained}


@pytest.mark.parametrize(
    ("record", "named"),
    [
        ({"id": 1, "messages": "hi"}, "'messages' is str, not a list of turns"),
        ({"id": 1, "messages": [{"role": "user"}]}, "turn 0 is not an object with 'role' and 'content'"),
        ({"id": 1, "messages": [user("hi"), assistant("ok")]}, "no turn to answer"),
        ({"id": 1, "messages": [{"role": "oracle", "content": "hi"}]}, "unknown role 'oracle'"),
        ({"id": 1, "prompt": "plain text"}, "mixes text prompts and chat records"),
    ],
)
def test_a_bad_chat_prompt_is_refused_by_every_shard_with_its_line(record, named, family_models, tmp_path, capsys):
    good = [{"id": i + 2, "messages": [user("Card 1: spell golf.")]} for i in range(3)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [*good, record]))
    for shard in (0, 1):  # the bad record is in shard 1 only; shard 0 refuses it all the same
        args = [f"artifact_root={tmp_path}/art", f"base_model=file://{family_models['qwen2']}", "adapter_uri=none",
                f"prompts_uri={prompts}", "num_shards=2", f"shard_index={shard}"]  # fmt: skip
        assert batch_infer.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "prompts.jsonl line 4: " in err and named in err, err
    assert not list((tmp_path / "art").rglob("manifest.json"))
