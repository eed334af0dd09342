"""Turn raw text into fixed-length token blocks for causal-LM fine-tuning.

    python -m stages.tokenize input_uri='/data/folio/*_gut_f.txt' base_model=file:///artifacts/runs/base/base_model/model

Reads JSONL, plain text or Parquet (a file, a folder or a glob URI), cleans every record (Unicode
normalisation, control characters, whitespace), drops empty, too short, too long and duplicate
records, splits the documents into train and validation with a seeded permutation, tokenizes them
with the base model's tokenizer (end-of-text after each document) and packs the tokens into blocks
of ``block_size``. Outputs under ``<artifact_root>/runs/<run_id>/tokenize/``:

    dataset/                 ``datasets`` DatasetDict: ``train`` and ``validation``, column ``input_ids``
    validation_docs.jsonl    the held-out cleaned documents, ``{"text": ...}`` per line, in split order
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa

from stages import models, store
from stages.config import check, help_field
from stages.errors import UserError
from stages.runner import StageConfig, StageRun, run_stage

log = logging.getLogger("stages.tokenize")

DROP_REASONS = ("empty", "too_short", "too_long", "duplicate", "bad_json", "missing_field")
UNUSABLE = ("bad_json", "missing_field")  # broken input, as opposed to records that clean up to nothing


@dataclass(kw_only=True)
class TokenizeConfig(StageConfig):
    input_uri: str = help_field("", "Text to tokenize: a JSONL, text or Parquet file, a folder or a glob URI.")
    base_model: str = help_field("", "URI of a save_pretrained model folder, or a hub model id; its tokenizer is used.")
    input_format: Literal["auto", "jsonl", "text", "parquet"] = help_field(
        "auto", "File format; auto picks by extension (.jsonl/.json/.ndjson, .parquet, anything else is text)."
    )
    text_field: str = help_field("text", "JSONL key / Parquet column that holds the text.")
    text_unit: Literal["paragraph", "line", "file"] = help_field(
        "paragraph", "How plain text splits into documents: blank-line separated paragraphs, lines or whole files."
    )
    normalization: Literal["NFC", "NFKC"] = help_field(
        "NFC", "Unicode normalisation form; NFKC also folds compatibility characters (ligatures, full-width forms)."
    )
    min_chars: int = help_field(1, "Drop documents shorter than this after cleaning (raise it to drop fragments).")
    max_chars: int = help_field(
        1_000_000, "Drop documents longer than this after cleaning (runaway records such as minified data)."
    )
    block_size: int = help_field(128, "Tokens per packed training block.")
    validation_fraction: float = help_field(0.1, "Share of documents held out for validation, in (0, 1).")
    seed: int = help_field(0, "Seed of the document-level train/validation permutation.")
    max_bad_fraction: float = help_field(
        0.01, "Share of broken records (invalid JSON, missing or non-string text field) tolerated before failing."
    )
    batch_size: int = help_field(
        1000, "Documents per tokenizer call (the fast tokenizer spreads a call over all cores)."
    )

    # How the work is chunked does not change a single token of the output.
    OPERATIONAL = frozenset({"batch_size"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.input_uri), "input_uri is required: a JSONL, text or Parquet file, folder or glob URI")
        self.input_uri = store.normalize_uri(self.input_uri, "input_uri")
        check(bool(self.base_model), "base_model is required: the URI of a saved model folder or a hub model id")
        if store.is_uri(self.base_model):
            self.base_model = store.normalize_uri(self.base_model, "base_model")
        check(bool(self.text_field), "text_field must not be empty")
        check(self.min_chars >= 1, f"min_chars={self.min_chars} must be >= 1")
        check(self.max_chars >= self.min_chars, f"max_chars={self.max_chars} must be >= min_chars={self.min_chars}")
        check(self.block_size >= 2, f"block_size={self.block_size} must be >= 2 (a causal LM predicts token 2 from 1)")
        check(
            0 < self.validation_fraction < 1,
            f"validation_fraction={self.validation_fraction} must be between 0 and 1 (exclusive)",
        )
        check(0 <= self.max_bad_fraction <= 1, f"max_bad_fraction={self.max_bad_fraction} must be between 0 and 1")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")


def inputs(config: TokenizeConfig) -> dict[str, str]:
    return {"input_uri": config.input_uri, "base_model": config.base_model}


# ---------------------------------------------------------------------------------------------
# Reading: every format yields raw records with where they came from, never the whole file.


class RawRecord(NamedTuple):
    line: int  # 1-based line (JSONL, text) or row (Parquet) where the record starts
    text: str | None  # None when the record is unusable
    invalid_utf8: bool
    problem: str | None = None  # "bad_json" or "missing_field"


def file_format(uri: str, requested: str) -> str:
    if requested != "auto":
        return requested
    name = uri.lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text and whether it held invalid bytes (replaced by U+FFFD rather than failing the run)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def decoded_lines(uri: str) -> Iterator[tuple[int, str, bool]]:
    # Decoding line by line is exact: byte 0x0A never occurs inside a multi-byte UTF-8 sequence.
    with store.open_file(uri, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            text, invalid = decode(raw)
            yield number, text, invalid


def read_text(uri: str, unit: str) -> Iterator[RawRecord]:
    if unit == "file":
        with store.open_file(uri, "rb") as fh:
            text, invalid = decode(fh.read())
        if text.strip():
            yield RawRecord(1, text, invalid)
        return
    if unit == "line":
        for number, line, invalid in decoded_lines(uri):
            if line.strip():
                yield RawRecord(number, line, invalid)
        return
    lines: list[str] = []
    start, invalid = 0, False
    for number, line, line_invalid in decoded_lines(uri):
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
            invalid |= line_invalid
        elif lines:
            yield RawRecord(start, "".join(lines), invalid)
            lines, invalid = [], False
    if lines:
        yield RawRecord(start, "".join(lines), invalid)


def read_jsonl(uri: str, text_field: str) -> Iterator[RawRecord]:
    for number, line, invalid in decoded_lines(uri):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            yield RawRecord(number, None, invalid, "bad_json")
            continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if isinstance(text, str):
            yield RawRecord(number, text, invalid)
        else:
            yield RawRecord(number, None, invalid, "missing_field")


def read_parquet(uri: str, text_field: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    with store.open_file(uri, "rb") as fh:
        try:
            parquet = pq.ParquetFile(fh)
        except pa.ArrowInvalid as exc:
            raise UserError(f"{uri} is not a readable Parquet file: {exc}") from None
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            raise UserError(f"{uri} has no column text_field={text_field!r} (columns: {', '.join(schema.names)})")
        column_type = schema.field(text_field).type
        if not (
            pa.types.is_string(column_type)
            or pa.types.is_large_string(column_type)
            or pa.types.is_string_view(column_type)
            or pa.types.is_binary(column_type)
            or pa.types.is_large_binary(column_type)
        ):
            raise UserError(f"{uri}: column text_field={text_field!r} holds {column_type}, not text")
        row = 0
        for batch in parquet.iter_batches(batch_size=8192, columns=[text_field]):
            # As bytes, so that invalid UTF-8 in a string column is counted and replaced like in other formats.
            for raw in batch.column(0).cast(pa.large_binary()).to_pylist():
                row += 1
                if raw is None:
                    yield RawRecord(row, None, False, "missing_field")
                else:
                    text, invalid = decode(raw)
                    yield RawRecord(row, text, invalid)


def read_records(uri: str, config: TokenizeConfig) -> Iterator[RawRecord]:
    fmt = file_format(uri, config.input_format)
    if fmt == "jsonl":
        return read_jsonl(uri, config.text_field)
    if fmt == "parquet":
        return read_parquet(uri, config.text_field)
    return read_text(uri, config.text_unit)


# ---------------------------------------------------------------------------------------------
# Cleaning

_LINE_BREAKS = re.compile("\r\n?|[\v\f\x1c-\x1e\x85\u2028\u2029]")
# Invisible characters that change dedup and tokenization but not meaning: C0/C1 controls except tab and
# newline, byte-order marks, and lone surrogates (JSON escapes can produce them; they cannot be encoded).
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_SPACES = re.compile(r"[^\S\n]+")
_SPACE_AT_LINE_EDGE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean(text: str, form: str) -> str:
    text = unicodedata.normalize(form, text)
    text = _LINE_BREAKS.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_AT_LINE_EDGE.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def ingest(files: list[str], config: TokenizeConfig) -> tuple[list[str], Counter]:
    """Cleaned, unique documents in input order, and how many records were read, flagged and dropped."""
    counts: Counter = Counter()
    docs: list[str] = []
    seen: set[str] = set()  # holds the same string objects as docs: no second copy of the corpus
    first_bad = ""
    for uri in files:
        for record in read_records(uri, config):
            counts["records_read"] += 1
            counts["records_with_invalid_utf8"] += record.invalid_utf8
            if record.problem:
                counts[record.problem] += 1
                if not first_bad:
                    what = "not valid JSON" if record.problem == "bad_json" else f"no string {config.text_field!r}"
                    unit = "row" if file_format(uri, config.input_format) == "parquet" else "line"
                    first_bad = f"{uri} {unit} {record.line}: {what}"
                continue
            text = clean(record.text, config.normalization)
            if not text:
                reason = "empty"
            elif len(text) < config.min_chars:
                reason = "too_short"
            elif len(text) > config.max_chars:
                reason = "too_long"
            elif text in seen:
                reason = "duplicate"
            else:
                seen.add(text)
                docs.append(text)
                continue
            counts[reason] += 1

    read = counts["records_read"]
    if read == 0:
        raise UserError(f"input_uri={config.input_uri!r} holds no text: {len(files)} file(s), all empty or blank")
    bad = sum(counts[r] for r in UNUSABLE)
    if bad / read > config.max_bad_fraction:
        raise UserError(
            f"{bad} of {read} records ({bad / read:.1%}) are unusable (bad_json {counts['bad_json']}, "
            f"missing_field {counts['missing_field']}), more than max_bad_fraction={config.max_bad_fraction}; "
            f"first: {first_bad}"
        )
    if not docs:
        dropped = ", ".join(f"{r} {counts[r]}" for r in DROP_REASONS if counts[r])
        raise UserError(
            f"no valid records after cleaning: read {read} from input_uri={config.input_uri!r}, dropped {dropped} "
            f"(min_chars={config.min_chars}, max_chars={config.max_chars})"
        )
    return docs, counts


# ---------------------------------------------------------------------------------------------
# Splitting, tokenizing, packing


def split_documents(n_docs: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation document indices. Splitting documents, not blocks, keeps every held-out
    document wholly unseen in training."""
    if n_docs < 2:
        raise UserError(f"only {n_docs} document left after cleaning: need at least 2 to hold one out for validation")
    order = np.random.default_rng(seed).permutation(n_docs)
    n_validation = min(n_docs - 1, max(1, round(n_docs * fraction)))
    return order[n_validation:], order[:n_validation]


def token_ids(tokenizer: Any, docs: list[str], order: np.ndarray, batch_size: int) -> np.ndarray:
    """One flat int32 array: each document's tokens followed by end-of-text, in ``order``."""
    eos = tokenizer.eos_token_id
    if tokenizer.is_fast:
        backend = tokenizer.backend_tokenizer
        # The Python wrapper converts every encoding to lists twice; the Rust batch call uses all cores.
        backend.no_truncation()
        backend.no_padding()

        def encode(batch: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
    else:

        def encode(batch: list[str]) -> list[list[int]]:
            return tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    parts = []
    for start in range(0, len(order), batch_size):
        flat: list[int] = []
        for ids in encode([docs[i] for i in order[start : start + batch_size]]):
            flat.extend(ids)
            flat.append(eos)
        parts.append(np.array(flat, dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def pack(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """Fixed-length blocks (a view, no copy) and how many trailing tokens did not fill a block."""
    n_blocks = len(ids) // block_size
    return ids[: n_blocks * block_size].reshape(n_blocks, block_size), len(ids) - n_blocks * block_size


def blocks_dataset(blocks: np.ndarray, block_size: int):
    import datasets

    # A fixed-size list column straight from the numpy buffer: no per-row Python objects, and the
    # schema itself says every row has exactly block_size tokens.
    column = pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), block_size)
    return datasets.Dataset(pa.table({"input_ids": column}))


# ---------------------------------------------------------------------------------------------
# The stage


def tokenize(config: TokenizeConfig, run: StageRun) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()  # one tqdm line per split is noise in a pod's log
    with models.model_dir(config.base_model) as path:
        tokenizer = models.load_tokenizer(path)
    if tokenizer.eos_token_id is None:
        raise UserError(f"base_model={config.base_model!r} has a tokenizer without an eos token to separate documents")
    max_length = getattr(tokenizer, "model_max_length", None) or 0
    if 0 < max_length < 1_000_000 and config.block_size > max_length:
        raise UserError(f"block_size={config.block_size} is longer than base_model's context of {max_length} tokens")

    files = store.expand(config.input_uri)
    if not files:
        raise UserError(f"input_uri={config.input_uri!r} matches no files")
    log.info("reading %d file(s) from %s", len(files), config.input_uri)
    docs, counts = ingest(files, config)
    train_order, validation_order = split_documents(len(docs), config.validation_fraction, config.seed)
    log.info(
        "%d of %d records kept; %d train / %d validation documents",
        len(docs),
        counts["records_read"],
        len(train_order),
        len(validation_order),
    )

    started = time.perf_counter()
    train_ids = token_ids(tokenizer, docs, train_order, config.batch_size)
    validation_ids = token_ids(tokenizer, docs, validation_order, config.batch_size)
    seconds = time.perf_counter() - started
    train_blocks, train_dropped = pack(train_ids, config.block_size)
    validation_blocks, validation_dropped = pack(validation_ids, config.block_size)
    if len(train_blocks) == 0:
        raise UserError(
            f"input is too small for block_size={config.block_size}: the train split has {len(train_ids)} tokens; "
            "add text, lower validation_fraction or lower block_size"
        )

    dataset_dir = run.scratch / "dataset"
    dataset = datasets.DatasetDict(
        train=blocks_dataset(train_blocks, config.block_size),
        validation=blocks_dataset(validation_blocks, config.block_size),
    )
    # An empty split saved with the default zero shards cannot be loaded back; evaluate still has the docs.
    dataset.save_to_disk(str(dataset_dir), num_shards={k: 1 for k, d in dataset.items() if len(d) == 0})
    sanity_check(dataset_dir, tokenizer, config.block_size, len(train_blocks), len(validation_blocks))
    store.upload_dir(dataset_dir, run.output("dataset"))

    docs_file = run.scratch / "validation_docs.jsonl"
    with docs_file.open("w", encoding="utf-8") as fh:
        for i in validation_order:
            fh.write(json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n")
    store.upload_file(docs_file, run.output("validation_docs.jsonl"))

    tokens_total = len(train_ids) + len(validation_ids)
    metrics = {
        "records_read": counts["records_read"],
        "records_kept": len(docs),
        **{f"dropped_{reason}": counts[reason] for reason in DROP_REASONS},
        "records_with_invalid_utf8": counts["records_with_invalid_utf8"],
        "train_docs": len(train_order),
        "validation_docs": len(validation_order),
        "train_blocks": len(train_blocks),
        "validation_blocks": len(validation_blocks),
        "tokens_total": tokens_total,
        "tokens_dropped_in_packing": train_dropped + validation_dropped,
        "tokens_per_second": round(tokens_total / max(seconds, 1e-9)),
    }
    log.info(
        "tokenize: %d train + %d validation blocks of %d tokens from %d of %d records (%d tokens, %.0f tokens/s)",
        len(train_blocks),
        len(validation_blocks),
        config.block_size,
        len(docs),
        counts["records_read"],
        tokens_total,
        metrics["tokens_per_second"],
    )
    return metrics


def sanity_check(dataset_dir: Path, tokenizer: Any, block_size: int, train_blocks: int, validation_blocks: int) -> None:
    """Read the saved dataset back the way train_lora will, and look at the first block."""
    import datasets

    loaded = datasets.load_from_disk(str(dataset_dir))
    found = {split: loaded[split].num_rows for split in ("train", "validation")}
    if found != {"train": train_blocks, "validation": validation_blocks}:
        raise RuntimeError(f"saved dataset has {found} rows, expected {train_blocks} / {validation_blocks}")
    for split in ("train", "validation"):
        if getattr(loaded[split].features["input_ids"], "length", None) != block_size:
            raise RuntimeError(f"{split} blocks are not fixed at {block_size} tokens: {loaded[split].features}")
    first = loaded["train"][0]["input_ids"]
    if max(first) >= len(tokenizer):
        raise RuntimeError(f"token id {max(first)} is outside the tokenizer's vocabulary of {len(tokenizer)}")
    log.info("first train block decodes to: %r", tokenizer.decode(first)[:160])


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenize", TokenizeConfig, inputs, tokenize, argv)


if __name__ == "__main__":
    sys.exit(main())
