"""Bad data through the real stages: every input is either used with what was dropped counted in the
manifest, or refused with a one-line ``error: <stage>: ...`` (exit 2); never a traceback, never a
half-written output.

``tests/test_tokenize.py`` and ``tests/test_batch_infer.py`` check the exact messages of the common
cases; this is the hostile catalogue, each case through the same three checks.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import batch_infer
from stages import tokenize as tokenize_stage
from tests.faults.conftest import lost_outputs, tree_hashes
from tests.test_batch_infer import stage_args as infer_args
from tests.test_tokenize import doc, tokenizer_model

pytestmark = pytest.mark.faults
__all__ = ["tokenizer_model"]  # the fixture, imported for use here

GOOD = [{"text": doc(i)} for i in range(30)]
NESTED = "[" * 100_000 + "]" * 100_000  # valid JSON nesting far deeper than any parser's recursion limit


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def parquet(table: pa.Table) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        pq.write_table(table, folder / "data.parquet")
        return folder / "data.parquet"

    return write


def file(name: str, content: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return write


def mixed_folder(folder: Path) -> Path:
    data = folder / "mixed"
    data.mkdir()
    (data / "a.jsonl").write_bytes(jsonl(*GOOD[:10]))
    (data / "b.txt").write_text("\n\n".join(doc(i) for i in range(10, 20)))
    pq.write_table(pa.table({"text": [doc(i) for i in range(20, 30)]}), data / "c.parquet")
    (data / "d.bin").write_bytes(random.Random(1).randbytes(4096))
    (data / "e.jsonl").write_bytes(b"")
    (data / ".hidden.jsonl").write_bytes(b"{not json")
    return data


def empty_folder(folder: Path) -> Path:
    (folder / "nothing").mkdir()
    return folder / "nothing"


# id: (stage, input writer, "counted:<metric>" (exit 0, metric > 0) or "rejected:<words>" (exit 2), marks)
CASES = {
    "empty-file": ("tokenize", file("empty.txt", b""), "rejected:holds no text"),
    "whitespace-only": ("tokenize", file("blank.txt", b" \n\t\r\n\n   \n"), "rejected:holds no text"),
    "non-utf8": (
        "tokenize",
        file("latin1.txt", "\n\n".join(doc(i) + " café" for i in range(20)).encode("latin-1")),
        "counted:records_with_invalid_utf8",
    ),
    "binary-garbage": (
        "tokenize",
        file("noise.txt", random.Random(0).randbytes(200_000)),
        "counted:records_with_invalid_utf8",
    ),
    "gzip-named-jsonl": ("tokenize", file("data.jsonl", gzip.compress(jsonl(*GOOD))), "rejected:unusable"),
    "utf16-with-bom": ("tokenize", file("utf16.jsonl", jsonl(*GOOD).decode().encode("utf-16")), "rejected:"),
    "broken-jsonl-last-line": (
        "tokenize",
        file("cut.jsonl", jsonl(*(GOOD * 4))[:-20]),
        "counted:dropped_bad_json",
    ),
    "jsonl-of-non-objects": ("tokenize", file("arrays.jsonl", jsonl(*([[1, 2], "s", 3, None] * 10))), "rejected:"),
    "wrong-field-types": (
        "tokenize",
        file("types.jsonl", jsonl(*[{"text": v} for v in (123, None, ["a"], {"a": 1}, True)] * 8)),
        "rejected:missing_field",
    ),
    "deeply-nested-json": (
        "tokenize",
        file("nested.jsonl", jsonl(*GOOD * 4, NESTED)),
        "counted:dropped_bad_json",
    ),
    "nul-bytes": ("tokenize", file("nul.txt", b"\x00".join(doc(i).encode() for i in range(30))), "rejected:"),
    "parquet-wrong-schema": (
        "tokenize",
        parquet(pa.table({"body": [doc(i) for i in range(30)]})),
        "rejected:no column text_field='text'",
    ),
    "parquet-text-of-ints": ("tokenize", parquet(pa.table({"text": list(range(30))})), "rejected:not text"),
    "not-parquet-named-parquet": ("tokenize", file("fake.parquet", jsonl(*GOOD)), "rejected:not a readable Parquet"),
    "mixed-formats-folder": ("tokenize", mixed_folder, "counted:records_read"),
    "empty-folder": ("tokenize", empty_folder, "rejected:input_uri="),
    "one-10mb-line-among-documents": (
        "tokenize",
        file("long.txt", ("\n\n".join(doc(i) for i in range(30)) + "\n\n" + "x" * 10_000_000).encode()),
        "counted:dropped_too_long",
    ),
    "one-100mb-line": (
        "tokenize",
        file("huge.txt", b"y" * 100_000_000),
        "rejected:too_long",
        pytest.mark.slow,
    ),
    "prompts-duplicate-ids": (
        "batch_infer",
        file("dup.jsonl", jsonl({"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"})),
        "rejected:duplicate id",
    ),
    "prompts-empty-file": ("batch_infer", file("empty.jsonl", b""), "rejected:no prompts"),
    "prompts-non-utf8": (
        "batch_infer",
        file("latin1.jsonl", '{"id": "a", "prompt": "café"}\n'.encode("latin-1")),
        "rejected:line 1",
    ),
    "prompts-id-of-wrong-type": ("batch_infer", file("ids.jsonl", jsonl({"id": [1], "prompt": "x"})), "rejected:id"),
    "prompts-prompt-a-number": ("batch_infer", file("num.jsonl", jsonl({"id": "a", "prompt": 7})), "rejected:prompt"),
    "prompts-not-objects": ("batch_infer", file("list.jsonl", jsonl([1, 2], [3])), "rejected:line 1"),
    "prompts-deeply-nested": (
        "batch_infer",
        file("nested.jsonl", jsonl({"id": "a", "prompt": "x"}, NESTED)),
        "rejected:line 2",
    ),
}


def params():
    for case, (stage, write, expect, *marks) in CASES.items():
        yield pytest.param(stage, write, expect, id=case, marks=marks)


@pytest.mark.parametrize(("stage", "write", "expect"), params())
def test_bad_data_is_counted_or_refused_cleanly_and_never_half_written(
    request, tmp_path, tokenizer_model, capsys, tally, stage, write, expect
):
    case = request.node.callspec.id
    data = write(tmp_path)
    run_id = f"bad-data-{case}"
    if stage == "tokenize":
        root = tmp_path / "art"
        out = root / "runs" / run_id / "tokenize"
        args = [f"input_uri={data}", f"base_model={tokenizer_model}", f"artifact_root={root}", f"run_id={run_id}"]
        main = tokenize_stage.main
        args += ["block_size=32", "min_chars=20"]
    else:
        finetune_run = request.getfixturevalue("finetune_run")  # only these cases need the trained adapter
        out = Path(finetune_run["artifact_root"], "runs", run_id, "batch_infer")
        main, args = batch_infer.main, infer_args(finetune_run, run_id, data)
    try:
        code = main(args)
    except BaseException as exc:  # an escaped exception is a traceback in the task log
        code = f"{type(exc).__name__}: {str(exc)[:200]}"
    err = capsys.readouterr().err
    outcome, _, detail = expect.partition(":")

    committed = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    if outcome == "rejected":
        clean = code == 2 and f"error: {stage}: " in err and detail in err and not tree_hashes(out)
    else:
        clean = code == 0 and committed is not None and committed["metrics"].get(detail, 0) > 0
    clean = clean and "Traceback" not in err
    tally.bad_input(f"bad data ({stage})", rejected_cleanly=clean, data_lost=lost_outputs(out))

    assert "Traceback" not in err, err[-3000:]
    if outcome == "rejected":
        assert code == 2, f"exit {code}: {err[-3000:]}"
        assert f"error: {stage}: " in err and detail in err, err[-3000:]
        assert not tree_hashes(out), f"a refused input left files: {sorted(tree_hashes(out))}"
    else:
        assert code == 0, f"exit {code}: {err[-3000:]}"
        assert committed is not None and committed["metrics"].get(detail, 0) > 0, committed and committed["metrics"]
        assert lost_outputs(out) == 0
