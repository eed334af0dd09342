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

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
import logging
import mmap
import re
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa

from stages.core import chat, layout, manifest, models, store, uris
from stages.core.config import SEED_BOUNDS, check, help_field
from stages.core.encodings import without_bom
from stages.core.errors import UserError
from stages.core.runner import StageConfig, StageRun, run_stage

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
    seed: int = help_field(0, "Seed of the document-level train/validation permutation.", bounds=SEED_BOUNDS)
    max_bad_fraction: float = help_field(
        0.01, "Share of broken records (invalid JSON, missing or non-string text field) tolerated before failing."
    )
    batch_size: int = help_field(
        1000, "Documents per tokenizer call (the fast tokenizer spreads a call over all cores)."
    )
    task: Literal["causal_lm", "sft"] = help_field(
        "causal_lm",
        "causal_lm: raw text, every token trained; sft: conversations or prompt/completion pairs (JSONL or "
        "Parquet) rendered with a chat template, the loss on the assistant's tokens.",
    )
    chat_template: str = help_field(
        "", "task=sft: empty uses the tokenizer's own template; 'chatml' a built-in; else the URI of a Jinja file."
    )
    messages_field: str = help_field("messages", "task=sft: the key / column of a conversation's list of turns.")
    prompt_field: str = help_field("prompt", "task=sft: the key / column of a prompt (records without messages).")
    completion_field: str = help_field("completion", "task=sft: the key / column of the prompt's completion.")
    train_on: Literal["assistant", "all"] = help_field(
        "assistant", "task=sft: which tokens carry loss: the assistant's turns (and their end-of-turn), or all."
    )
    packing: bool = help_field(
        True, "task=sft: several examples per block (attention kept inside each); false: one example per block."
    )
    truncation: bool = help_field(
        False, "task=sft: cut an example longer than block_size to block_size; false drops it (counted too_long)."
    )

    num_shards: int = help_field(
        1,
        "Split the input into this many shards of about equal bytes (whole files; lines of JSONL and line text "
        "and row groups of Parquet from any byte): each shard_index is one task, then merge=true joins them.",
    )
    shard_index: int = help_field(0, "With num_shards > 1: which shard this task tokenizes (0-based).")
    merge: bool = help_field(
        False, "With num_shards > 1: join this run's committed shards into the dataset the one-task run writes."
    )

    # How the work is chunked does not change a single token of the output.
    OPERATIONAL = frozenset({"batch_size"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.input_uri), "input_uri is required: a JSONL, text or Parquet file, folder or glob URI")
        self.input_uri = uris.normalize_uri(self.input_uri, "input_uri")
        self.base_model = models.check_base_model(self.base_model)
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
        for name in ("messages_field", "prompt_field", "completion_field"):
            check(bool(getattr(self, name)), f"{name} must not be empty")
        if chat.is_template_uri(self.chat_template):
            self.chat_template = uris.normalize_uri(self.chat_template, "chat_template")
        check(1 <= self.num_shards <= 9_999, f"num_shards={self.num_shards} must be in [1, 9999]")
        check(
            0 <= self.shard_index < self.num_shards,
            f"shard_index={self.shard_index} must be in [0, num_shards={self.num_shards})",
        )
        check(not self.merge or self.num_shards > 1, "merge=true joins shards: it needs num_shards > 1")
        check(
            self.num_shards == 1 or self.task == "causal_lm",
            f"num_shards={self.num_shards}: task=sft tokenizes in one task (num_shards=1)",
        )

    def output_uri(self, stage: str) -> str:
        """A shard commits under ``tokenize_shards/``; the merge, like the one-task run, under ``tokenize/``."""
        if self.num_shards > 1 and not self.merge:
            return self.run_uri(layout.TOKENIZE_SHARDS, layout.shard_name(self.shard_index, self.num_shards))
        return self.run_uri(stage)


def inputs(config: TokenizeConfig) -> dict[str, str | manifest.Input]:
    """The base model counts by its tokenizer and config: its weights are neither hashed nor fetched."""
    base_model = models.tokenizer_input(config.base_model)
    if config.merge:  # the shards, each committed with this merge's settings
        check_shards(config)
        return {"base_model": base_model, **{f"shard_{i:05d}": u for i, u in enumerate(shard_uris(config))}}
    found = {"input_uri": config.input_uri, "base_model": base_model}
    if config.task == "sft" and chat.is_template_uri(config.chat_template):
        found["chat_template"] = config.chat_template
    return found


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


# Files that are not running text: read as plain text, a CSV's header and separators or a PDF's bytes
# would become training data. A folder's are skipped and counted (input_format=auto); one named alone is
# refused.
NOT_TEXT = frozenset(
    ".csv .tsv .gz .zip .bz2 .xz .zst .tar .7z .pdf .doc .docx .xls .xlsx .png .jpg .jpeg .gif .webp .arrow "  # noqa: SIM905
    ".feather .npy .npz .pkl .pt .bin .safetensors".split()
)


def text_files(files: list[str], config: TokenizeConfig) -> tuple[list[str], list[str]]:
    """The files to read and the files skipped as not running text (only when the format is auto)."""
    if config.input_format != "auto":
        return files, []
    skipped = [f for f in files if Path(f.rsplit("/", 1)[-1]).suffix.lower() in NOT_TEXT]
    if skipped and files == [config.input_uri]:
        raise UserError(
            f"input_uri={config.input_uri!r} is a {Path(skipped[0]).suffix.lower()} file, which is not running "
            "text: convert it to JSONL, Parquet or plain text, or set input_format=text to read it as text anyway"
        )
    if skipped:
        log.warning("skipped %d file(s) that are not running text, such as %s", len(skipped), skipped[0])
    skip = set(skipped)
    return [f for f in files if f not in skip], skipped


def decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text and whether it held invalid bytes (replaced by U+FFFD rather than failing the run)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def decoded_lines(uri: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, held invalid UTF-8) of every line; with a byte range, of the lines that start in it.

    Line numbers count from the range's first line. Ranges that tile a file give every line to exactly one.
    """
    for first, lines, invalid in decoded_chunks(uri, start, stop):
        for i, line in enumerate(lines):
            yield first + i, line, invalid is not None and invalid[i]


def decoded_chunks(
    uri: str, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, list[str], list[bool] | None]]:
    """:func:`decoded_lines` a megabyte of lines at a time: (number of the first line, the lines, which of
    them held invalid UTF-8, or None when none did)."""
    # Decoding line by line is exact: byte 0x0A never occurs inside a multi-byte UTF-8 sequence. So is
    # decoding a chunk of whole lines at once, which costs far less per line; only a chunk that holds
    # invalid UTF-8 is decoded line by line, to flag and replace exactly the lines that hold it.
    with store.open_file(uri, "rb") as fh:
        number = 0
        position = start  # where the next line starts
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":  # inside a line: it belongs to the range where it starts
                position += len(fh.readline())
        while (stop is None or position < stop) and (chunk := fh.readlines(1 << 20)):
            if stop is not None:
                for kept, raw in enumerate(chunk):
                    if position >= stop:
                        del chunk[kept:]
                        break
                    position += len(raw)
            if number == 0 and start == 0:
                chunk[0] = without_bom(uri, chunk[0])
            try:
                lines = b"".join(chunk).decode("utf-8").split("\n")
            except UnicodeDecodeError:
                texts, invalid = map(list, zip(*map(decode, chunk), strict=True))
                yield number + 1, texts, invalid
                number += len(texts)
                continue
            last = lines.pop()  # "" when the chunk ends with a newline, else the file's unterminated last line
            lines = [line + "\n" for line in lines]
            if last:
                lines.append(last)
            yield number + 1, lines, None
            number += len(lines)


def read_text(uri: str, unit: str) -> Iterator[RawRecord]:
    """The records of a text file read whole or by paragraph (by line: :func:`text_lines`)."""
    if unit == "file":
        with store.open_file(uri, "rb") as fh:
            text, invalid = decode(without_bom(uri, fh.read()))
        if text.strip():
            yield RawRecord(1, text, invalid)
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


def read_jsonl(uri: str, text_field: str, start: int = 0, stop: int | None = None) -> Iterator[RawRecord]:
    for number, line, invalid in decoded_lines(uri, start, stop):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            yield RawRecord(number, None, invalid, "bad_json")
            continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if isinstance(text, str):
            yield RawRecord(number, text, invalid)
        else:
            yield RawRecord(number, None, invalid, "missing_field")


@contextlib.contextmanager
def parquet_file(uri: str) -> Iterator[Any]:
    """The open ``pyarrow.parquet.ParquetFile``; a file that is not Parquet is the user's to fix."""
    import pyarrow.parquet as pq

    with store.open_file(uri, "rb") as fh:
        try:
            parquet = pq.ParquetFile(fh)
        except pa.ArrowInvalid as exc:
            raise UserError(f"{uri} is not a readable Parquet file: {exc}") from None
        yield parquet


def read_parquet(uri: str, text_field: str, start: int = 0, stop: int | None = None) -> Iterator[RawRecord]:
    """The text column's rows; with a byte range, those of the row groups that start in it (row_group_starts)."""
    with parquet_file(uri) as parquet:
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
        starts = row_group_starts(parquet.metadata)
        groups = [g for g, at in enumerate(starts) if start <= at and (stop is None or at < stop)]
        if not groups:
            return
        row = sum(parquet.metadata.row_group(g).num_rows for g in range(groups[0]))
        for batch in parquet.iter_batches(batch_size=8192, columns=[text_field], row_groups=groups):
            # As bytes, so that invalid UTF-8 in a string column is counted and replaced like in other formats.
            for raw in batch.column(0).cast(pa.large_binary()).to_pylist():
                row += 1
                if raw is None:
                    yield RawRecord(row, None, False, "missing_field")
                else:
                    text, invalid = decode(raw)
                    yield RawRecord(row, text, invalid)


def row_group_starts(metadata: Any) -> list[int]:
    """Where each row group of a Parquet file starts, in bytes: its first column chunk's first page."""
    starts = []
    for g in range(metadata.num_row_groups):
        chunk = metadata.row_group(g).column(0)
        starts.append(chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset)
    return starts


def read_records(uri: str, config: TokenizeConfig, start: int = 0, stop: int | None = None) -> Iterator[RawRecord]:
    fmt = file_format(uri, config.input_format)
    if fmt == "jsonl":
        return read_jsonl(uri, config.text_field, start, stop)
    if fmt == "parquet":
        return read_parquet(uri, config.text_field, start, stop)
    return read_text(uri, config.text_unit)


# ---------------------------------------------------------------------------------------------
# Cleaning

_LINE_BREAKS = re.compile("\r\n?|[\v\f\x1c-\x1e\x85\u2028\u2029]")
_LINE_BREAK_CHARS = "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
# Invisible characters that change dedup and tokenization but not meaning: C0/C1 controls except tab and
# newline, byte-order marks, and lone surrogates (JSON escapes can produce them; they cannot be encoded).
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
# Runs of whitespace other than newlines become one space; written to match only where that changes
# something (a run of two or more, or one character that is not a space), not at every single space.
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S \n]")
# Text whose only whitespace is spaces and newlines (nearly all) needs just the runs of spaces collapsed,
# which a pattern starting with a literal finds several times faster. These are the other whitespace
# characters that can reach that step (the steps before turn the rest into newlines or remove them).
_SPACE_RUNS = re.compile("  +")  # not " {2,}": a literal prefix of two spaces is searched 2x faster
_OTHER_SPACES = "".join(
    c
    for c in map(chr, range(0x10000))  # no character above the BMP is whitespace
    if c.isspace() and c not in " \n" and not _LINE_BREAKS.match(c) and not _INVISIBLE.match(c)
)
_BLANK_LINES = re.compile(r"\n{3,}")


def clean(text: str, form: str) -> str:
    return _clean_steps(text, form).strip()


def _clean_steps(text: str, form: str) -> str:
    text = unicodedata.normalize(form, text)
    if any(c in text for c in _LINE_BREAK_CHARS):  # a substring search is far cheaper than a regex scan
        text = _LINE_BREAKS.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    if any(c in text for c in _OTHER_SPACES):
        text = _SPACES.sub(" ", text)
    else:
        text = _SPACE_RUNS.sub(" ", text)
    # Every space left stands alone, so dropping the one on either side of each newline is two replaces.
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text


# clean_many joins records with one of these, so that one pass of each step cleans thousands of them.
# None is changed by any step or by Unicode normalisation, none composes with a neighbour (checked over
# every code point, NFC/NFD/NFKC/NFKD: a separator is a starter that blocks reordering and composition),
# none is whitespace for strip(). ASCII ones first: a string with only Latin-1 characters is scanned faster.
_SEPARATORS = ("|", "~", "^", "`", "\ue000")


def clean_many(texts: list[str], form: str) -> list[str]:
    """``[clean(t, form) for t in texts]``, with one call per step for the whole list instead of one per record.

    Short records (lines) spend most of their cleaning time in per-call overhead; joined, the same
    regular expressions run over one long string. The separator must occur in no record, before and
    after cleaning (NFKC turns a full-width ``｜`` into ``|``); when every one does, records are cleaned alone.
    """
    if not texts:
        return []
    for separator in _SEPARATORS:
        joined = separator.join(texts)
        if joined.count(separator) != len(texts) - 1:
            continue
        parts = _clean_steps(joined, form).split(separator)
        if len(parts) == len(texts):
            return [part.strip() for part in parts]
    return [clean(t, form) for t in texts]


# Records cleaned per clean_many call (or fewer, holding at most CLEAN_BATCH_CHARS characters): enough to
# amortise the per-call overhead, small enough to stream.
CLEAN_BATCH = 4096
CLEAN_BATCH_CHARS = 4_000_000


class Piece(NamedTuple):
    """A file, or the records of a file that start in a byte range (a shard's part of a big file)."""

    uri: str
    start: int = 0
    stop: int | None = None  # None: to the end


def ingest(
    pieces: list[Piece], config: TokenizeConfig, on_documents: Callable[[list[str]], None] | None = None
) -> Corpus:
    """Cleaned, unique documents in input order, and how many records were read, flagged and dropped.

    ``on_documents`` receives each group of newly kept documents as soon as they are known (the stage
    tokenizes them while the next records are read and cleaned).
    """
    corpus = Corpus(config, on_documents)
    for piece in pieces:
        for records in record_batches(piece, config):
            corpus.add(piece, records)
    return corpus


@contextlib.contextmanager
def older_objects_frozen() -> Iterator[None]:
    """Leave every object that exists on entry out of the cyclic garbage collector's scans until exit.

    Reading and tokenizing allocate hundreds of thousands of short-lived containers (records, token id
    lists), freed by reference counting but counted by the collector, which now and then answers with a
    full collection: a walk over every tracked object of the process, some 500,000 once transformers and
    datasets are imported (0.25 s each, a third of the stage's time on a corpus of 25,000 lines). Frozen,
    the old objects are skipped; nothing the block makes is collected any later. When something else
    already froze objects (a pre-fork server), it is left to manage them.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class TextLines(NamedTuple):
    """A group of the non-blank lines of a text file read with ``text_unit=line``: records that cannot be
    unusable, so they need no record each (the hot path of plain-text corpora)."""

    texts: list[str]
    invalid_utf8: int  # how many of them held invalid UTF-8


def record_batches(piece: Piece, config: TokenizeConfig) -> Iterator[list[RawRecord] | TextLines]:
    """The raw records of a piece, in groups of at most CLEAN_BATCH records or about CLEAN_BATCH_CHARS characters."""
    if config.text_unit == "line" and file_format(piece.uri, config.input_format) == "text":
        yield from text_lines(piece)
        return
    records: list[RawRecord] = []
    chars = 0
    for record in read_records(piece.uri, config, piece.start, piece.stop):
        records.append(record)
        chars += len(record.text or "")
        if len(records) == CLEAN_BATCH or chars >= CLEAN_BATCH_CHARS:
            yield records
            records, chars = [], 0
    if records:
        yield records


def text_lines(piece: Piece) -> Iterator[TextLines]:
    """:func:`record_batches` of a text file read line by line: a megabyte's lines at a time, in groups of at
    most CLEAN_BATCH."""
    for _, lines, invalid in decoded_chunks(piece.uri, piece.start, piece.stop):
        if invalid is None:
            texts, flagged = [line for line in lines if line.strip()], None
        else:
            pairs = [(line, bad) for line, bad in zip(lines, invalid, strict=True) if line.strip()]
            texts, flagged = [line for line, _ in pairs], [bad for _, bad in pairs]
        for at in range(0, len(texts), CLEAN_BATCH):
            bad = 0 if flagged is None else sum(flagged[at : at + CLEAN_BATCH])
            yield TextLines(texts[at : at + CLEAN_BATCH], bad)


class Corpus:
    """The documents kept so far (cleaned, in range, unique, in input order) and the counts of what was read,
    flagged and dropped, with where the first unusable record was."""

    def __init__(self, config: TokenizeConfig, on_documents: Callable[[list[str]], None] | None = None) -> None:
        self.config = config
        self.on_documents = on_documents
        self.counts: Counter = Counter()
        self.docs: list[str] = []
        self.seen: set[str] = set()  # holds the same string objects as docs: no second copy of the corpus
        self.first_bad = ""

    def add(self, piece: Piece, records: list[RawRecord] | TextLines) -> None:
        """Count a batch of records from ``piece``, clean the usable ones and keep those that pass the filters."""
        kept_from = len(self.docs)
        if isinstance(records, TextLines):
            self.counts["records_read"] += len(records.texts)
            self.counts["records_with_invalid_utf8"] += records.invalid_utf8
            usable = records.texts
        else:
            usable = self.usable_texts(piece, records)
        self.keep(clean_many(usable, self.config.normalization))
        if self.on_documents is not None and len(self.docs) > kept_from:
            self.on_documents(self.docs[kept_from:])

    def usable_texts(self, piece: Piece, records: list[RawRecord]) -> list[str]:
        """The texts of the records that have one; the others are counted by problem (bad_json, missing_field)."""
        counts = self.counts
        counts["records_read"] += len(records)
        counts["records_with_invalid_utf8"] += sum(r.invalid_utf8 for r in records)
        usable = []
        for record in records:
            if record.problem:
                counts[record.problem] += 1
                if not self.first_bad:
                    self.first_bad = self.where(piece, record)
            else:
                usable.append(record.text)
        return usable

    def where(self, piece: Piece, record: RawRecord) -> str:
        """An unusable record, for the error message: file, line or row, and what is wrong with it."""
        what = "not valid JSON" if record.problem == "bad_json" else f"no string {self.config.text_field!r}"
        parquet = file_format(piece.uri, self.config.input_format) == "parquet"
        after = f" after byte {piece.start}" if piece.start and not parquet else ""  # a shard's part of a file
        return f"{piece.uri} {'row' if parquet else 'line'} {record.line}{after}: {what}"

    def keep(self, texts: list[str]) -> None:
        """Keep the cleaned texts that are in range and not seen before; count the others by drop reason."""
        config, counts, docs, seen = self.config, self.counts, self.docs, self.seen
        for text in texts:
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

    def check(self, n_files: int) -> None:
        check_corpus(self.config, self.counts, len(self.docs), self.first_bad, n_files)


def check_corpus(config: TokenizeConfig, counts: Counter, kept: int, first_bad: str, n_files: int) -> None:
    """Fail when the input held no text, too many unusable records, or nothing left after cleaning."""
    read = counts["records_read"]
    if read == 0:
        raise UserError(f"input_uri={config.input_uri!r} holds no text: {n_files} file(s), all empty or blank")
    bad = sum(counts[r] for r in UNUSABLE)
    if bad / read > config.max_bad_fraction:
        raise UserError(
            f"{bad} of {read} records ({bad / read:.1%}) are unusable (bad_json {counts['bad_json']}, "
            f"missing_field {counts['missing_field']}), more than max_bad_fraction={config.max_bad_fraction}; "
            f"first: {first_bad}"
        )
    if not kept:
        dropped = ", ".join(f"{r} {counts[r]}" for r in DROP_REASONS if counts[r])
        raise UserError(
            f"no valid records after cleaning: read {read} from input_uri={config.input_uri!r}, dropped {dropped} "
            f"(min_chars={config.min_chars}, max_chars={config.max_chars})"
        )


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


# Documents per string of Encoder._encode_joined: enough to make the per-string cost small against ~15-token
# lines, few enough that a batch still spreads over every core.
JOINED = 32


def joinable_separator(backend: Any, eos: str | None, eos_id: int | None) -> str | None:
    """The end-of-text token's text when documents joined with it encode exactly as each alone does; else None.

    The tokenizer first splits its input where added tokens match (the ones not normalized, on the raw
    text), then normalizes, pre-tokenizes and encodes each piece apart. Joining is exact when every
    inserted separator matches as itself and nothing else changes: the end-of-text token is such an added
    token (not normalized, no stripping of whitespace, not word-bound), none of the added tokens can match
    across the start of a separator (a separator that began inside a match would be lost), and neither
    the normalizer nor the pre-tokenizer asks where in the input a piece starts (a Metaspace
    pre-tokenizer with prepend_scheme=first does). A probe checks the result on a few documents.
    """
    if eos is None or eos_id is None or getattr(backend, "encode_special_tokens", False):
        return None
    added = backend.get_added_tokens_decoder()
    token = added.get(eos_id)
    if token is None or token.content != eos or token.normalized or token.lstrip or token.rstrip:
        return None
    if token.single_word or not all(c.isprintable() and not c.isspace() and not c.isalnum() for c in (eos[0], eos[-1])):
        return None
    for other in added.values():
        if other.normalized:  # matched inside the pieces, after the split
            continue
        text = other.content
        if (text != eos and eos in text) or any(text.endswith(eos[:k]) for k in range(1, len(eos))):
            return None
    for component in (backend.normalizer, backend.pre_tokenizer):
        if component is None:
            continue
        try:
            state = component.__getstate__().decode()
        except Exception:  # a custom (Python) component: its behaviour is unknown
            return None
        if re.search(r'"prepend_scheme"\s*:\s*"first"', state):  # only the input's first piece is prefixed
            return None
    probe = ["Hello, world!", "1 23 456", "The end.", "x", "  a  b", "Ünïcödé — «quotes»"]
    alone = [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=False)]
    joined = backend.encode_batch_fast([eos.join(probe) + eos], add_special_tokens=False)[0].ids
    expected = [i for ids in alone for i in [*ids, eos_id]]
    return eos if joined == expected else None


class Encoder:
    """Token ids of documents, in the order they are added, computed while the caller reads the next ones.

    A fast (Rust) tokenizer releases the GIL and spreads each batch over all cores, so reading and
    cleaning (Python, one core) overlap with tokenizing; a slow tokenizer encodes in the caller's thread.
    ``finish`` returns every document's ids end to end in one int32 array, and each document's length.
    """

    def __init__(self, tokenizer: Any, batch_size: int) -> None:
        self.batch_size = batch_size
        self.pending: list[str] = []
        self.results: list[Any] = []
        if tokenizer.is_fast:
            backend = tokenizer.backend_tokenizer
            # The Python wrapper converts every encoding to lists twice; the Rust batch call uses all cores.
            backend.no_truncation()
            backend.no_padding()
            self.encode = lambda batch: [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
            self.backend = backend
            self.separator = joinable_separator(backend, tokenizer.eos_token, tokenizer.eos_token_id)
            self.separator_id = tokenizer.eos_token_id
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        else:
            self.encode = lambda batch: tokenizer(batch, add_special_tokens=False, return_attention_mask=False)[
                "input_ids"
            ]
            self.separator = None
            self.pool = None

    def add(self, docs: list[str]) -> None:
        self.pending.extend(docs)
        while len(self.pending) >= self.batch_size:
            self._submit(self.pending[: self.batch_size])
            del self.pending[: self.batch_size]

    def _submit(self, batch: list[str]) -> None:
        if self.pool is None:
            self.results.append(self._encode_flat(batch))
        else:
            self.results.append(self.pool.submit(self._encode_flat, batch))

    def _encode_flat(self, batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.separator is not None and (joined := self._encode_joined(batch)) is not None:
            return joined
        encoded = self.encode(batch)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum())), lengths

    def _encode_joined(self, batch: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """The batch encoded as strings of JOINED documents, each document followed by the separator.

        The tokenizer splits its input at added tokens before anything else and encodes the pieces apart, so
        this is the same as encoding each document, for a small fraction of the per-document cost (Python
        objects, lists and Rust bookkeeping of ~15-token lines). None (encode one by one) when the ids hold
        another end-of-text than the separators': a document that holds its text, or makes it.
        """
        separator = self.separator
        texts = [separator.join(batch[i : i + JOINED]) + separator for i in range(0, len(batch), JOINED)]
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32)
        ends = np.flatnonzero(ids == self.separator_id)
        if len(ends) != len(batch):
            return None
        return np.delete(ids, ends), np.diff(ends, prepend=-1) - 1

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pending:
            self._submit(self.pending)
            self.pending = []
        parts = [r if isinstance(r, tuple) else r.result() for r in self.results]
        if not parts:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


CHUNK_TOKENS = 1 << 20  # tokens gathered and written at a time: the scratch memory of writing a split


def token_chunks(ids: np.ndarray | Path, lengths: np.ndarray, order: np.ndarray, eos: int) -> Iterator[np.ndarray]:
    """The documents at ``order``, each followed by end-of-text, as consecutive int32 slices of about a million tokens.

    ``ids`` holds every document's tokens end to end (in document index order), in memory or in a file of
    int32s, and ``lengths`` their counts. A file is mapped anew for each slice, without read-ahead (the
    documents of a slice are scattered over it), so that only the pages a slice reads are in memory, and
    only until the next: memory stays the same for any size of corpus.
    """
    if len(order) == 0:
        return
    starts = np.cumsum(lengths) - lengths
    counts = lengths[order]
    cumulative = np.cumsum(counts + 1)
    cuts = np.searchsorted(cumulative, np.arange(CHUNK_TOKENS, int(cumulative[-1]), CHUNK_TOKENS), side="right")
    bounds = [0, *np.unique(cuts[(cuts > 0) & (cuts < len(order))]).tolist(), len(order)]
    for lo, hi in itertools.pairwise(bounds):
        n = counts[lo:hi]
        out = np.empty(int(n.sum()) + len(n), dtype=np.int32)
        ends = np.cumsum(n + 1)  # end of each document's slot in out, its end-of-text included
        out[ends - 1] = eos
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        out[np.repeat(ends - n - 1, n) + within] = gather(ids, np.repeat(starts[order[lo:hi]], n) + within)
        yield out


def gather(ids: np.ndarray | Path, index: np.ndarray) -> np.ndarray:
    """``ids[index]``, of an array or of a file of int32s, mapped for reading at random: the kernel reads
    only the pages touched (not the pages around them), and lets them go when the map closes."""
    if not isinstance(ids, Path):
        return ids[index]
    with ids.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as region:
        region.madvise(mmap.MADV_RANDOM)
        return np.frombuffer(region, dtype=np.int32)[index]  # a copy: nothing refers to the map after


def blocks(chunks: Iterator[np.ndarray], block_size: int) -> Iterator[np.ndarray]:
    """The token stream in rows of ``block_size``; the tokens after the last whole block are left out."""
    carry = np.zeros(0, dtype=np.int32)
    for chunk in chunks:
        tokens = np.concatenate([carry, chunk]) if len(carry) else chunk
        n = len(tokens) // block_size
        if n:
            yield tokens[: n * block_size].reshape(n, block_size)
        carry = tokens[n * block_size :]


def blocks_split(path: Path, rows: Iterator[np.ndarray], block_size: int):
    """Write the rows to an Arrow stream file as they come; that file as a (memory-mapped) dataset split.

    A fixed-size list column straight from the numpy buffers: no per-row Python objects, and the schema
    itself says every row has exactly block_size tokens. The split's fingerprint is a hash of its tokens
    (``datasets`` would hash the file's path and time, which differ from run to run).
    """
    import datasets
    from datasets.table import MemoryMappedTable

    schema = pa.schema({"input_ids": pa.list_(pa.int32(), block_size)})
    digest = hashlib.blake2b(digest_size=8)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for block in rows:
            digest.update(block)
            column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), block_size)
            writer.write_batch(pa.record_batch([column], schema=schema))
    return datasets.Dataset(MemoryMappedTable.from_file(str(path)), fingerprint=digest.hexdigest())


# ---------------------------------------------------------------------------------------------
# The stage


def tokenize(config: TokenizeConfig, run: StageRun) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()  # one tqdm line per split is noise in a pod's log
    with models.model_dir(config.base_model, weights=False) as path:
        tokenizer = models.load_tokenizer(path)
        context = models.context_length(models.load_model_config(path), tokenizer)
    if config.task == "sft":
        return tokenize_sft(config, run, tokenizer, context)
    if tokenizer.eos_token_id is None:
        raise UserError(f"base_model={config.base_model!r} has a tokenizer without an eos token to separate documents")
    # An unknown context length leaves block_size unchecked here; train_lora checks it against the model.
    if context is not None and config.block_size > context:
        raise UserError(f"block_size={config.block_size} is longer than base_model's context of {context} tokens")
    if config.merge:
        return merge_shards(config, run, tokenizer)

    files, skipped = text_files(store.expand(config.input_uri, "input_uri"), config)
    pieces = [Piece(f) for f in files] if config.num_shards == 1 else shard_pieces(files, config)
    log.info("reading %d file(s) from %s%s", len(pieces), config.input_uri, shard_note(config))
    started = time.perf_counter()  # reading, cleaning and tokenizing overlap: timed together
    encoder = Encoder(tokenizer, config.batch_size)
    try:
        with older_objects_frozen():
            corpus = ingest(pieces, config, on_documents=encoder.add)
            ids, lengths = encoder.finish()
    finally:
        encoder.close()
    if config.num_shards > 1:
        return write_shard(config, run, corpus, ids, lengths, len(files), len(skipped), time.perf_counter() - started)
    corpus.check(len(files))
    docs, counts = corpus.docs, corpus.counts
    counts["files_skipped_not_text"] = len(skipped)
    return write_dataset(config, run, tokenizer, ids, lengths, lambda order: (docs[i] for i in order), counts, started)


def write_dataset(
    config: TokenizeConfig,
    run: StageRun,
    tokenizer: Any,
    ids: np.ndarray | Path,
    lengths: np.ndarray,
    validation_texts: Callable[[np.ndarray], Iterator[str]],
    counts: Counter,
    started: float,
) -> dict[str, Any]:
    """Split the documents, pack the blocks, write the dataset and the held-out documents; the metrics.

    ``ids`` (in memory, or a file of int32s) and ``lengths`` hold every kept document's tokens, in input
    order; ``validation_texts`` gives the texts of the documents at the indices it is given, in that order.
    The splits are written a slice at a time: no copy of the corpus's tokens is held in memory.
    """
    import datasets

    train_order, validation_order = split_documents(len(lengths), config.validation_fraction, config.seed)
    log.info(
        "%d of %d records kept; %d train / %d validation documents",
        len(lengths),
        counts["records_read"],
        len(train_order),
        len(validation_order),
    )
    block_size = config.block_size
    tokens = {"train": int(lengths[train_order].sum()) + len(train_order)}
    tokens["validation"] = int(lengths[validation_order].sum()) + len(validation_order)
    if tokens["train"] < block_size:
        raise UserError(
            f"input is too small for block_size={block_size}: the train split has {tokens['train']} tokens; "
            "add text, lower validation_fraction or lower block_size"
        )
    splits = {
        name: blocks_split(
            run.scratch / f"{name}.arrow",
            blocks(token_chunks(ids, lengths, order, tokenizer.eos_token_id), block_size),
            block_size,
        )
        for name, order in (("train", train_order), ("validation", validation_order))
    }
    del ids
    seconds = time.perf_counter() - started
    train_blocks, validation_blocks = len(splits["train"]), len(splits["validation"])

    dataset_dir = run.scratch / layout.DATASET
    dataset = datasets.DatasetDict(splits)
    # An empty split saved with the default zero shards cannot be loaded back; evaluate still has the docs.
    dataset.save_to_disk(str(dataset_dir), num_shards={k: 1 for k, d in dataset.items() if len(d) == 0})
    del dataset, splits
    sanity_check(dataset_dir, tokenizer, block_size, train_blocks, validation_blocks)
    store.upload_dir(dataset_dir, run.output(layout.DATASET))

    docs_file = run.scratch / layout.VALIDATION_DOCS
    with docs_file.open("w", encoding="utf-8") as fh:
        for text in validation_texts(validation_order):
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    store.upload_file(docs_file, run.output(layout.VALIDATION_DOCS))

    tokens_total = tokens["train"] + tokens["validation"]
    metrics = {
        "records_read": counts["records_read"],
        "records_kept": len(lengths),
        **{f"dropped_{reason}": counts[reason] for reason in DROP_REASONS},
        "records_with_invalid_utf8": counts["records_with_invalid_utf8"],
        "files_skipped_not_text": counts["files_skipped_not_text"],
        "train_docs": len(train_order),
        "validation_docs": len(validation_order),
        "train_blocks": train_blocks,
        "validation_blocks": validation_blocks,
        "tokens_total": tokens_total,
        "tokens_dropped_in_packing": tokens_total - (train_blocks + validation_blocks) * block_size,
        "tokens_per_second": round(tokens_total / max(seconds, 1e-9)),
    }
    log.info(
        "tokenize: %d train + %d validation blocks of %d tokens from %d of %d records (%d tokens, %.0f tokens/s)",
        train_blocks,
        validation_blocks,
        block_size,
        len(lengths),
        counts["records_read"],
        tokens_total,
        metrics["tokens_per_second"],
    )
    return metrics


# ---------------------------------------------------------------------------------------------
# Sharded: N tasks each tokenize a slice of the input bytes, one task merges them into the same dataset


def shard_note(config: TokenizeConfig) -> str:
    return f" (shard {config.shard_index} of {config.num_shards})" if config.num_shards > 1 else ""


def splittable(uri: str, config: TokenizeConfig) -> bool:
    """Whether records of the file can be found from any byte: lines (JSONL, line text) and Parquet row groups."""
    fmt = file_format(uri, config.input_format)
    return fmt in ("jsonl", "parquet") or (fmt == "text" and config.text_unit == "line")


def shard_pieces(files: list[str], config: TokenizeConfig) -> list[Piece]:
    """This shard's records: those that start in its slice of the input's bytes (the files end to end).

    Slices tile the bytes, so every record is in exactly one shard, and shards in order hold the records in
    input order. A file that cannot be cut (paragraph or whole-file text) goes whole to the shard its
    first byte falls in.
    """
    sizes = [store.size(f) for f in files]
    total = sum(sizes)
    lo, hi = config.shard_index * total // config.num_shards, (config.shard_index + 1) * total // config.num_shards
    pieces, offset = [], 0
    for uri, size in zip(files, sizes, strict=True):
        if splittable(uri, config):
            start, stop = max(lo - offset, 0), min(hi - offset, size)
            if start < stop:
                pieces.append(Piece(uri, start, stop))
        elif lo <= offset < hi:
            pieces.append(Piece(uri))
        offset += size
    return pieces


SHARD_DOCS = "docs.parquet"  # a shard's kept documents in input order: text, its digest and token ids


def text_digest(text: str) -> bytes:
    """A document's 128-bit hash: what the merge deduplicates by, instead of holding every text."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def write_shard(
    config: TokenizeConfig,
    run: StageRun,
    corpus: Corpus,
    ids: np.ndarray,
    lengths: np.ndarray,
    input_files: int,
    skipped: int,
    seconds: float,
) -> dict[str, Any]:
    """A shard's output: its documents (deduplicated among themselves) with their tokens, and its counts."""
    import pyarrow.parquet as pq

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    table = pa.table(
        {
            "text": pa.array(corpus.docs, type=pa.large_string()),
            "digest": pa.array(map(text_digest, corpus.docs), type=pa.binary(16), size=len(corpus.docs)),
            "ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids)),
        }
    )
    path = run.scratch / SHARD_DOCS
    pq.write_table(table, path, row_group_size=16_384)
    store.upload_file(path, run.output(SHARD_DOCS))
    peak = peak_rss_mib()
    log.info(
        "shard %d of %d: %d documents, %d tokens from %d records in %.1f s; peak memory %.0f MiB",
        config.shard_index, config.num_shards, len(lengths), int(lengths.sum()), corpus.counts["records_read"],
        seconds, peak,
    )  # fmt: skip
    return {
        "counts": {k: int(v) for k, v in corpus.counts.items()},
        "first_bad": corpus.first_bad,
        "input_files": input_files,  # of the whole input, as every shard lists it
        "files_skipped_not_text": skipped,
        "docs": len(lengths),
        "tokens": int(lengths.sum()),
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak, 1),
    }


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def shard_uris(config: TokenizeConfig) -> list[str]:
    return [
        config.run_uri(layout.TOKENIZE_SHARDS, layout.shard_name(i, config.num_shards))
        for i in range(config.num_shards)
    ]


# The settings a shard and its merge must share: everything that decides a token of the output.
SHARD_AGNOSTIC = frozenset({"shard_index", "merge", "batch_size", "artifact_root", "run_id"})


def check_shards(config: TokenizeConfig) -> list[dict[str, Any]]:
    """Every shard's manifest: each committed, each made with this merge's settings."""
    manifests = [manifest.read(uri) for uri in shard_uris(config)]
    missing = [uri for uri, m in zip(shard_uris(config), manifests, strict=True) if m is None]
    if missing:
        raise UserError(
            f"{len(missing)} of {config.num_shards} tokenize shard(s) are not committed (no manifest.json), "
            f"first: {missing[0]}; run those shards first, or check num_shards={config.num_shards}"
        )
    ours = {k: v for k, v in dataclasses.asdict(config).items() if k not in SHARD_AGNOSTIC}
    for uri, committed in zip(shard_uris(config), manifests, strict=True):
        theirs = committed.get("config", {})
        changed = sorted(k for k in ours if k in theirs and theirs[k] != ours[k])
        if changed:
            raise UserError(
                f"{uri} was tokenized with other settings ({', '.join(f'{k}={theirs[k]!r}' for k in changed)}) "
                f"than this merge ({', '.join(f'{k}={ours[k]!r}' for k in changed)})"
            )
    return manifests


def merge_shards(config: TokenizeConfig, run: StageRun, tokenizer: Any) -> dict[str, Any]:
    """The dataset of the single-task path from the shards' documents: the same documents, split and blocks.

    Duplicates are dropped across shards as within one (the first occurrence in input order stays), by the
    128-bit digests the shards stored (``text_digest``), not the texts. Token ids go to a scratch file that
    the dataset is written from a slice at a time; the texts are read again for the held-out documents only.
    Memory grows with the number of documents (tens of bytes each), not with their tokens.
    """
    started = time.perf_counter()
    shards = check_shards(config)
    counts: Counter = Counter()
    first_bad = ""
    for committed in shards:
        counts.update(committed["metrics"]["counts"])
        first_bad = first_bad or committed["metrics"]["first_bad"]
    counts["files_skipped_not_text"] = shards[0]["metrics"]["files_skipped_not_text"]
    keep = first_occurrences(np.concatenate([shard_column(uri, "digest") for uri in shard_uris(config)]))
    counts["duplicate"] += int((~keep).sum())
    lengths_parts: list[np.ndarray] = []
    ids_file = run.scratch / "ids.int32"
    with ids_file.open("wb") as out:
        for lists, kept in shard_batches(config, keep, "ids"):
            lists = lists.filter(pa.array(kept))
            lengths_parts.append(lists.value_lengths().to_numpy().astype(np.int64))
            out.write(lists.flatten().to_numpy().astype(np.int32).tobytes())
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, dtype=np.int64)
    check_corpus(config, counts, len(lengths), first_bad, shards[0]["metrics"]["input_files"])
    ids = ids_file if lengths.sum() else np.zeros(0, dtype=np.int32)

    def validation_texts(order: np.ndarray) -> Iterator[str]:
        wanted = {int(i): None for i in order}
        index = 0
        for texts, kept in shard_batches(config, keep, "text"):
            for text in texts.filter(pa.array(kept)).to_pylist():
                if index in wanted:
                    wanted[index] = text
                index += 1
        return (wanted[int(i)] for i in order)

    metrics = write_dataset(config, run, tokenizer, ids, lengths, validation_texts, counts, started)
    return {**metrics, "shards": config.num_shards, "peak_rss_mib": round(peak_rss_mib(), 1)}


def shard_column(uri: str, column: str) -> np.ndarray:
    """One fixed-width column of a shard's documents, as the rows of a numpy array."""
    import pyarrow.parquet as pq

    with store.open_file(uris.join(uri, SHARD_DOCS), "rb") as fh:
        values = pq.read_table(fh, columns=[column]).column(column).combine_chunks()
    width = values.type.byte_width
    if len(values) == 0:
        return np.zeros((0, width), dtype=np.uint8)
    flat = np.frombuffer(values.buffers()[1], dtype=np.uint8, count=(values.offset + len(values)) * width)
    return flat[values.offset * width :].reshape(-1, width)


def first_occurrences(digests: np.ndarray) -> np.ndarray:
    """For each row of 16-byte digests, whether no earlier row has the same one."""
    halves = digests.view(np.uint64)  # two 64-bit keys per row
    order = np.lexsort((halves[:, 1], halves[:, 0]))  # stable: equal digests stay in input order
    ranked = halves[order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = (ranked[1:] == ranked[:-1]).all(axis=1)
    keep = np.ones(len(order), dtype=bool)
    keep[order[repeat]] = False
    return keep


def shard_batches(config: TokenizeConfig, keep: np.ndarray, column: str) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """A column of every shard's documents in input order, in batches, each with its slice of ``keep``."""
    import pyarrow.parquet as pq

    index = 0
    for uri in shard_uris(config):
        with store.open_file(uris.join(uri, SHARD_DOCS), "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=8192, columns=[column]):
                yield batch.column(column), keep[index : index + len(batch)]
                index += len(batch)


# ---------------------------------------------------------------------------------------------
# task=sft: conversations rendered with a chat template, labels on the assistant's tokens

SFT_UNUSABLE = ("bad_json", "bad_conversation")


def read_objects(uri: str, config: TokenizeConfig) -> Iterator[tuple[int, Any, str | None]]:
    """(line or row, record, problem) of a JSONL or Parquet file; the record is None when the problem is set."""
    fmt = file_format(uri, config.input_format)
    if fmt == "jsonl":
        for number, line, _ in decoded_lines(uri):
            if line.strip():
                try:
                    yield number, json.loads(line), None
                except (ValueError, RecursionError):
                    yield number, None, "bad_json"
    elif fmt == "parquet":
        wanted = (config.messages_field, config.prompt_field, config.completion_field)
        with parquet_file(uri) as parquet:
            columns = [c for c in wanted if c in parquet.schema_arrow.names]
            if not columns:
                raise UserError(f"{uri} has none of the columns {', '.join(wanted)} (task=sft)")
            row = 0
            for batch in parquet.iter_batches(batch_size=8192, columns=columns):
                for record in batch.to_pylist():
                    row += 1
                    yield row, {k: v for k, v in record.items() if v is not None}, None
    else:
        raise UserError(f"{uri}: task=sft reads JSONL or Parquet records, not plain text (input_format={fmt})")


def read_conversations(files: list[str], config: TokenizeConfig) -> tuple[list[list[dict[str, str]]], Counter]:
    """The trainable, distinct conversations of every file in input order, and the counts of the others."""
    fields = chat.Fields(config.messages_field, config.prompt_field, config.completion_field)
    counts: Counter = Counter()
    kept: list[list[dict[str, str]]] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    first_bad = ""
    for uri in files:
        for number, record, problem in read_objects(uri, config):
            counts["records_read"] += 1
            try:
                if problem:
                    raise chat.BadRecord("not valid JSON")
                turns = chat.conversation(record, fields)
                for turn in turns:
                    turn["content"] = unicodedata.normalize(config.normalization, turn["content"])
                chat.check_trainable(turns)
            except chat.BadRecord as exc:
                counts[problem or "bad_conversation"] += 1
                first_bad = first_bad or f"{uri} record {number}: {exc}"
                continue
            except chat.Dropped as exc:
                counts[exc.reason] += 1
                continue
            key = chat.canonical(turns)
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            kept.append(turns)
    read = counts["records_read"]
    if read == 0:
        raise UserError(f"input_uri={config.input_uri!r} holds no records: {len(files)} file(s), all empty")
    bad = sum(counts[r] for r in SFT_UNUSABLE)
    if bad / read > config.max_bad_fraction:
        raise UserError(
            f"{bad} of {read} records ({bad / read:.1%}) are not conversations, more than "
            f"max_bad_fraction={config.max_bad_fraction}; first: {first_bad}"
        )
    if not kept:
        dropped = ", ".join(f"{r} {counts[r]}" for r in (*chat.DROP_REASONS, "duplicate", *SFT_UNUSABLE) if counts[r])
        raise UserError(
            f"no trainable conversations: read {read} from input_uri={config.input_uri!r}, dropped {dropped}"
        )
    return kept, counts


def tokenize_sft(config: TokenizeConfig, run: StageRun, tokenizer: Any, context: int | None) -> dict[str, Any]:
    import datasets

    if context is not None and config.block_size > context:
        raise UserError(f"block_size={config.block_size} is longer than base_model's context of {context} tokens")
    template = chat.resolve_template(tokenizer, config.chat_template, config.base_model)
    renderer = chat.Renderer(tokenizer, template, config.train_on)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError(f"base_model={config.base_model!r} has a tokenizer with neither a pad nor an eos token")
    files, skipped = text_files(store.expand(config.input_uri, "input_uri"), config)
    log.info("reading conversations from %d file(s) in %s", len(files), config.input_uri)
    started = time.perf_counter()

    def examples(order: np.ndarray) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
        done, kept = [], []
        rendered = renderer.examples([conversations[i] for i in order.tolist()])
        for i, (ids, labels) in zip(order.tolist(), rendered, strict=True):
            if len(ids) > config.block_size:
                if not config.truncation or all(x == chat.IGNORE for x in labels[: config.block_size]):
                    counts["too_long"] += 1
                    continue
                counts["truncated"] += 1
                ids, labels = ids[: config.block_size], labels[: config.block_size]
            done.append((ids, labels))
            kept.append(i)
        return done, kept

    with older_objects_frozen():  # the conversations, tokens and labels are many small containers
        conversations, counts = read_conversations(files, config)
        train_order, validation_order = split_documents(len(conversations), config.validation_fraction, config.seed)
        train_examples, _ = examples(train_order)
        validation_examples, validation_kept = examples(validation_order)
    if not train_examples:
        raise UserError(
            f"no training conversation fits block_size={config.block_size} after templating "
            f"({counts['too_long']} too long): raise block_size or set truncation=true"
        )
    train = chat.pack(train_examples, config.block_size, pad_id, config.packing)
    validation = chat.pack(validation_examples, config.block_size, pad_id, config.packing)
    seconds = time.perf_counter() - started

    dataset_dir = run.scratch / layout.DATASET
    dataset = datasets.DatasetDict(
        train=sft_dataset(train, config.block_size), validation=sft_dataset(validation, config.block_size)
    )
    dataset.save_to_disk(str(dataset_dir), num_shards={k: 1 for k, d in dataset.items() if len(d) == 0})
    sanity_check(dataset_dir, tokenizer, config.block_size, len(train.input_ids), len(validation.input_ids))
    store.upload_dir(dataset_dir, run.output(layout.DATASET))
    docs_file = run.scratch / layout.VALIDATION_DOCS
    with docs_file.open("w", encoding="utf-8") as fh:
        for i in validation_kept:
            fh.write(json.dumps({"messages": conversations[i]}, ensure_ascii=False) + "\n")
    store.upload_file(docs_file, run.output(layout.VALIDATION_DOCS))
    store.write_text(run.output(layout.CHAT_TEMPLATE), template)

    tokens = sum(len(ids) for ids, _ in train_examples + validation_examples)
    trained = int((train.labels != chat.IGNORE).sum() + (validation.labels != chat.IGNORE).sum())
    slots = config.block_size * (len(train.input_ids) + len(validation.input_ids))
    metrics = {
        "task": "sft",
        "records_read": counts["records_read"],
        "records_kept": len(conversations),
        **{f"dropped_{r}": counts[r] for r in (*chat.DROP_REASONS, "duplicate", *SFT_UNUSABLE)},
        "examples_truncated": counts["truncated"],
        "files_skipped_not_text": len(skipped),
        "train_examples": len(train_examples),
        "validation_examples": len(validation_examples),
        "train_blocks": len(train.input_ids),
        "validation_blocks": len(validation.input_ids),
        "tokens_total": tokens,
        "tokens_with_loss": trained,
        "loss_token_share": round(trained / max(tokens, 1), 4),
        "padding_tokens": train.padding + validation.padding,
        "padding_share": round((train.padding + validation.padding) / max(slots, 1), 4),
        "tokens_per_second": round(tokens / max(seconds, 1e-9)),
    }
    log.info(
        "tokenize (sft): %d train + %d validation examples in %d + %d blocks of %d tokens (%.1f%% padding); "
        "%d of %d records kept; %.1f%% of tokens carry loss",
        len(train_examples), len(validation_examples), len(train.input_ids), len(validation.input_ids),
        config.block_size, 100 * metrics["padding_share"], len(conversations), counts["records_read"],
        100 * metrics["loss_token_share"],
    )  # fmt: skip
    return metrics


def sft_dataset(blocks: chat.Blocks, block_size: int):
    import datasets

    def column(values: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), block_size)

    return datasets.Dataset(
        pa.table(
            {
                "input_ids": column(blocks.input_ids),
                "labels": column(blocks.labels),
                "position_ids": column(blocks.position_ids),
            }
        )
    )


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
    return run_stage(layout.TOKENIZE, TokenizeConfig, inputs, tokenize, argv)


if __name__ == "__main__":
    sys.exit(main())
