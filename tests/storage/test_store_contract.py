"""The artifact store's object-store rules, checked without a server: how failures are classified and
retried, what never reaches a message, create-only writes, and manifests that replace listings.

    .venv/bin/python -m pytest tests/storage/test_store_contract.py

``memory://`` stands in for an object store where a real one is not needed: like S3 it is not local
disk, so downloads, verification and streaming go the object-store way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import uuid

import pytest

from stages.core import checkpoints, downloads, manifest, models, retries, store, uris
from stages.core.errors import StoreError, UserError

pytestmark = pytest.mark.storage


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("STAGE_STORE_ATTEMPTS", "3")
    monkeypatch.setenv("STAGE_STORE_BACKOFF_S", "0")


@pytest.fixture
def mem() -> str:
    return f"memory://bucket-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/data",
        "abfs://container/data?sv=2024-01-01&sig=c2lnbmF0dXJl",
        "s3://bucket/x?X-Amz-Signature=abc&X-Amz-Credential=AKIA",
        "gs://bucket/x?X-Goog-Signature=abc",
    ],
)
def test_a_uri_that_carries_credentials_is_refused_without_echoing_them(uri):
    with pytest.raises(UserError, match="carries credentials") as exc:
        uris.normalize_uri(uri, "artifact_root")
    for secret in ("wJalrXUtnFEMI", "c2lnbmF0dXJl", "=abc"):
        assert secret not in str(exc.value)


def test_uris_that_name_an_account_are_fine():
    uri = "abfs://container@account.dfs.core.windows.net/genai"
    assert uris.normalize_uri(uri) == uri


def test_redact_hides_credential_variables_url_passwords_and_signatures(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=a;AccountKey=a2V5LWtleS1rZXk=;")
    text = (
        "failed with s3cr3t-value-123 at http://minio:pa55word@minio:9000/b and "
        "https://a.blob.core.windows.net/c?sv=1&sig=SIGNATURE123 key a2V5LWtleS1rZXk="
    )
    clean = uris.redact(text)
    for secret in ("s3cr3t-value-123", "pa55word", "SIGNATURE123", "a2V5LWtleS1rZXk="):
        assert secret not in clean
    assert "http://***@minio:9000/b" in clean


def _classifications():
    """(exception, expected kind) pairs as each library raises them, for the libraries installed."""
    cases = [
        (FileNotFoundError("x"), "missing"),
        (FileExistsError("x"), "exists"),
        (PermissionError("x"), "denied"),
        (OSError(errno.EBUSY, "Service Unavailable"), "transient"),  # s3fs's translation of a 503
        (ConnectionResetError(), "transient"),
        (TimeoutError(), "transient"),
        (ValueError("a bug"), "permanent"),
    ]
    try:
        from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

        def client_error(code: str, status: int) -> ClientError:
            response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
            return ClientError(response, "PutObject")

        cases += [
            (client_error("SlowDown", 503), "transient"),
            (client_error("InternalError", 500), "transient"),
            (client_error("AccessDenied", 403), "denied"),
            (client_error("NoSuchKey", 404), "missing"),
            (client_error("InvalidArgument", 400), "permanent"),
            (client_error("NotImplemented", 501), "unsupported"),
            (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "transient"),
            (ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), "transient"),
        ]
    except ImportError:
        pass
    try:
        import aiohttp

        cases += [(aiohttp.ServerDisconnectedError(), "transient"), (aiohttp.ClientPayloadError("cut"), "transient")]
    except ImportError:
        pass
    try:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError

        busy = HttpResponseError(message="busy")
        busy.status_code = 503
        denied = HttpResponseError(message="no")
        denied.status_code = 403
        cases += [
            (ServiceRequestError("Server disconnected"), "transient"),
            (busy, "transient"),
            (denied, "denied"),
            (ResourceNotFoundError("gone"), "missing"),
        ]
    except ImportError:
        pass
    try:
        from gcsfs.retry import HttpError

        cases += [
            (HttpError({"code": 503, "message": "backendError"}), "transient"),
            (HttpError({"code": 429, "message": "rateLimitExceeded"}), "transient"),
            (HttpError({"code": 403, "message": "forbidden"}), "denied"),
            (HttpError({"code": 400, "message": "bad"}), "permanent"),
            (OSError("Forbidden: b/o\nno access"), "denied"),  # gcsfs's 403 on some calls
        ]
    except ImportError:
        pass
    return cases


@pytest.mark.parametrize(
    ("exc", "kind"), _classifications(), ids=lambda v: type(v).__name__ if not isinstance(v, str) else v
)
def test_library_errors_are_classified_as_the_libraries_raise_them(exc, kind):
    assert retries.classify(exc) == kind


def test_a_wrapped_transient_error_is_still_transient():
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert retries.classify(outer) == "transient"


def test_transient_failures_are_retried_then_succeed(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("dropped")
        return "ok"

    assert retries.with_retries("read", "s3://bucket/key", flaky) == "ok"
    assert len(calls) == 3
    assert "read s3://bucket/key failed" in caplog.text


def test_a_store_that_keeps_failing_gives_a_clear_error_naming_the_uri_without_the_library_chain(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value")

    def down():
        raise OSError(errno.EBUSY, "Service Unavailable (key planted-secret-value)")

    with pytest.raises(StoreError) as exc:
        retries.with_retries("upload", "s3://bucket/runs/x/out.bin", down)
    message = str(exc.value)
    assert "could not upload 's3://bucket/runs/x/out.bin' after 3 attempts" in message
    assert "planted-secret-value" not in message
    assert exc.value.__cause__ is None and exc.value.__context__ is None


def test_permission_problems_are_the_users_and_bugs_keep_their_type():
    def denied():
        raise PermissionError("403 AccessDenied")

    with pytest.raises(UserError, match="permission denied to write 's3://bucket/x'"):
        retries.with_retries("write", "s3://bucket/x", denied)

    def bug():
        raise TypeError("not the store's fault")

    with pytest.raises(TypeError):
        retries.with_retries("write", "s3://bucket/x", bug)


def test_create_only_write_refuses_a_different_object_and_accepts_the_same_one(tmp_path, mem):
    for root in (f"file://{tmp_path}", mem):
        uri = uris.join(root, "runs/r/s/manifest.json")
        store.write_bytes(uri, b"first", create_only=True)
        store.write_bytes(uri, b"first", create_only=True)  # a retried write whose answer was lost
        with pytest.raises(FileExistsError):
            store.write_bytes(uri, b"second", create_only=True)
        assert store.read_bytes(uri) == b"first"
    assert sorted(p.name for p in (tmp_path / "runs/r/s").iterdir()) == ["manifest.json"]


def test_a_store_without_conditional_writes_still_gets_its_manifest(mem, monkeypatch, caplog):
    botocore = pytest.importorskip("botocore.exceptions")
    fs, _ = store._fs(mem)
    plain_pipe = type(fs).pipe_file

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if mode == "create":
            response = {"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}}
            raise botocore.ClientError(response, "PutObject")
        return plain_pipe(self, path, value, **kwargs)

    monkeypatch.setattr(type(fs), "pipe_file", pipe_file)
    store.write_bytes(uris.join(mem, "runs/r/s/manifest.json"), b"{}", create_only=True)
    assert store.read_bytes(uris.join(mem, "runs/r/s/manifest.json")) == b"{}"
    assert "without the create-only condition" in caplog.text


def test_manifest_lists_what_was_written_even_when_a_listing_lags(mem, monkeypatch):
    out = uris.join(mem, "runs/r/stage")
    store.write_text(uris.join(out, "a.txt"), "alpha")
    store.write_text(uris.join(out, "sub/b.txt"), "beta")
    monkeypatch.setattr(store, "list_files", lambda uri: [])  # a store whose listing has not caught up
    committed = manifest.commit(out, {"stage": "stage", "cache_key": "k"})
    assert committed["outputs"] == {
        "a.txt": hashlib.sha256(b"alpha").hexdigest(),
        "sub/b.txt": hashlib.sha256(b"beta").hexdigest(),
    }


def test_a_second_commit_of_the_same_output_keeps_the_first(mem):
    out = uris.join(mem, "runs/r/stage")
    store.write_text(uris.join(out, "a.txt"), "alpha")
    first = manifest.commit(out, {"stage": "stage", "cache_key": "same"})
    assert manifest.commit(out, {"stage": "stage", "cache_key": "same"})["committed_at"] == first["committed_at"]
    with pytest.raises(UserError, match="committed by another attempt"):
        manifest.commit(out, {"stage": "stage", "cache_key": "different"})


def test_downloads_of_committed_outputs_follow_the_manifest_and_check_its_hashes(mem, monkeypatch):
    out = uris.join(mem, "runs/r/stage")
    store.write_text(uris.join(out, "model/config.json"), "{}")
    store.write_bytes(uris.join(out, "model/weights.bin"), b"\0" * 1000)
    manifest.commit(out, {"stage": "stage", "cache_key": "k"})
    assert manifest.committed_files(uris.join(out, "model")) == {
        "config.json": hashlib.sha256(b"{}").hexdigest(),
        "weights.bin": hashlib.sha256(b"\0" * 1000).hexdigest(),
    }
    assert manifest.hash_input(uris.join(out, "model"))["committed_by"] == "stage"

    def no_listing(*args, **kwargs):
        raise AssertionError("a committed output was listed")

    fs, _ = store._fs(out)
    monkeypatch.setattr(type(fs), "find", no_listing)
    monkeypatch.setattr(type(fs), "ls", no_listing)
    with downloads.local_copy(uris.join(out, "model")) as path:
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.bin"]
    monkeypatch.undo()

    fs.pipe_file(fs._strip_protocol(uris.join(out, "model/weights.bin")), b"tampered")
    with (
        pytest.raises(StoreError, match="does not match the hash its manifest committed"),
        downloads.local_copy(uris.join(out, "model")),
    ):
        pass


@pytest.mark.parametrize("arrives", ["committed by a stage", "as a plain folder"])
def test_a_stage_that_reads_only_the_tokenizer_neither_hashes_nor_fetches_the_weights(mem, arrives):
    names = iter(range(10))

    def saved(weights: bytes, tokenizer: str) -> str:
        """A model folder: each one committed by its own run, or one plain folder written over."""
        out = uris.join(mem, f"runs/r{next(names)}/base_model")
        folder = uris.join(out, "model") if arrives == "committed by a stage" else uris.join(mem, "models/m")
        store.write_text(uris.join(folder, "config.json"), "{}")
        store.write_text(uris.join(folder, "tokenizer.json"), tokenizer)
        store.write_bytes(uris.join(folder, "model-00001-of-00002.safetensors"), weights)
        store.write_bytes(uris.join(folder, "sub/optimizer.pt"), weights)
        if arrives == "committed by a stage":
            manifest.commit(out, {"stage": "base_model", "cache_key": out})
        return folder

    def identity(weights: bytes, tokenizer: str, skip: tuple[str, ...] = models.WEIGHT_FILES) -> str:
        return manifest.hash_input(saved(weights, tokenizer), skip=skip)["sha256"]

    model = identity(b"\0" * 1000, '{"v": 1}')
    assert identity(b"\1" * 1000, '{"v": 1}') == model  # retrained: the same tokenizer
    assert identity(b"\0" * 1000, '{"v": 2}') != model  # another tokenizer
    assert identity(b"\0" * 1000, '{"v": 1}', skip=()) != identity(b"\1" * 1000, '{"v": 1}', skip=())  # whole
    folder = saved(b"\0" * 1000, '{"v": 1}')
    assert manifest.hash_input(folder, skip=models.WEIGHT_FILES)["without"] == list(models.WEIGHT_FILES)
    with downloads.local_copy(folder, skip=models.WEIGHT_FILES) as path:
        assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
            "config.json",
            "tokenizer.json",
        ]
    with downloads.local_copy(folder) as path:
        assert len([p for p in path.rglob("*") if p.is_file()]) == 4


def test_the_identity_of_a_folder_keeps_its_form(tmp_path):
    """An adapter records its base model's identity (training_base.json), and batch_infer, evaluate and publish
    refuse it on a base whose identity differs: a change in how a folder's identity is computed would refuse
    every adapter trained before it. The form: sha256 over each file's path below the folder and its sha256."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\0")
    expected = hashlib.sha256()
    for rel, data in (("/config.json", b"{}"), ("/sub/weights.bin", b"\0")):
        expected.update(rel.encode())
        expected.update(hashlib.sha256(data).hexdigest().encode())
    assert manifest.hash_input(f"file://{tmp_path}")["sha256"] == expected.hexdigest()


def test_a_half_uploaded_checkpoint_is_never_used(mem, tmp_path):
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "adapter.safetensors").write_bytes(b"weights-1")
    (local / "state.json").write_text(json.dumps({"step": 1}))
    root = uris.join(mem, "runs/r/train_lora/checkpoints")
    checkpoints.save(local, root, 1, "fp")
    (local / "adapter.safetensors").write_bytes(b"weights-2")
    checkpoints.save(local, root, 2, "fp")
    store.remove(uris.join(root, "step-00000002", checkpoints.MARKER))  # died before the marker
    checkpoints.save(local, root, 3, "fp")
    store.write_bytes(uris.join(root, "step-00000003", "adapter.safetensors"), b"trunc")  # a corrupted object
    found = checkpoints.newest_complete(root, "fp", tmp_path / "resume")
    assert found is not None and found[0] == 1
    assert (found[1] / "adapter.safetensors").read_bytes() == b"weights-1"
    assert checkpoints.newest_complete(root, "other-config", tmp_path / "resume2") is None


def test_object_store_files_offer_the_io_api_of_local_files(mem):
    uri = uris.join(mem, "data/lines.txt")
    store.write_bytes(uri, b"".join(b"line %d\n" % i for i in range(1000)))
    with store.open_file(uri, "rb") as fh:
        first = fh.readlines(100)  # the size hint that fsspec's own files do not take
        assert first[0] == b"line 0\n" and 0 < len(first) < 1000
        assert len(first) + len(fh.readlines()) == 1000


@pytest.mark.parametrize(
    ("uri", "path", "found", "expected"),
    [
        ("abfs://c@acct.dfs.core.windows.net/genai/in", "c/genai/in", "c/genai/in/a.txt",
         "abfs://c@acct.dfs.core.windows.net/genai/in/a.txt"),
        ("abfs://c@acct.dfs.core.windows.net/genai/*.txt", "c/genai/*.txt", "c/genai/b.txt",
         "abfs://c@acct.dfs.core.windows.net/genai/b.txt"),
        ("s3://bucket", "bucket", "bucket/x/y", "s3://bucket/x/y"),
        ("gs://bucket/k/", "bucket/k", "bucket/k/z", "gs://bucket/k/z"),
        ("file:///tmp/x", "/tmp/x", "/tmp/x/a", "file:///tmp/x/a"),
    ],
)  # fmt: skip
def test_expanded_uris_keep_the_spelling_of_the_uri_given(uri, path, found, expected):
    assert store._rebase(uri, path, found) == expected


def test_an_object_store_input_expands_like_a_local_one(mem):
    for name in ("in/b.jsonl", "in/a.jsonl", "in/sub/c.jsonl", "in/.hidden.jsonl", "in/d.jsonl/x.jsonl"):
        store.write_bytes(uris.join(mem, name), b"{}\n")
    found = store.expand(uris.join(mem, "in/*.jsonl"))  # in/d.jsonl is a folder: matched, not a file
    assert [f.rsplit("/in/", 1)[1] for f in found] == ["a.jsonl", "b.jsonl"]
    assert [f.rsplit("/in/", 1)[1] for f in store.expand(uris.join(mem, "in"))] == [
        "a.jsonl", "b.jsonl", "d.jsonl/x.jsonl", "sub/c.jsonl",
    ]  # fmt: skip
    assert store.expand(uris.join(mem, "in/a.jsonl")) == [uris.join(mem, "in/a.jsonl")]
    for missing, message in (("in/*.parquet", "matches no files"), ("nope", "does not exist")):
        with pytest.raises(UserError, match=f"prompts_uri=.* {message}"):
            store.expand(uris.join(mem, missing), "prompts_uri")


def test_hashing_streams_instead_of_reading_whole_files(mem, monkeypatch):
    uri = uris.join(mem, "big.bin")
    data = b"x" * (3 * store.CHUNK + 5)
    fs, path = store._fs(uri)
    fs.pipe_file(path, data)  # written behind the store's back: no recorded hash to reuse
    monkeypatch.setattr(type(fs), "cat_file", lambda *a, **k: pytest.fail("read whole into memory"))
    assert store.sha256(uri) == hashlib.sha256(data).hexdigest()
