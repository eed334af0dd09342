"""The tokenize stage: ingest (JSONL, text, Parquet; file, folder, glob), cleaning, drops, split, packing, contract."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import tokenize as tokenize_stage
from stages.base_model import EOS, train_tokenizer
from stages.core import manifest, models
from stages.core.config import build_config
from stages.core.errors import UserError
from stages.core.models import load_tokenizer
from stages.tokenize import TokenizeConfig, clean, file_format, split_documents
from tests.conftest import run_stage_cli

SENTENCE = (
    "now is the winter of our discontent made glorious summer by this sun of york and all the clouds "
    "that lowered upon our house in the deep bosom of the ocean buried"
)


def doc(i: int, words: int = 40) -> str:
    """A distinct, deterministic English-like document."""
    vocabulary = SENTENCE.split()
    return f"Document {i}: " + " ".join(vocabulary[(i * 7 + j * 3) % len(vocabulary)] for j in range(words)) + "."


@pytest.fixture(scope="session")
def tokenizer_model(base_corpus: Path, tmp_path_factory) -> str:
    """A base_model folder with just a tokenizer and a config: all that tokenize reads, in 0.2 s instead of 30 s."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("tokenizer_model")
    tokenizer = train_tokenizer([p.read_text() for p in sorted(base_corpus.glob("*.txt"))], 512, 256)
    tokenizer.save_pretrained(folder)
    LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256).save_pretrained(folder)
    return f"file://{folder}"


@pytest.fixture
def stage(tmp_path: Path, tokenizer_model: str, capsys):
    """Run the stage in-process; returns (exit code, stdout result or None, stderr)."""

    def run(input_uri: str | Path, *overrides: str) -> tuple[int, dict | None, str]:
        args = [f"input_uri={input_uri}", f"base_model={tokenizer_model}", f"artifact_root={tmp_path / 'art'}"]
        code = tokenize_stage.main([*args, *overrides])
        out, err = capsys.readouterr()
        return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err

    return run


def out_dir(tmp_path: Path, run_id: str = "dev") -> Path:
    return tmp_path / "art" / "runs" / run_id / "tokenize"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def validation_docs(tmp_path: Path, run_id: str = "dev") -> list[str]:
    lines = (out_dir(tmp_path, run_id) / "validation_docs.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


def file_hashes(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class TestFormats:
    def test_jsonl_reads_the_configured_text_field(self, stage, tmp_path):
        docs = [doc(i) for i in range(30)]
        data = write_jsonl(
            tmp_path / "data.jsonl", [{"id": i, "body": d, "text": "ignored"} for i, d in enumerate(docs)]
        )

        code, result, _ = stage(data, "text_field=body", "block_size=32")

        assert code == 0
        metrics = result["metrics"]
        assert metrics["records_read"] == metrics["records_kept"] == 30
        assert metrics["train_docs"] + metrics["validation_docs"] == 30
        held_out = validation_docs(tmp_path)
        assert len(held_out) == metrics["validation_docs"] == 3
        assert set(held_out) <= set(docs)

    def test_plain_text_splits_into_paragraphs_at_blank_lines(self, stage, tmp_path):
        paragraphs = [f"{doc(i, 12)}\n{doc(i + 100, 12)}" for i in range(20)]
        (tmp_path / "play.txt").write_text("\n\n \n".join(paragraphs) + "\n")

        code, result, _ = stage(tmp_path / "play.txt", "text_unit=paragraph", "block_size=16")

        assert code == 0
        assert result["metrics"]["records_read"] == 20
        assert set(validation_docs(tmp_path)) <= set(paragraphs)  # multi-line paragraphs stay whole

    def test_plain_text_by_line_and_by_file(self, stage, tmp_path):
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "a.txt").write_text("\n".join(doc(i) for i in range(10)) + "\n\n")
        (corpus / "b.txt").write_text(doc(99))

        _, by_line, _ = stage(corpus / "a.txt", "text_unit=line", "block_size=16", "run_id=lines")
        _, by_file, _ = stage(corpus, "text_unit=file", "block_size=16", "run_id=files")

        assert by_line["metrics"]["records_read"] == 10
        assert by_file["metrics"]["records_read"] == 2

    def test_parquet_column(self, stage, tmp_path):
        docs = [doc(i) for i in range(20)]
        pq.write_table(pa.table({"body": [*docs, None], "n": list(range(21))}), tmp_path / "data.parquet")

        code, result, _ = stage(tmp_path / "data.parquet", "text_field=body", "block_size=32", "max_bad_fraction=0.1")

        assert code == 0
        assert result["metrics"]["records_kept"] == 20
        assert result["metrics"]["dropped_missing_field"] == 1  # the null
        assert set(validation_docs(tmp_path)) <= set(docs)

    def test_parquet_without_the_text_column_names_file_and_columns(self, stage, tmp_path, capsys):
        pq.write_table(pa.table({"content": [doc(1), doc(2)]}), tmp_path / "data.parquet")

        code, _, err = stage(tmp_path / "data.parquet")

        assert code == 2
        assert "data.parquet" in err and "'text'" in err and "content" in err

    def test_folder_reads_every_format_by_extension_and_glob_selects(self, stage, tmp_path):
        corpus = tmp_path / "corpus"
        (corpus / "sub").mkdir(parents=True)
        (corpus / "a.txt").write_text("\n\n".join(doc(i) for i in range(10)))
        write_jsonl(corpus / "sub" / "b.jsonl", [{"text": doc(i)} for i in range(10, 25)])
        pq.write_table(pa.table({"text": [doc(i) for i in range(25, 30)]}), corpus / "c.parquet")
        (corpus / ".hidden.txt").write_text(doc(1000))

        _, folder, _ = stage(corpus, "block_size=16", "run_id=folder")
        _, glob, _ = stage(f"{corpus}/*.txt", "block_size=16", "run_id=glob")

        assert folder["metrics"]["records_read"] == 30
        assert glob["metrics"]["records_read"] == 10

    def test_a_byte_order_mark_does_not_cost_the_first_record(self, stage, tmp_path):
        rows = [{"text": doc(i)} for i in range(10)]
        (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "x.jsonl", rows).read_bytes())

        code, result, _ = stage(tmp_path / "bom.jsonl", "block_size=16")

        assert code == 0 and result["metrics"]["records_kept"] == 10 and result["metrics"]["dropped_bad_json"] == 0

    @pytest.mark.parametrize(("encoding", "named"), [("utf-16", "UTF-16 (little-endian)"), ("utf-16-be", "UTF-16")])
    def test_utf16_text_is_refused_naming_its_encoding(self, stage, tmp_path, encoding, named):
        (tmp_path / "wide.txt").write_bytes("\n\n".join(doc(i) for i in range(10)).encode(encoding))

        code, _, err = stage(tmp_path / "wide.txt")

        assert code == 2 and f"is {named}" in err and "convert it to UTF-8" in err and "Traceback" not in err

    def test_symbolic_links_in_a_folder_are_followed_and_dead_ones_skipped(self, stage, tmp_path):
        real = tmp_path / "real"
        real.mkdir()
        write_jsonl(real / "a.jsonl", [{"text": doc(i)} for i in range(10)])
        data = tmp_path / "data"
        data.mkdir()
        (data / "linked").symlink_to(real)  # fsspec listed it as a file, then reading it failed
        (data / "dead").symlink_to(tmp_path / "nowhere")
        (data / "loop").symlink_to(data)  # a link back up: listed once

        code, result, _ = stage(data, "block_size=16")

        assert code == 0 and result["metrics"]["records_kept"] == 10

    def test_a_folder_of_dead_links_and_a_name_too_long_are_user_errors(self, stage, tmp_path):
        dead = tmp_path / "dead"
        dead.mkdir()
        (dead / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
        code, _, err = stage(dead)
        assert code == 2 and "holds no files but 1 symbolic link(s) that lead to no file" in err

        code, _, err = stage(tmp_path / ("x" * 300 + ".jsonl"))
        assert code == 2 and "File name too long" in err and "Traceback" not in err

    def test_a_folder_skips_and_counts_files_that_are_not_text_and_one_alone_is_refused(self, stage, tmp_path):
        data = tmp_path / "mixed"
        data.mkdir()
        write_jsonl(data / "a.jsonl", [{"text": doc(i)} for i in range(10)])
        (data / "table.csv").write_text("id,text\n1,a header and separators are not prose\n")

        code, result, _ = stage(data, "block_size=16")
        assert code == 0 and result["metrics"]["files_skipped_not_text"] == 1
        assert result["metrics"]["records_kept"] == 10  # the CSV's header is not a document

        code, _, err = stage(data / "table.csv", "run_id=alone")
        assert code == 2 and "is a .csv file, which is not running text" in err and "input_format=text" in err

    def test_auto_format_by_extension(self):
        assert file_format("file:///d/x.JSONL", "auto") == "jsonl"
        assert file_format("s3://b/x.ndjson", "auto") == "jsonl"
        assert file_format("file:///d/x.parquet", "auto") == "parquet"
        assert file_format("file:///d/x.csv", "auto") == "text"
        assert file_format("file:///d/x.txt", "jsonl") == "jsonl"


class TestOutput:
    def test_dataset_holds_fixed_blocks_that_decode_to_the_documents_with_eos(self, stage, tmp_path, tokenizer_model):
        docs = [doc(i, 80) for i in range(40)]
        write_jsonl(tmp_path / "data.jsonl", [{"text": d} for d in docs])

        code, result, _ = stage(tmp_path / "data.jsonl", "block_size=64", "validation_fraction=0.25")

        assert code == 0
        dataset = datasets.load_from_disk(str(out_dir(tmp_path) / "dataset"))
        assert set(dataset) == {"train", "validation"}
        metrics = result["metrics"]
        for split in ("train", "validation"):
            assert dataset[split].column_names == ["input_ids"]
            assert dataset[split].features["input_ids"].feature.dtype == "int32"
            assert len(dataset[split]) == metrics[f"{split}_blocks"] > 0
            assert all(len(row) == 64 for row in dataset[split]["input_ids"])
        blocks = metrics["train_blocks"] + metrics["validation_blocks"]
        assert metrics["tokens_total"] == blocks * 64 + metrics["tokens_dropped_in_packing"]

        # Validation blocks are the held-out documents, in split order, each ended by EOS, cut at a block edge.
        backend = load_tokenizer(tokenizer_model.removeprefix("file://")).backend_tokenizer
        ids = [t for row in dataset["validation"]["input_ids"] for t in row]
        decoded = backend.decode(ids, skip_special_tokens=False)
        expected = "".join(d + EOS for d in validation_docs(tmp_path))
        assert len(decoded) > len(expected) / 2
        assert expected.startswith(decoded)

    def test_validation_may_have_no_blocks_when_its_documents_exist(self, stage, tmp_path):
        docs = [doc(i, 80) for i in range(20)]
        write_jsonl(tmp_path / "data.jsonl", [{"text": d} for d in docs])

        code, result, _ = stage(tmp_path / "data.jsonl", "block_size=256", "validation_fraction=0.05")

        assert code == 0
        assert result["metrics"]["validation_blocks"] == 0
        assert result["metrics"]["validation_docs"] == 1
        dataset = datasets.load_from_disk(str(out_dir(tmp_path) / "dataset"))
        assert len(dataset["validation"]) == 0
        assert len(validation_docs(tmp_path)) == 1

    def test_same_seed_gives_identical_outputs_and_another_seed_another_split(self, stage, tmp_path):
        write_jsonl(tmp_path / "data.jsonl", [{"text": doc(i)} for i in range(50)])
        manifests = {}
        for run_id, seed in (("a", 0), ("b", 0), ("c", 1)):
            code, _, _ = stage(tmp_path / "data.jsonl", "block_size=32", f"seed={seed}", f"run_id={run_id}")
            assert code == 0
            manifests[run_id] = json.loads((out_dir(tmp_path, run_id) / "manifest.json").read_text())

        assert manifests["a"]["outputs"] == manifests["b"]["outputs"]
        assert "dataset/train/data-00000-of-00001.arrow" in manifests["a"]["outputs"]
        assert validation_docs(tmp_path, "a") == validation_docs(tmp_path, "b")
        assert set(validation_docs(tmp_path, "a")) != set(validation_docs(tmp_path, "c"))

    def test_split_is_by_document_with_at_least_one_on_each_side(self):
        train, validation = split_documents(10, 0.01, seed=3)
        assert len(validation) == 1 and len(train) == 9
        train, validation = split_documents(2, 0.99, seed=3)
        assert len(validation) == 1 and len(train) == 1
        assert sorted([*train, *validation]) == [0, 1]
        with pytest.raises(UserError, match="at least 2"):
            split_documents(1, 0.5, seed=0)

    def test_blocks_written_a_slice_at_a_time_are_the_documents_end_to_end(self, tmp_path, monkeypatch):
        """The split's token stream, gathered in slices (from memory or from a file of ids), then cut into
        rows: the same tokens as every document in split order with its end-of-text, whatever the slice size."""
        rng = np.random.default_rng(0)
        lengths = rng.integers(0, 40, size=300)
        lengths[7] = 500  # longer than a slice
        ids = rng.integers(0, 1000, size=int(lengths.sum()), dtype=np.int32)
        order = rng.permutation(300)[:250]
        starts = np.cumsum(lengths) - lengths
        expected = np.concatenate([np.append(ids[starts[i] : starts[i] + lengths[i]], 9999) for i in order])
        ids.tofile(tmp_path / "ids.int32")
        monkeypatch.setattr(tokenize_stage, "CHUNK_TOKENS", 64)

        for source in (ids, tmp_path / "ids.int32"):
            chunks = list(tokenize_stage.token_chunks(source, lengths, order, eos=9999))
            assert len(chunks) > 50 and max(map(len, chunks)) >= 500
            assert np.array_equal(np.concatenate(chunks), expected)
            rows = np.concatenate(list(tokenize_stage.blocks(iter(chunks), 48)))
            assert rows.shape == (len(expected) // 48, 48)
            assert np.array_equal(rows.reshape(-1), expected[: rows.size])
        assert list(tokenize_stage.token_chunks(ids, lengths, order[:0], eos=9999)) == []


class TestCleaningAndDrops:
    def test_clean_normalises_unicode_controls_and_whitespace(self):
        raw = "\ufeff  Cafe\u0301\x00 \t and\x07  tea \r\n\r\n\r\n\r\n  next\x0cline\t\n"
        assert clean(raw, "NFC") == "Café and tea\n\nnext\nline"
        assert clean("ﬁne\u00a0print", "NFC") == "ﬁne print"
        assert clean("ﬁne\u00a0print", "NFKC") == "fine print"

    def test_drops_are_counted_by_reason(self, stage, tmp_path):
        rows = [
            *({"text": doc(i)} for i in range(20)),
            {"text": doc(0)},  # exact duplicate
            {"text": "  " + doc(1).replace(" ", "  ") + " \n"},  # duplicate once cleaned
            {"text": "short"},
            {"text": "x" * 500},
            {"text": " \x00\t\n "},  # nothing left after cleaning
        ]
        write_jsonl(tmp_path / "data.jsonl", rows)

        code, result, _ = stage(tmp_path / "data.jsonl", "min_chars=10", "max_chars=400", "block_size=16")

        assert code == 0
        metrics = result["metrics"]
        assert metrics["records_read"] == 25
        assert metrics["records_kept"] == 20
        assert metrics["dropped_duplicate"] == 2
        assert metrics["dropped_too_short"] == 1
        assert metrics["dropped_too_long"] == 1
        assert metrics["dropped_empty"] == 1
        manifest = json.loads((out_dir(tmp_path) / "manifest.json").read_text())
        assert manifest["metrics"] == metrics

    def test_invalid_utf8_is_replaced_and_counted(self, stage, tmp_path):
        paragraphs = [doc(i).encode() for i in range(10)]
        paragraphs[3] = b"Broken \xff\xfe bytes and a cut \xe2\x82 euro\n" + paragraphs[3]
        (tmp_path / "bytes.txt").write_bytes(b"\n\n".join(paragraphs))

        code, result, _ = stage(tmp_path / "bytes.txt", "block_size=16", "validation_fraction=0.5", "seed=2")

        assert code == 0
        assert result["metrics"]["records_with_invalid_utf8"] == 1
        assert result["metrics"]["records_kept"] == 10

    def test_invalid_utf8_text_keeps_replacement_characters(self, tmp_path):
        (tmp_path / "bytes.txt").write_bytes(b"ok line\n\nbad \xff line\n")
        config = TokenizeConfig(input_uri=str(tmp_path / "bytes.txt"), base_model="unused-hub-id")

        pieces = [tokenize_stage.Piece(uri) for uri in tokenize_stage.store.expand(config.input_uri)]
        corpus = tokenize_stage.ingest(pieces, config)
        docs, counts = corpus.docs, corpus.counts

        assert docs == ["ok line", "bad \ufffd line"]
        assert counts["records_with_invalid_utf8"] == 1

    def test_broken_json_and_missing_field_are_skipped_within_budget(self, stage, tmp_path):
        rows = [{"text": doc(i)} for i in range(18)]
        rows[4] = '{"text": "unterminated'
        rows[9] = {"title": "no text"}
        rows[11] = {"text": 42}
        write_jsonl(tmp_path / "data.jsonl", rows)

        code, result, _ = stage(tmp_path / "data.jsonl", "max_bad_fraction=0.2", "block_size=16")

        assert code == 0
        assert result["metrics"]["dropped_bad_json"] == 1
        assert result["metrics"]["dropped_missing_field"] == 2
        assert result["metrics"]["records_kept"] == 15

    def test_too_many_broken_records_fail_naming_file_and_first_line(self, stage, tmp_path):
        rows = [{"text": doc(i)} for i in range(18)]
        rows[4] = "not json at all"
        rows[9] = {"title": "no text"}
        write_jsonl(tmp_path / "data.jsonl", rows)

        code, _, err = stage(tmp_path / "data.jsonl")

        assert code == 2
        assert "data.jsonl line 5" in err
        assert "max_bad_fraction=0.01" in err
        assert not out_dir(tmp_path).exists() or not any(out_dir(tmp_path).iterdir())


class TestUserErrors:
    @pytest.mark.parametrize(
        ("content", "message"),
        [(b"", "holds no text"), (b"  \n\n\t \r\n", "holds no text"), (b"\x00\x01\n", "no valid records")],
        ids=["empty", "whitespace", "controls-only"],
    )
    def test_input_without_text_exits_2(self, stage, tmp_path, content, message):
        (tmp_path / "data.txt").write_bytes(content)

        code, _, err = stage(tmp_path / "data.txt")

        assert code == 2
        assert message in err

    def test_all_records_dropped_reports_counts(self, stage, tmp_path):
        write_jsonl(
            tmp_path / "data.jsonl", [{"text": "tiny"}, {"text": "wee"}, {"text": " \x00 "}, {"text": "x" * 50}]
        )

        code, _, err = stage(tmp_path / "data.jsonl", "min_chars=5", "max_chars=40")

        assert code == 2
        assert "no valid records after cleaning: read 4" in err
        assert "empty 1, too_short 2, too_long 1" in err

    def test_input_too_small_for_block_size(self, stage, tmp_path):
        write_jsonl(tmp_path / "data.jsonl", [{"text": "a short line"}, {"text": "another one"}])

        code, _, err = stage(tmp_path / "data.jsonl", "block_size=128")

        assert code == 2
        assert "too small for block_size=128" in err
        assert not (out_dir(tmp_path) / "manifest.json").exists()
        assert not (out_dir(tmp_path) / "dataset").exists()

    @pytest.mark.parametrize(
        ("override", "message"),
        [
            ("input_uri=/no/such/place.jsonl", "input_uri='file:///no/such/place.jsonl' does not exist"),
            ("input_uri=/no/such/*.jsonl", "input_uri='file:///no/such/*.jsonl' matches no files"),
            ("blok_size=64", "unknown config key 'blok_size'"),
            ("block_size=abc", "block_size='abc' must be an integer"),
            ("validation_fraction=1.5", "validation_fraction=1.5"),
            ("input_format=csv", "input_format='csv' is not one of"),
            ("block_size=512", "longer than base_model's context of 256"),
            ("max_chars=0", "max_chars=0"),
        ],
    )
    def test_bad_setting_exits_2_naming_it(self, stage, tmp_path, override, message):
        write_jsonl(tmp_path / "data.jsonl", [{"text": doc(i)} for i in range(10)])

        code, _, err = stage(tmp_path / "data.jsonl", override)

        assert code == 2
        assert message in err

    def test_a_hub_id_that_cannot_be_loaded_is_a_user_error(self, tmp_path, capsys):
        write_jsonl(tmp_path / "data.jsonl", [{"text": doc(i)} for i in range(4)])
        args = [f"input_uri={tmp_path / 'data.jsonl'}", "base_model=org/no-such-model", f"artifact_root={tmp_path}"]

        assert tokenize_stage.main(args) == 2  # stages run offline: no hub here

        err = capsys.readouterr().err
        assert "base_model='org/no-such-model' is read as a Hugging Face hub model id" in err
        assert "URI of a saved model folder" in err and "Traceback" not in err

    def test_missing_base_model_folder(self, stage, tmp_path):
        write_jsonl(tmp_path / "data.jsonl", [{"text": doc(i)} for i in range(10)])

        code, _, err = stage(tmp_path / "data.jsonl", f"base_model={tmp_path / 'nowhere'}")

        assert code == 2
        assert "base_model=" in err

    def test_required_inputs(self, tmp_path, capsys):
        assert tokenize_stage.main([f"artifact_root={tmp_path}", "base_model=x"]) == 2
        assert "input_uri is required" in capsys.readouterr().err
        assert tokenize_stage.main([f"artifact_root={tmp_path}", f"input_uri={tmp_path}"]) == 2
        assert "base_model is required" in capsys.readouterr().err


class TestContract:
    def test_field_names(self):
        own = [f.name for f in dataclasses.fields(TokenizeConfig)][2:]  # after artifact_root, run_id
        assert own == [
            "input_uri", "base_model", "input_format", "text_field", "text_unit", "normalization", "min_chars",
            "max_chars", "block_size", "validation_fraction", "seed", "max_bad_fraction", "batch_size", "task",
            "chat_template", "messages_field", "prompt_field", "completion_field", "train_on", "packing", "truncation",
            "num_shards", "shard_index", "merge",
        ]  # fmt: skip

    def test_inputs_are_uris_or_hub_ids(self, tmp_path):
        config = build_config(TokenizeConfig, {"input_uri": str(tmp_path), "base_model": "./models/base"})
        assert tokenize_stage.inputs(config) == {  # the tokenizer's files count, not the weights
            "input_uri": f"file://{tmp_path}",
            "base_model": manifest.Input(f"file://{os.path.abspath('models/base')}", models.WEIGHT_FILES),
        }
        config = build_config(TokenizeConfig, {"input_uri": "s3://bucket/data/*.jsonl", "base_model": "org/model"})
        assert tokenize_stage.inputs(config) == {"input_uri": "s3://bucket/data/*.jsonl", "base_model": "org/model"}

    def test_batch_size_does_not_change_the_cache_key(self):
        assert "batch_size" in TokenizeConfig.OPERATIONAL

    def test_rerun_is_a_cache_hit_that_changes_no_file(self, stage, tmp_path):
        write_jsonl(tmp_path / "data.jsonl", [{"text": doc(i)} for i in range(30)])
        code, first, _ = stage(tmp_path / "data.jsonl", "block_size=32")
        assert code == 0 and first["cache_hit"] is False
        before = file_hashes(out_dir(tmp_path))

        code, second, _ = stage(tmp_path / "data.jsonl", "block_size=32", "batch_size=7")

        assert code == 0 and second["cache_hit"] is True
        assert second["metrics"] == first["metrics"]
        assert file_hashes(out_dir(tmp_path)) == before

    def test_a_failure_after_writing_outputs_leaves_nothing_committed(self, stage, tmp_path, monkeypatch):
        write_jsonl(tmp_path / "data.jsonl", [{"text": doc(i)} for i in range(30)])

        def fail_upload(*args):
            assert (out_dir(tmp_path) / "dataset" / "dataset_dict.json").exists()  # the dataset was written
            raise OSError("disk full")

        monkeypatch.setattr(tokenize_stage.store, "upload_file", fail_upload)
        with pytest.raises(OSError, match="disk full"):
            stage(tmp_path / "data.jsonl", "block_size=32")

        assert not [p for p in out_dir(tmp_path).rglob("*") if p.is_file()]

    def test_real_process_user_error_exits_2_without_traceback(self, tmp_path, tokenizer_model):
        write_jsonl(tmp_path / "data.jsonl", ["{broken", *({"text": doc(i)} for i in range(5))])
        common = [f"input_uri={tmp_path / 'data.jsonl'}", f"base_model={tokenizer_model}", f"artifact_root={tmp_path}"]

        proc = run_stage_cli("tokenize", *common, check=False)

        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert "data.jsonl line 1" in proc.stderr
        assert not (tmp_path / "runs" / "dev" / "tokenize" / "manifest.json").exists()

    def test_real_process_success_prints_the_result_line(self, tmp_path, tokenizer_model):
        write_jsonl(tmp_path / "data.jsonl", [{"text": doc(i)} for i in range(30)])
        common = [f"input_uri={tmp_path / 'data.jsonl'}", f"base_model={tokenizer_model}", f"artifact_root={tmp_path}"]

        proc = run_stage_cli("tokenize", *common, "block_size=32")

        (line,) = proc.stdout.strip().splitlines()  # logs go to stderr; stdout is the one result line
        result = json.loads(line)
        assert result["stage"] == "tokenize" and result["cache_hit"] is False
        assert result["metrics"]["train_blocks"] > 0


@pytest.mark.integration
def test_first_folio_with_the_tiny_base_model(tmp_path, folio_corpus, tiny_base_model):
    """The real chain: base_model's committed output feeds tokenize, on real First Folio text."""
    proc = run_stage_cli(
        "tokenize", f"input_uri={folio_corpus}/*.txt", f"base_model={tiny_base_model}", f"artifact_root={tmp_path}"
    )
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]
    assert metrics["train_blocks"] > 1000 and metrics["validation_blocks"] > 50
    assert metrics["dropped_duplicate"] > 0  # stage directions such as "Exeunt." repeat
    dataset = datasets.load_from_disk(str(tmp_path / "runs" / "dev" / "tokenize" / "dataset"))
    assert dataset["train"].features["input_ids"].length == 128


class TestShards:
    """N shard tasks plus a merge write what one task writes: the same bytes of dataset and held-out documents."""

    @staticmethod
    def mixed_input(folder: Path) -> Path:
        """A big JSONL (a bad line, invalid UTF-8, duplicates far apart), a Parquet of many row groups, text."""
        folder.mkdir()
        rows: list = [{"text": doc(i)} for i in range(400)]
        rows[37] = '{"text": "unterminated'
        rows[90] = {"text": doc(3)}  # a duplicate of an earlier record, in another shard than it
        rows[380] = {"text": doc(200)}
        write_jsonl(folder / "a.jsonl", rows)
        with (folder / "a.jsonl").open("ab") as fh:
            fh.write(b'{"text": "bad \xff byte ' + doc(1000).encode() + b'"}\n')
        texts = [doc(i) for i in range(300, 520)]  # 300..399 repeat the JSONL's
        pq.write_table(pa.table({"text": texts}), folder / "b.parquet", row_group_size=16)
        (folder / "c.txt").write_text("\n\n".join(doc(i, 12) for i in range(1000, 1060)) + "\n")
        (folder / "d.txt").write_text("\n".join(doc(i, 8) for i in range(2000, 2100)) + "\n")
        return folder

    @pytest.mark.parametrize(("text_unit", "shards"), [("paragraph", 3), ("line", 5)])
    def test_shards_then_merge_equal_one_task(self, stage, tmp_path, text_unit, shards):
        data = self.mixed_input(tmp_path / "data")
        common = [f"text_unit={text_unit}", "block_size=32", "max_bad_fraction=0.05"]
        code, single, err = stage(data, "run_id=one", *common)
        assert code == 0, err
        sizes = []
        for i in range(shards):
            code, result, err = stage(data, "run_id=many", *common, f"num_shards={shards}", f"shard_index={i}")
            assert code == 0, err
            sizes.append(result["metrics"]["docs"])
        assert all(sizes) and sum(sizes) > single["metrics"]["records_kept"]  # some duplicates span shards
        code, merged, err = stage(data, "run_id=many", *common, f"num_shards={shards}", "merge=true")
        assert code == 0, err

        assert file_hashes_only(out_dir(tmp_path, "many")) == file_hashes_only(out_dir(tmp_path, "one"))
        differs = {"tokens_per_second", "shards", "peak_rss_mib"}
        assert {k: v for k, v in merged["metrics"].items() if k not in differs} == {
            k: v for k, v in single["metrics"].items() if k not in differs
        }
        # rows 90 and 380, and the Parquet's 300..399 but 380 (replaced in the JSONL)
        assert single["metrics"]["dropped_duplicate"] == 2 + 99 and single["metrics"]["dropped_bad_json"] == 1

    def test_a_merge_refuses_missing_shards_and_shards_made_with_other_settings(self, stage, tmp_path):
        data = self.mixed_input(tmp_path / "data")
        assert stage(data, "run_id=s", "num_shards=2", "shard_index=0")[0] == 0
        code, _, err = stage(data, "run_id=s", "num_shards=2", "merge=true")
        assert code == 2 and "1 of 2 tokenize shard(s) are not committed" in err
        assert stage(data, "run_id=s", "num_shards=2", "shard_index=1", "min_chars=5")[0] == 0
        code, _, err = stage(data, "run_id=s", "num_shards=2", "merge=true")
        assert code == 2 and "shard-00001-of-00002 was tokenized with other settings (min_chars=5)" in err
        code, _, err = stage(data, "run_id=x", "num_shards=2", "task=sft")
        assert code == 2 and "task=sft tokenizes in one task" in err


class TestEncoder:
    """Documents joined with end-of-text encode as each alone does, or the encoder encodes them one by one."""

    DOCS = (
        "Hello, world!",
        "1 23 456 7890",
        "Ünïcödé — «quotes» and ﬁne print",
        "x",
        f"a document that holds the end-of-text text {EOS} itself",
        "tabs\tand  spaces",
        "<|endoftext",
        "|>",
        "line one\nline two",
        *(doc(i, words=i % 50) for i in range(300)),
    )

    def encode(self, tokenizer, docs: tuple[str, ...], joined: bool, batch_size: int = 64):
        encoder = tokenize_stage.Encoder(tokenizer, batch_size)
        if not joined:
            encoder.separator = None
        try:
            encoder.add(list(docs))
            return encoder.finish()
        finally:
            encoder.close()

    @pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
    def test_joined_encoding_equals_one_document_at_a_time(self, tokenizer_model, batch_size):
        tokenizer = load_tokenizer(tokenizer_model.removeprefix("file://"))
        assert tokenize_stage.Encoder(tokenizer, 1).separator == EOS
        ids, lengths = self.encode(tokenizer, self.DOCS, joined=True, batch_size=batch_size)
        one_ids, one_lengths = self.encode(tokenizer, self.DOCS, joined=False, batch_size=batch_size)
        assert np.array_equal(lengths, one_lengths) and np.array_equal(ids, one_ids)
        expected = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in self.DOCS]
        assert lengths.tolist() == [len(e) for e in expected]
        assert ids.tolist() == [i for e in expected for i in e]

    def test_tokenizers_where_joining_would_change_tokens_are_not_joined(self, tokenizer_model):
        from tokenizers import AddedToken, pre_tokenizers

        def backend():
            tokenizer = load_tokenizer(tokenizer_model.removeprefix("file://"))
            return tokenizer, tokenizer.backend_tokenizer

        tokenizer, plain = backend()
        assert tokenize_stage.joinable_separator(plain, EOS, tokenizer.eos_token_id) == EOS
        _, first = backend()
        first.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="first")])
        _, overlapping = backend()
        overlapping.add_tokens([AddedToken("end<|endof", normalized=False)])
        _, special_text = backend()
        special_text.encode_special_tokens = True
        for backend_tokenizer in (first, overlapping, special_text):
            assert tokenize_stage.joinable_separator(backend_tokenizer, EOS, tokenizer.eos_token_id) is None
        assert tokenize_stage.joinable_separator(plain, "<|im_end|>", tokenizer.eos_token_id) is None


def file_hashes_only(folder: Path) -> dict[str, str]:
    """Content hashes of a stage output's data files (its manifest records when and how: not compared)."""
    return {k: h for k, (h, _) in file_hashes(folder).items() if k != "manifest.json"}
