"""Batch inference: complete every prompt of a JSONL file with the base model + LoRA adapter.

    python -m stages.batch_infer base_model=s3://bucket/models/base run_id=exp1 prompts_uri=s3://bucket/prompts.jsonl

Reads ``{"id": ..., "prompt": ...}`` records, or chat records ``{"id": ..., "messages": [...]}`` (rendered
with the adapter's chat template and its generation prompt; a completion stops at the template's end of
turn and holds the assistant's text only), generates a completion for each (greedy by default) in
length-sorted, left-padded batches, and writes ``predictions.jsonl`` in input order:

    {"id": ..., "completion": "...", "prompt_tokens": 17, "completion_tokens": 64}
    {"id": ..., "completion": "...", "prompt_tokens": 192, "completion_tokens": 64, "truncated": true}

``truncated`` appears only for prompts cut from the left to leave room for ``max_new_tokens`` in the
model's context; ``completion_tokens`` does not count the end-of-text token that stopped a completion.
Greedy completions equal those of an unbatched ``model.generate`` on each prompt (up to float near-ties).

Sharding for fan-out: with ``num_shards=n`` the task ``shard_index=i`` takes records
``[i*N//n, (i+1)*N//n)`` of the N records and commits under
``<artifact_root>/runs/<run_id>/batch_infer/shard-<i:05d>-of-<n:05d>/`` with its own manifest.
Every shard validates the whole file, so all shards agree on what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from stages.core import chat, layout, manifest, models, store, uris
from stages.core.config import SEED_BOUNDS, check, help_field
from stages.core.encodings import without_bom
from stages.core.errors import UserError, shown
from stages.core.generation import encode_prompts, generate_completions
from stages.core.runner import StageConfig, StageRun, run_stage

log = logging.getLogger("stages.batch_infer")
NO_ADAPTER = "none"


@dataclass(kw_only=True)
class BatchInferConfig(StageConfig):
    base_model: str = help_field("", "Base model: URI of a save_pretrained folder, or a hub model id.")
    adapter_uri: str = help_field(
        "", "Output of train_lora (or a PEFT adapter folder); empty means this run's; 'none' means the bare base model."
    )
    prompts_uri: str = help_field(
        "", "JSONL of prompts, one {id_field: ..., prompt_field: ...} object per line: a file, folder or glob."
    )
    id_field: str = help_field("id", "Key of each record's unique id (a string or an integer).")
    prompt_field: str = help_field("prompt", "Key of each record's prompt text.")
    messages_field: str = help_field(
        "messages", "Key of a chat record's turns ({role, content} objects), used instead of prompt_field."
    )
    shard_index: int = help_field(0, "Which shard of the prompts this task completes (0-based).")
    num_shards: int = help_field(1, "How many shards the prompts are split into (contiguous slices of records).")
    batch_size: int = help_field(64, "Prompts per generate call.", bounds=(1, 4096))
    max_new_tokens: int = help_field(
        64, "Most tokens generated per prompt (generation also stops at end-of-text).", bounds=(1, 131_072)
    )
    do_sample: bool = help_field(False, "false: greedy decoding; true: sample with temperature / top_p / top_k.")
    temperature: float = help_field(1.0, "Sampling temperature (with do_sample=true).")
    top_p: float = help_field(1.0, "Nucleus sampling mass (with do_sample=true); 1 disables it.")
    top_k: int = help_field(0, "Sample from the k most likely tokens (with do_sample=true); 0 disables it.")
    seed: int = help_field(0, "Seed for sampling.", bounds=SEED_BOUNDS)
    merge_adapter: bool = help_field(True, "Merge the LoRA weights into the base model before generating (faster).")
    precision: Literal["auto", "fp32", "bf16"] = help_field("auto", "auto: bf16 on a GPU that has it, else fp32.")
    device: Literal["auto", "cpu", "cuda"] = help_field("auto", "Where to run the model.")

    OPERATIONAL = frozenset({"device"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.base_model = models.check_base_model(self.base_model)
        if self.adapter_uri.strip().lower() == NO_ADAPTER:
            self.adapter_uri = NO_ADAPTER
        else:
            self.resolve_input("adapter_uri", layout.TRAIN_LORA)
        check(bool(self.prompts_uri), "prompts_uri is required: a JSONL file of prompts")
        self.prompts_uri = uris.normalize_uri(self.prompts_uri, "prompts_uri")
        check(bool(self.id_field), "id_field must not be empty")
        check(bool(self.prompt_field), "prompt_field must not be empty")
        check(bool(self.messages_field), "messages_field must not be empty")
        check(1 <= self.num_shards <= 99_999, f"num_shards={self.num_shards} must be in [1, 99999]")
        check(
            0 <= self.shard_index < self.num_shards,
            f"shard_index={self.shard_index} must be in [0, num_shards={self.num_shards})",
        )
        check(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        check(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 disables it)")

    def output_uri(self, stage: str) -> str:
        if self.num_shards > 1:
            return self.run_uri(stage, layout.shard_name(self.shard_index, self.num_shards))
        return self.run_uri(stage)


def shard_bounds(total: int, index: int, count: int) -> tuple[int, int]:
    """Records [start, stop) of shard ``index``: contiguous, and every record in exactly one shard."""
    return index * total // count, (index + 1) * total // count


def inputs(config: BatchInferConfig) -> dict[str, str]:
    check_layout(config)
    input_uris = {"base_model": config.base_model, "prompts_uri": config.prompts_uri}
    if config.adapter_uri != NO_ADAPTER:
        input_uris["adapter_uri"] = config.adapter_uri
    return input_uris


def check_layout(config: BatchInferConfig) -> None:
    """One run_id holds either one unsharded output or shard folders, never both.

    Checked here because the runner clears uncommitted files under the output folder before the work
    starts, and an unsharded run would take the committed shard folders below it for leftovers.
    """
    stage_uri = config.run_uri(layout.BATCH_INFER)
    if config.num_shards == 1:
        shards = [d for d in store.list_dirs(stage_uri) if d.startswith(layout.SHARD_PREFIX)]
        if shards:
            raise UserError(
                f"{stage_uri} already holds sharded outputs ({shards[0]}, ...): run num_shards=1 under a new run_id"
            )
    elif manifest.read(stage_uri) is not None:
        raise UserError(f"{stage_uri} already holds an unsharded output: run num_shards>1 under a new run_id")


# ---------------------------------------------------------------------------------------------
# Reading prompts: streamed, validated in full, only this shard's records kept


class Prompt(NamedTuple):
    index: int  # 0-based record index over all files
    where: str  # "<file> line <n>"
    id: str | int
    text: str | list[dict[str, str]]  # a prompt, or the turns of a chat record


def _records(files: list[str]) -> Iterator[tuple[str, int, bytes]]:
    """(file, line number, raw line) of every non-blank line, file after file; blank lines are not records."""
    for file in files:
        with store.open_file(file, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if number == 1:
                    raw = without_bom(file, raw)
                if raw.strip():
                    yield file, number, raw


def read_prompts(config: BatchInferConfig) -> tuple[list[Prompt], int]:
    """This shard's prompts in input order, and the number of records in all of prompts_uri.

    Two streaming passes: one counts the records (the shard bounds need the total), one validates every
    record and keeps this shard's. Only the ids of other shards are held (to find duplicates).
    """
    files = store.expand(config.prompts_uri, "prompts_uri")  # sorted: records follow the files' order
    total = sum(1 for _ in _records(files))
    if total == 0:
        raise UserError(f"prompts_uri={config.prompts_uri!r} is empty: no prompts to complete")
    start, stop = shard_bounds(total, config.shard_index, config.num_shards)
    seen: dict[str, tuple[str, int]] = {}
    kept: list[Prompt] = []
    chat_records: bool | None = None  # the kind of the file's first record: every shard checks the whole file
    for index, (file, number, raw) in enumerate(_records(files)):
        where = f"{file} line {number}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{where}: not valid UTF-8: {shown(raw)}") from None
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            reason = exc if isinstance(exc, ValueError) else "nested too deeply"
            raise UserError(f"{where}: not valid JSON ({reason}): {shown(raw.decode('utf-8').rstrip())}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: a record must be a JSON object, not {shown(obj)}")
        if config.id_field not in obj:
            raise UserError(f"{where}: no {config.id_field!r} field (id_field) in {shown(obj)}")
        record_id = obj[config.id_field]
        if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
            raise UserError(f"{where}: {config.id_field!r} is {shown(record_id)}; ids must be strings or integers")
        key = json.dumps(record_id)
        if key in seen:
            first_file, first_line = seen[key]
            first = f"line {first_line}" if first_file == file else f"{first_file} line {first_line}"
            raise UserError(f"{where}: duplicate {config.id_field} {shown(record_id)} (first on {first})")
        seen[key] = (file, number)
        text = prompt_of(obj, config, where)
        if chat_records is None:
            chat_records = isinstance(text, list)
        elif chat_records != isinstance(text, list):
            raise UserError(f"{where}: prompts_uri mixes text prompts and chat records; give one kind per run")
        if start <= index < stop:
            kept.append(Prompt(index, where, record_id, text))
    return kept, total


# ---------------------------------------------------------------------------------------------
# Generation


def prompt_of(obj: dict, config: BatchInferConfig, where: str) -> str | list[dict[str, str]]:
    """A record's prompt text, or the turns of a chat record (which must not end with the assistant)."""
    if config.messages_field in obj:
        try:
            turns = chat.conversation(obj, chat.Fields(messages=config.messages_field))
        except chat.BadRecord as exc:
            raise UserError(f"{where}: {exc}") from None
        unknown = sorted({t["role"] for t in turns} - set(chat.ROLES))
        if unknown or not turns or turns[-1]["role"] == "assistant":
            problem = (
                f"unknown role {shown(unknown[0])}"
                if unknown
                else "no turn to answer (empty or ends with the assistant)"
            )
            raise UserError(f"{where}: {config.messages_field!r} has {problem}")
        return turns
    if config.prompt_field not in obj:
        raise UserError(
            f"{where}: no {config.prompt_field!r} field (prompt_field) nor {config.messages_field!r} in {shown(obj)}"
        )
    text = obj[config.prompt_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: {config.prompt_field!r} is {shown(text)}, not a string")
    return text


def chat_prompt_ids(renderer: chat.Renderer, prompts: list[Prompt], limit: int) -> tuple[list[list[int]], list[bool]]:
    """Each conversation rendered with the generation prompt; cut from the left to ``limit`` tokens."""
    ids, truncated = [], []
    for prompt in prompts:
        tokens = renderer.prompt_ids(prompt.text)
        ids.append(tokens[-limit:])
        truncated.append(len(tokens) > limit)
    return ids, truncated


# ---------------------------------------------------------------------------------------------
# The stage


def load(config: BatchInferConfig, run: StageRun, device: torch.device, dtype: torch.dtype):
    """The model, its tokenizer, and the chat template the adapter was trained with (None if none was)."""
    if config.adapter_uri == NO_ADAPTER:
        with models.model_dir(config.base_model) as base_path:
            return models.load_model(base_path, dtype, device), models.load_tokenizer(base_path), None
    from peft import PeftModel

    with models.adapter_dir(config.adapter_uri, run.inputs["base_model"]["sha256"], config.base_model) as adapter_path:
        with models.model_dir(config.base_model) as base_path:
            base = models.load_model(base_path, dtype, device)
            tokenizer = models.load_tokenizer(base_path)
        model = PeftModel.from_pretrained(base, str(adapter_path)).to(device)
        template = chat.saved_template(adapter_path)
    if config.merge_adapter:
        model = model.merge_and_unload()
    return model, tokenizer, template


def batch_infer(config: BatchInferConfig, run: StageRun) -> dict[str, Any]:
    prompts, total = read_prompts(config)
    log.info(
        "shard %d of %d: records %d..%d of %d in %s",
        config.shard_index, config.num_shards, *shard_bounds(total, config.shard_index, config.num_shards),
        total, config.prompts_uri,
    )  # fmt: skip
    device = models.pick_device(config.device)
    dtype = models.pick_dtype(config.precision, device)
    model, tokenizer, template = load(config, run, device, dtype)
    model.eval()

    context = models.context_length(model.config, tokenizer)
    if context is None:  # no guess: a prompt cut to a wrong length would fail or be cut for nothing
        raise UserError(
            f"cannot tell base_model's context length: its config sets none of {', '.join(models.CONTEXT_ATTRS)} "
            "and its tokenizer no model_max_length"
        )
    limit = context - config.max_new_tokens
    if limit < 1:
        raise UserError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in base_model's context of {context}"
        )
    stops = None  # the model's own end-of-text
    if prompts and isinstance(prompts[0].text, list):
        renderer = chat.Renderer(tokenizer, template or chat.resolve_template(tokenizer, "", config.base_model))
        prompt_ids, truncated = chat_prompt_ids(renderer, prompts, limit)
        stops = renderer.stop_ids()
    else:
        prompt_ids, truncated = encode_prompts(tokenizer, [p.text for p in prompts], limit)
    if any(truncated):
        log.warning("%d prompts longer than %d tokens were cut from the left", sum(truncated), limit)

    torch.manual_seed(config.seed)  # sampling draws from the global generator
    started = time.perf_counter()
    completions, batches = generate_completions(
        model,
        tokenizer,
        prompt_ids,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        device=device,
        stops=stops,
    )
    seconds = time.perf_counter() - started

    out_file = run.scratch / layout.PREDICTIONS
    with out_file.open("w", encoding="utf-8") as fh:
        for prompt, ids, tokens, cut in zip(prompts, prompt_ids, completions, truncated, strict=True):
            record = {
                "id": prompt.id,
                "completion": tokenizer.decode(tokens, skip_special_tokens=True),
                "prompt_tokens": len(ids),
                "completion_tokens": len(tokens),
            }
            if cut:
                record["truncated"] = True
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    sanity_check(out_file, prompts)
    store.upload_file(out_file, run.output(layout.PREDICTIONS))

    generated = sum(len(c) for c in completions)
    metrics = {
        "prompts": len(prompts),
        "records_in_file": total,
        "shard_index": config.shard_index,
        "num_shards": config.num_shards,
        "prompt_tokens": sum(len(ids) for ids in prompt_ids),
        "generated_tokens": generated,
        "tokens_per_second": round(generated / max(seconds, 1e-9), 1),
        "generate_seconds": round(seconds, 3),
        "batches": batches,
        "truncated_prompts": sum(truncated),
        "adapter": config.adapter_uri,
        "device": str(device),
        "precision": str(dtype).removeprefix("torch."),
    }
    log.info(
        "completed %d prompts in %d batches: %d tokens generated, %.0f tokens/s, %d prompts truncated",
        len(prompts), batches, generated, metrics["tokens_per_second"], metrics["truncated_prompts"],
    )  # fmt: skip
    return metrics


def sanity_check(out_file: Path, prompts: list[Prompt]) -> None:
    """Read the predictions back: one per prompt, same ids, same order."""
    with out_file.open(encoding="utf-8") as fh:
        ids = [json.loads(line)["id"] for line in fh]
    if ids != [p.id for p in prompts]:
        raise RuntimeError(f"predictions.jsonl holds {len(ids)} ids that do not match the {len(prompts)} prompts")


def main(argv: list[str] | None = None) -> int:
    return run_stage(layout.BATCH_INFER, BatchInferConfig, inputs, batch_infer, argv)


if __name__ == "__main__":
    sys.exit(main())
