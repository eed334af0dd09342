"""An artifact store that fails a share of its reads and writes: bounded retries, then a clear error,
and never a committed manifest over missing or partial outputs.

The store here is fsspec's in-memory filesystem wrapped by :class:`FlakyFileSystem`, which fails a
seeded fraction of requests with a dropped connection, either before the request reaches the store
or after it was carried out (the answer is lost). ``tests/storage`` does the same against real S3, GCS
and Azure emulators through a fault proxy; this tier is the fast, in-process version for every run.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from stages import tokenize as tokenize_stage
from stages.core import uris
from tests.test_tokenize import doc, tokenizer_model, write_jsonl

pytestmark = pytest.mark.faults
__all__ = ["tokenizer_model"]  # the fixture, imported for use here

ATTEMPTS = 6


class FlakyFileSystem(MemoryFileSystem):
    """The memory filesystem, failing a seeded share of reads and writes (per request kind)."""

    protocol = "memory"
    read_failure = write_failure = 0.0
    lose_answers = False  # a failed write was carried out; only its answer is lost
    only = ""  # fail only requests for paths ending with this
    rng = random.Random(0)
    injected = 0

    @classmethod
    def configure(cls, read=0.0, write=0.0, lose=False, only="", seed=0) -> None:
        cls.read_failure, cls.write_failure, cls.lose_answers, cls.only = read, write, lose, only
        cls.rng, cls.injected = random.Random(seed), 0

    def _fails(self, kind: str, path: str) -> bool:
        share = self.read_failure if kind == "read" else self.write_failure
        if share and str(path).endswith(self.only) and type(self).rng.random() < share:
            type(self).injected += 1
            return True
        return False

    def _write(self, path, do):
        if not self._fails("write", path):
            return do()
        if self.lose_answers:
            do()
        raise ConnectionResetError(f"connection reset while writing {path}")

    def _read(self, path, do):
        if self._fails("read", path):
            raise ConnectionResetError(f"connection reset while reading {path}")
        return do()

    def pipe_file(self, path, value, *args, **kwargs):
        return self._write(path, lambda: super(FlakyFileSystem, self).pipe_file(path, value, *args, **kwargs))

    def _open(self, path, mode="rb", *args, **kwargs):
        opener = lambda: super(FlakyFileSystem, self)._open(path, mode, *args, **kwargs)  # noqa: E731
        return self._read(path, opener) if "r" in mode else self._write(path, opener)

    def rm(self, path, *args, **kwargs):
        return self._write(path, lambda: super(FlakyFileSystem, self).rm(path, *args, **kwargs))

    def cp_file(self, path1, path2, **kwargs):
        return self._write(path2, lambda: super(FlakyFileSystem, self).cp_file(path1, path2, **kwargs))

    def cat_file(self, path, *args, **kwargs):
        return self._read(path, lambda: super(FlakyFileSystem, self).cat_file(path, *args, **kwargs))

    def info(self, path, **kwargs):
        return self._read(path, lambda: super(FlakyFileSystem, self).info(path, **kwargs))

    def ls(self, path, detail=True, **kwargs):
        return self._read(path, lambda: super(FlakyFileSystem, self).ls(path, detail=detail, **kwargs))


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.setattr(uris, "VOLATILE_SCHEMES", ())  # memory:// stands in for a bucket here
    monkeypatch.setenv("STAGE_STORE_ATTEMPTS", str(ATTEMPTS))
    monkeypatch.setenv("STAGE_STORE_BACKOFF_S", "0")
    fsspec.register_implementation("memory", FlakyFileSystem, clobber=True)
    FlakyFileSystem.configure()
    yield FlakyFileSystem
    FlakyFileSystem.configure()
    fsspec.register_implementation("memory", MemoryFileSystem, clobber=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("store-faults") / "docs.jsonl", [{"text": doc(i)} for i in range(60)])


def healthy_objects(root: str, *parts: str) -> dict[str, str]:
    """Every object under root/parts, read past the fault injection: relative path -> sha256."""
    fs = MemoryFileSystem()
    prefix = "/".join([root.removeprefix("memory://"), *parts]).strip("/")
    if not fs.exists(prefix):
        return {}
    return {
        p.removeprefix("/").removeprefix(prefix + "/"): hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in fs.find(prefix)
    }


SCENARIOS = {
    # id: (read share, write share, lose answers, only paths ending with, expected exit code)
    "20%-of-reads-and-writes-fail": (0.2, 0.2, False, "", 0),
    "30%-of-write-answers-lost": (0.0, 0.3, True, "", 0),
    "manifest-write-answer-lost": (0.0, 1.0, True, "manifest.json", None),
    "store-down-for-writes": (0.0, 1.0, False, "", 1),
    "store-down-for-reads": (1.0, 0.0, False, "", 1),
    "manifest-write-always-fails": (0.0, 1.0, False, "manifest.json", 1),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_flaky_store_gives_a_clean_commit_or_a_clean_error_and_never_a_false_manifest(
    flaky, corpus, tokenizer_model, capsys, tally, scenario
):
    read, write, lose, only, expected = SCENARIOS[scenario]
    root = f"memory://faults-{uuid.uuid4().hex[:8]}"
    args = [f"input_uri={corpus}", f"base_model={tokenizer_model}", f"artifact_root={root}", "block_size=32"]
    assert tokenize_stage.main([*args, "run_id=clean"]) == 0
    reference = healthy_objects(root, "runs/clean/tokenize")
    capsys.readouterr()

    flaky.configure(read=read, write=write, lose=lose, only=only, seed=7)
    code = tokenize_stage.main([*args, "run_id=faulty"])
    err = capsys.readouterr().err
    injected = flaky.injected
    flaky.configure()
    objects = healthy_objects(root, "runs/faulty/tokenize")
    committed = (
        json.loads(MemoryFileSystem().cat_file(f"{root[9:]}/runs/faulty/tokenize/manifest.json"))
        if ("manifest.json" in objects)
        else None
    )
    data_lost = 0 if committed is None else sum(objects.get(rel) != h for rel, h in committed["outputs"].items())

    # Healed, a rerun commits (or finds the commit) and holds exactly what a run that never met a fault holds.
    assert tokenize_stage.main([*args, "run_id=faulty"]) == 0, capsys.readouterr().err
    healed = healthy_objects(root, "runs/faulty/tokenize")
    data_lost += sum(healed.get(rel) != h for rel, h in reference.items() if rel != "manifest.json")
    clean_error = code == 0 or ("error: tokenize: could not" in err and "Traceback" not in err)
    survived = clean_error and (expected is None or code == expected) and (code == 0) == (committed is not None)
    tally.fault("artifact store fails requests", survived=survived, data_lost=data_lost)

    assert injected > 0, "no fault was injected"
    if expected is not None:
        assert code == expected, err[-3000:]
    if code != 0:
        assert f"after {ATTEMPTS} attempts" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert committed is None, "a failed stage left a manifest"
    assert data_lost == 0
