"""The artifact store: every stage input and output is a URI, read and written through fsspec.

``file://`` works out of the box; ``s3://``, ``gs://`` and ``abfs://`` need the optional extras
(``pip install 'genai-pipelines[s3]'`` and so on). Credentials and endpoints come only from the
environment the platform gives the pod (workload identity, IRSA / Pod Identity, or the standard
variables: ``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS`` / ``STORAGE_EMULATOR_HOST``,
``AZURE_STORAGE_*``), never from config: a URI that carries a password or a signature is refused,
so the resolved config that every stage logs and saves cannot hold one.

Object stores have no atomic rename, so the commit protocol never relies on one: a stage writes its
outputs, then ``manifest.json`` last as a single object. A single-object write is atomic on every
store; on local disk it is a temp file plus ``os.replace``. The store remembers the hash of every
object this process wrote, so the manifest lists a stage's outputs without trusting a fresh listing,
and readers (``local_copy``) fetch exactly the files a manifest names and check their hashes.

Transient failures (throttling, 5xx, dropped connections) are retried twice over: each cloud client
retries single requests with its own backoff, then the store retries the whole operation
(``STAGE_STORE_ATTEMPTS``, default 4, backoff from ``STAGE_STORE_BACKOFF_S``, default 1 s, x4, at
most 30 s) and finally raises :class:`StoreError` naming the URI. ``STAGE_STORE_CLIENT_RETRIES``
sets how often every client retries one request (unset: each client's default policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
import types
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

# gcsfs >= 2026 probes every bucket for zonal / hierarchical layouts over gRPC; the stages need none of
# that, and against an emulator (or without a route to the gRPC endpoint) each probe stalls for a minute.
# Set it before gcsfs is imported (fsspec imports it on the first gs:// URI); "true" turns it back on.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec

from stages.core.errors import UserError

log = logging.getLogger(__name__)
# Azure's SDK logs every request and its headers at INFO; the stages log at INFO.
logging.getLogger("azure").setLevel(logging.WARNING)


class _WithoutTraceback(logging.Filter):
    """Keep a storage library's line about a failed request, drop its stack trace: the store retries
    the operation and, when it keeps failing, reports it in one line that names the URI."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True


for _library in ("gcsfs", "s3fs", "adlfs.spec"):  # the loggers these libraries log their retries on
    logging.getLogger(_library).addFilter(_WithoutTraceback())

ALLOWED_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "az", "memory")
RETRIES = 4  # default of STAGE_STORE_ATTEMPTS
CHUNK = 8 << 20  # streaming block: memory per open stream stays at this, whatever the file size
T = TypeVar("T")

# Environment variables whose values are secrets: never in a message we write.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "FSSPEC_S3_SECRET",
    "FSSPEC_S3_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
)
# Query parameters that make a URL a credential (presigned S3 URLs, Azure SAS, GCS signed URLs).
SIGNED_QUERY = frozenset(
    """
    sig x-amz-signature x-amz-credential x-amz-security-token x-goog-signature x-goog-credential
    signature token access_token key secret
    """.split()  # noqa: SIM905
)


class StoreError(RuntimeError):
    """The store kept failing after bounded retries (transient infrastructure, worth a task retry)."""


def normalize_uri(uri: str, field: str = "uri") -> str:
    """A plain path becomes an absolute ``file://`` URI; unknown schemes and embedded credentials are rejected."""
    if not uri:
        raise UserError(f"{field} is empty; give a URI such as file:///data/x or s3://bucket/x")
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return "file://" + os.path.abspath(uri)
    if scheme not in ALLOWED_SCHEMES:
        raise UserError(f"{field}={redact(uri)!r} uses scheme {scheme!r}; allowed: {', '.join(ALLOWED_SCHEMES)}")
    if _has_credentials(uri):
        raise UserError(
            f"{field}={redact(uri)!r} carries credentials; URIs are logged and saved with every run, so "
            "credentials must come from the environment (workload identity or the cloud's standard variables)"
        )
    return uri


def _has_credentials(uri: str) -> bool:
    parts = urlsplit(uri)
    if ":" in parts.netloc.rpartition("@")[0]:  # user:password@ (a bare user@, as in abfs container@account, is fine)
        return True
    return any(key.lower() in SIGNED_QUERY for key, _ in parse_qsl(parts.query, keep_blank_values=True))


def redact(text: str) -> str:
    """``text`` without URL passwords, URL signatures and the values of the credential variables."""
    text = re.sub(r"(\w+://)[^/\s:@'\"]+:[^/\s@'\"]+@", r"\1***@", text)
    text = re.sub(
        r"(?i)([?&](?:sig|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
        r"x-goog-credential|signature|access_token)=)[^&\s'\"]+",
        r"\1***",
        text,
    )
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        for secret in [value, *re.findall(r"(?:AccountKey|SharedAccessSignature)=([^;]+)", value)]:
            if len(secret) >= 8:
                text = text.replace(secret, "***")
    return text


def is_uri(name: str) -> bool:
    """A URI or a local path, as opposed to a hub id such as ``org/model``."""
    return "://" in name or name.startswith(("/", "."))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(uri, **_client_options(uri.partition("://")[0]))
    except ImportError as exc:
        raise UserError(f"{uri!r} needs an optional filesystem package: {exc}") from None
    _tune_client_retries(fs)
    return fs, path


def _client_retries() -> int | None:
    try:
        return max(0, int(os.environ["STAGE_STORE_CLIENT_RETRIES"]))
    except (KeyError, ValueError):
        return None  # unset (or unreadable): each client keeps its own policy


def _client_options(scheme: str) -> dict[str, Any]:
    retries = _client_retries()
    if scheme == "s3" and retries is not None:
        # botocore's "standard" mode retries throttling, 5xx and connection errors with jittered backoff.
        # Explicit options replace fsspec's configured ones (FSSPEC_S3=...) whole, so those are kept here.
        config_kwargs = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs") or {})
        config_kwargs["retries"] = {"mode": "standard", "max_attempts": retries + 1}
        return {"config_kwargs": config_kwargs}
    return {}


def _tune_client_retries(fs: fsspec.AbstractFileSystem) -> None:
    """Make every client retry one request ``STAGE_STORE_CLIENT_RETRIES`` times (when it is set)."""
    retries = _client_retries()
    if retries is None or getattr(fs, "_stage_client_retries", None) == retries:
        return
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols:
        fs.retries = 1  # botocore retries each request (max_attempts above); no second loop in s3fs
    if "gs" in protocols:
        # gcsfs fixes 6 tries (sleeping 1, 2, 4, 8, 16 s) when its class is defined; rewrap this instance's
        # request methods with the wanted count.
        from gcsfs.retry import retry_request

        for name in ("_request", "_get_file_request", "_get_file_concurrent"):
            inner = getattr(getattr(type(fs), name, None), "__wrapped__", None)
            if inner is not None:
                setattr(fs, name, types.MethodType(retry_request(retries=retries + 1)(inner), fs))
    if "abfs" in protocols:
        # azure-storage-blob defaults to 3 retries after 15 s, 18 s and 24 s; adlfs passes no retry
        # settings through, so the policy object the client's pipeline holds is adjusted in place.
        policy = getattr(getattr(getattr(fs, "service_client", None), "_config", None), "retry_policy", None)
        if policy is not None:
            policy.total_retries = policy.connect_retries = policy.read_retries = policy.status_retries = retries
            policy.initial_backoff, policy.increment_base, policy.random_jitter_range = 1, 2, 1
    fs._stage_client_retries = retries


# ---------------------------------------------------------------------------------------------
# What a failure means: the fs libraries raise their own exception types (botocore, aiohttp, azure,
# gcsfs), wrapped in OSError or not, so the store classifies them by type name and status code.

_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# botocore (connection-level), aiohttp, azure-core, google-auth, requests, urllib3, fsspec
_TRANSIENT_TYPES = frozenset(
    """
    EndpointConnectionError ConnectionClosedError ReadTimeoutError ConnectTimeoutError HTTPClientError
    ProxyConnectionError ResponseStreamingError IncompleteReadError ServerDisconnectedError
    ClientConnectionError ClientConnectorError ClientOSError ClientPayloadError ServerTimeoutError
    ServiceRequestError ServiceResponseError ServiceRequestTimeoutError ServiceResponseTimeoutError
    IncompleteRead TransportError ChecksumError FSTimeoutError ProxyError ChunkedEncodingError
    ConnectionError ConnectTimeout ReadTimeout RemoteDisconnected ResponseParserError
    """.split()  # noqa: SIM905
)
_THROTTLE_CODES = frozenset(
    """
    SlowDown Throttling ThrottlingException RequestLimitExceeded ServerBusy RequestTimeout
    InternalError ServiceUnavailable OperationTimedOut TooManyRequestsException rateLimitExceeded
    backendError
    """.split()  # noqa: SIM905
)
# s3fs turns a 503 into OSError(EBUSY) and a 500 into OSError(EREMOTEIO); the rest are the sockets'.
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE}
_DENIED_STATUS = {401, 403}
_DENIED_CODES = frozenset(
    """
    AccessDenied InvalidAccessKeyId SignatureDoesNotMatch ExpiredToken AuthenticationFailed
    AuthorizationFailure AuthorizationPermissionMismatch InsufficientAccountPermissions forbidden
    """.split()  # noqa: SIM905
)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    for attr in ("status_code", "status", "code"):  # azure-core, aiohttp, gcsfs HttpError
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return str(getattr(exc, "error_code", "") or getattr(exc, "reason", "") or "")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify(exc: BaseException) -> str:
    """One of "missing", "exists", "denied", "unsupported", "transient" or "permanent"."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return "missing"
    if isinstance(exc, FileExistsError):
        return "exists"
    if isinstance(exc, PermissionError):
        return "denied"
    for err in _chain(exc):
        status, code, name = _status(err), _error_code(err), type(err).__name__
        if status == 404 or name in ("ResourceNotFoundError", "NoSuchKey"):
            return "missing"
        if status in _DENIED_STATUS or code in _DENIED_CODES or name == "ClientAuthenticationError":
            return "denied"
        if isinstance(err, OSError) and str(err).startswith("Forbidden"):  # gcsfs's 403
            return "denied"
        if status == 501 or code == "NotImplemented":  # e.g. a conditional write an S3-compatible store lacks
            return "unsupported"
        if status in _TRANSIENT_STATUS or code in _THROTTLE_CODES or name in _TRANSIENT_TYPES:
            return "transient"
        if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return "transient"
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return "transient"
    return "permanent"


_STORAGE_MODULES = frozenset(
    """
    botocore aiobotocore s3fs aiohttp azure adlfs gcsfs google requests urllib3 fsspec
    """.split()  # noqa: SIM905
)


def _from_storage(exc: BaseException) -> bool:
    return any(
        isinstance(err, OSError) or type(err).__module__.split(".")[0] in _STORAGE_MODULES for err in _chain(exc)
    )


def _describe(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__)


def _attempts() -> int:
    try:
        return max(1, int(os.environ.get("STAGE_STORE_ATTEMPTS", RETRIES)))
    except ValueError:
        return RETRIES


def _backoff() -> float:
    try:
        return max(0.0, float(os.environ.get("STAGE_STORE_BACKOFF_S", 1.0)))
    except ValueError:
        return 1.0


def _retry(what: str, uri: str, fn: Callable[[], T]) -> T:
    """Run fn, retrying transient errors with bounded exponential backoff; other errors pass through.

    Missing and already-existing objects keep their built-in types (callers branch on them); a
    permission problem becomes a UserError; the rest becomes a StoreError that names the URI. Library
    messages are redacted and the library exception is not chained, so no credential reaches a log.
    """
    attempts, delay = _attempts(), _backoff()
    # Errors are raised after the except block: the library's exception (unredacted text) is not
    # chained to ours, while whatever the caller was already handling stays visible in the traceback.
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError):
            raise
        except Exception as exc:
            kind = classify(exc)
            if kind == "exists" or (kind == "permanent" and not _from_storage(exc)):
                raise  # an existing object callers branch on, or a bug rather than the store
            failure = _describe(exc)
        if kind == "missing":
            raise FileNotFoundError(f"{redact(uri)} does not exist ({failure})")
        if kind == "unsupported":
            raise NotImplementedError(f"the store cannot {what} {redact(uri)!r} this way: {failure}")
        if kind == "denied":
            raise UserError(
                f"permission denied to {what} {redact(uri)!r}: check the artifact root and the credentials "
                f"in the environment ({failure})"
            )
        if kind == "permanent":
            raise StoreError(f"could not {what} {redact(uri)!r}: {failure}")
        if attempt == attempts:
            raise StoreError(
                f"could not {what} {redact(uri)!r} after {attempts} attempts (the store kept failing): {failure}"
            )
        log.warning("%s %s failed (%s); retrying in %.1fs", what, redact(uri), failure, delay)
        time.sleep(delay)
        delay = min(delay * 4, 30.0)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# What this process wrote: URI -> sha256. The manifest takes a stage's outputs from here, not from a
# listing made right after the writes, and does not download them again to hash them.
_written: dict[str, str | None] = {}  # None: written by a server-side copy, hash not known here


def written_under(uri: str) -> dict[str, str | None]:
    """Files this process wrote under the folder ``uri``: relative path -> sha256 (None if not known)."""
    prefix = uri.rstrip("/") + "/"
    return {u[len(prefix) :]: digest for u, digest in _written.items() if u.startswith(prefix)}


def _forget(uri: str) -> None:
    prefix = uri.rstrip("/") + "/"
    for u in [u for u in _written if u == uri or u.startswith(prefix)]:
        del _written[u]


def file_sha256(path: Path) -> str:
    """Content hash of a local file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return _retry("check", uri, lambda: fs.exists(path))


def isdir(uri: str) -> bool:
    fs, path = _fs(uri)
    return _retry("check", uri, lambda: fs.isdir(path))


def read_bytes(uri: str) -> bytes:
    """A whole (small) object in memory: manifests, markers, configs. Large files go through open_file/download."""
    fs, path = _fs(uri)
    return _retry("read", uri, lambda: fs.cat_file(path))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes, create_only: bool = False) -> None:
    """Write one object atomically: readers see the old object, no object, or all of the new one.

    With ``create_only`` the write fails with FileExistsError when the object exists (S3 If-None-Match,
    GCS ifGenerationMatch=0, Azure If-None-Match, a hard link on local disk), unless it already holds
    exactly ``data`` (a retried write whose first answer was lost).
    """
    fs, path = _fs(uri)
    digest = hashlib.sha256(data).hexdigest()
    if is_local(uri):
        target = local_path(uri)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise UserError(f"cannot write {uri!r}: permission denied") from None
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(data)
            if create_only:
                os.link(tmp, target)  # fails if target exists: the atomic create-if-absent of POSIX
            else:
                os.replace(tmp, target)
        except PermissionError:
            raise UserError(f"cannot write {uri!r}: permission denied") from None
        except FileExistsError:
            if target.read_bytes() != data:
                raise
        finally:
            tmp.unlink(missing_ok=True)
        _written[uri] = digest
        return
    if create_only:
        try:
            _retry("write", uri, lambda: fs.pipe_file(path, data, mode="create"))
        except FileExistsError:
            if read_bytes(uri) != data:
                raise
        except NotImplementedError as exc:  # an S3-compatible store without If-None-Match on PUT
            log.warning("%s; writing it without the create-only condition", exc)
            _retry("write", uri, lambda: fs.pipe_file(path, data))
    else:
        _retry("write", uri, lambda: fs.pipe_file(path, data))
    _written[uri] = digest


def write_text(uri: str, text: str, create_only: bool = False) -> None:
    write_bytes(uri, text.encode("utf-8"), create_only=create_only)


def remove(uri: str) -> None:
    """Remove a file or a whole folder; missing is fine."""
    _forget(uri)
    fs, path = _fs(uri)
    if not _retry("check", uri, lambda: fs.exists(path)):
        return
    # FileNotFoundError: gone between the check and the delete (or a retried delete that had succeeded)
    with contextlib.suppress(FileNotFoundError):
        _retry("remove", uri, lambda: fs.rm(path, recursive=True))


def list_files(uri: str) -> list[str]:
    """Paths of all files under a folder, relative to it, sorted."""
    fs, path = _fs(uri)
    if not _retry("list", uri, lambda: fs.exists(path)):
        return []
    found = _retry("list", uri, lambda: fs.find(path))
    root = path.rstrip("/") + "/"
    return sorted(p[len(root) :] for p in found if p.startswith(root))


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-folders of a folder, sorted."""
    fs, path = _fs(uri)
    if not _retry("list", uri, lambda: fs.exists(path)):
        return []
    entries = _retry("list", uri, lambda: fs.ls(path, detail=True))
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def expand(uri: str) -> list[str]:
    """A file, every file under a folder, or every match of a glob; as full URIs, sorted."""
    fs, path = _fs(uri)
    if any(c in path for c in "*?["):
        matches = _retry("list", uri, lambda: fs.glob(path))
        files = [m for m in matches if not _retry("check", uri, lambda m=m: fs.isdir(m))]
    elif _retry("check", uri, lambda: fs.isdir(path)):
        files = _retry("list", uri, lambda: fs.find(path))
    elif _retry("check", uri, lambda: fs.exists(path)):
        files = [path]
    else:
        raise FileNotFoundError(uri)
    names = [f for f in files if not f.rsplit("/", 1)[-1].startswith(".")]
    return sorted(_rebase(uri, path, f) for f in names)


def _rebase(uri: str, path: str, found: str) -> str:
    """The URI of ``found``, a path the filesystem listed for ``uri`` (whose own path is ``path``), spelled
    like ``uri``: ``abfs://container@account.dfs.core.windows.net/x`` keeps the account that the
    filesystem's paths (``container/x/...``) leave out."""
    scheme = uri.split("://", 1)[0]
    if path.startswith("/"):  # local-like filesystems list absolute paths
        return f"{scheme}://{found}"
    base, rest = uri.rstrip("/"), path.rstrip("/").partition("/")[2]
    if not rest:
        return f"{base}/{found.partition('/')[2]}"
    if base.endswith("/" + rest):
        return base[: len(base) - len(rest)] + found.partition("/")[2]
    return f"{scheme}://{found}"


def sha256(uri: str) -> str:
    """Content hash of one file, streamed in fixed-size range reads (never the whole file in memory)."""
    if is_local(uri):
        return _retry("read", uri, lambda: file_sha256(local_path(uri)))
    if _written.get(uri):
        return _written[uri]  # type: ignore[return-value]
    fs, path = _fs(uri)

    def digest() -> str:
        h = hashlib.sha256()
        with fs.open(path, "rb", block_size=CHUNK, cache_type="none") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    return _retry("read", uri, digest)


def open_file(uri: str, mode: str = "rb") -> Any:
    """A file object for streaming; opening (which checks the object) is retried, reads rely on the client's retries.

    Read-mode files from object stores come wrapped in ``io.BufferedReader``, so that they offer the
    whole ``io`` API that a local file does (``readlines(hint)``, ``peek``, ``read1``...): stage code
    that works on local disk works on every store. Memory stays at one buffer of CHUNK bytes.
    """
    fs, path = _fs(uri)
    if "r" not in mode:
        return fs.open(path, mode)
    if is_local(uri):
        return _retry("open", uri, lambda: fs.open(path, mode))
    raw = _retry("open", uri, lambda: fs.open(path, "rb", block_size=CHUNK, cache_type="none"))
    buffered = io.BufferedReader(raw, buffer_size=CHUNK)
    return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding="utf-8")


def download_file(uri: str, local_file: Path) -> None:
    """Stream one object to a local file (the client writes it to disk block by block)."""
    local_file.parent.mkdir(parents=True, exist_ok=True)
    if is_local(uri):
        _retry("read", uri, lambda: shutil.copyfile(local_path(uri), local_file))
        return
    fs, path = _fs(uri)
    _retry("download", uri, lambda: fs.get_file(path, str(local_file)))


def copy_file(src_uri: str, dst_uri: str) -> None:
    """Copy one object without holding it in memory: server-side within a store, else streamed through a temp file."""
    if is_local(src_uri):
        upload_file(local_path(src_uri), dst_uri)
        return
    src_fs, src = _fs(src_uri)
    dst_fs, dst = _fs(dst_uri)
    if src_fs is dst_fs:
        _retry("copy", f"{src_uri} to {dst_uri}", lambda: dst_fs.copy(src, dst))
        _written[dst_uri] = _written.get(src_uri)
        return
    with tempfile.TemporaryDirectory(prefix="stage-copy-") as tmp:
        local = Path(tmp) / "object"
        download_file(src_uri, local)
        upload_file(local, dst_uri)


def upload_dir(local_dir: Path, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (which may already hold other files)."""
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        _upload(file, join(uri, file.relative_to(local_dir).as_posix()))


def upload_file(local_file: Path, uri: str) -> None:
    """Upload one local file; the clients stream it (multipart / resumable / block uploads for big files)."""
    _upload(local_file, uri)


def _upload(local_file: Path, uri: str) -> None:
    digest = file_sha256(local_file)
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_file, target)
    else:
        fs, path = _fs(uri)
        _retry("upload", uri, lambda: fs.put_file(str(local_file), path))
    _written[uri] = digest


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the folder or file at ``uri``: the path itself on local disk, else a download.

    Inside a committed stage output the files to fetch come from its manifest (no listing) and each
    is checked against the manifest's hash; anything else is listed and fetched as it is.
    """
    if is_local(uri):
        yield local_path(uri)
        return
    from stages.core import manifest  # the commit protocol knows which files a committed output holds

    fs, path = _fs(uri)
    expected = manifest.committed_files(uri)
    with tempfile.TemporaryDirectory(prefix="stage-in-") as tmp:
        target = Path(tmp) / path.rstrip("/").rsplit("/", 1)[-1]
        if expected is None:
            _retry("download", uri, lambda: fs.get(path, str(target), recursive=True))
        else:
            _download_committed(uri, target, expected)
        yield target


def _download_committed(uri: str, target: Path, expected: dict[str, str]) -> None:
    fs, path = _fs(uri)
    if list(expected) == [""]:  # uri is one committed file
        remote, local = [path], [target]
    else:
        remote = [f"{path.rstrip('/')}/{rel}" for rel in expected]
        local = [target / rel for rel in expected]
    for file in local:
        file.parent.mkdir(parents=True, exist_ok=True)
    _retry("download", uri, lambda: fs.get(remote, [str(p) for p in local]))
    for (rel, digest), file in zip(expected.items(), local, strict=True):
        if not file.is_file() or file_sha256(file) != digest:
            raise StoreError(
                f"{join(uri, rel) if rel else uri} does not match the hash its manifest committed: "
                "the object was changed or removed after the commit"
            )
