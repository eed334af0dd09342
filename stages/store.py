"""The artifact store: every stage input and output is a URI, read and written through fsspec.

``file://`` works out of the box; ``s3://``, ``gs://`` and ``abfs://`` need the optional extras
(``pip install 'genai-pipelines[s3]'`` and so on). Credentials come from the environment the
platform gives the pod (workload identity, IRSA, standard variables), never from config.

Object stores have no atomic rename, so the commit protocol never relies on one: a stage writes its
outputs, then ``manifest.json`` last as a single object. A single-object write is atomic on every
store; on local disk it is a temp file plus ``os.replace``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from stages.errors import UserError

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "az", "memory")
RETRIES = 4
T = TypeVar("T")


class StoreError(RuntimeError):
    """The store kept failing after bounded retries (transient infrastructure, worth a task retry)."""


def normalize_uri(uri: str, field: str = "uri") -> str:
    """A plain path becomes an absolute ``file://`` URI; unknown schemes are rejected."""
    if not uri:
        raise UserError(f"{field} is empty; give a URI such as file:///data/x or s3://bucket/x")
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return "file://" + os.path.abspath(uri)
    if scheme not in ALLOWED_SCHEMES:
        raise UserError(f"{field}={uri!r} uses scheme {scheme!r}; allowed: {', '.join(ALLOWED_SCHEMES)}")
    return uri


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
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as exc:
        raise UserError(f"{uri!r} needs an optional filesystem package: {exc}") from None
    return fs, path


def _retry(what: str, uri: str, fn: Callable[[], T]) -> T:
    """Run fn, retrying transient errors with exponential backoff; user errors pass straight through."""
    delay = 0.2
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, UserError):
            raise
        except PermissionError:
            raise UserError(
                f"permission denied to {what} {uri!r}: check the artifact root and its credentials"
            ) from None
        except (OSError, ConnectionError, TimeoutError) as exc:
            if attempt == RETRIES:
                raise StoreError(f"could not {what} {uri!r} after {RETRIES} attempts: {exc}") from exc
            log.warning("%s %s failed (%s); retrying in %.1fs", what, uri, exc, delay)
            time.sleep(delay)
            delay *= 4
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return _retry("check", uri, lambda: fs.exists(path))


def isdir(uri: str) -> bool:
    fs, path = _fs(uri)
    return _retry("check", uri, lambda: fs.isdir(path))


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    return _retry("read", uri, lambda: fs.cat_file(path))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object atomically: readers see the old object, no object, or all of the new one."""
    fs, path = _fs(uri)
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except PermissionError:
            raise UserError(f"cannot write {uri!r}: permission denied") from None
        finally:
            tmp.unlink(missing_ok=True)
        return
    _retry("write", uri, lambda: fs.pipe_file(path, data))


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def remove(uri: str) -> None:
    """Remove a file or a whole folder; missing is fine."""
    fs, path = _fs(uri)
    if not _retry("check", uri, lambda: fs.exists(path)):
        return
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
    scheme = uri.split("://", 1)[0]
    if any(c in path for c in "*?["):
        matches = _retry("list", uri, lambda: fs.glob(path))
        files = [m for m in matches if not fs.isdir(m)]
    elif _retry("check", uri, lambda: fs.isdir(path)):
        files = _retry("list", uri, lambda: fs.find(path))
    elif _retry("check", uri, lambda: fs.exists(path)):
        files = [path]
    else:
        raise FileNotFoundError(uri)
    names = [f for f in files if not f.rsplit("/", 1)[-1].startswith(".")]
    return sorted(f"{scheme}://{f}" if scheme != "file" else f"file://{f}" for f in names)


def sha256(uri: str) -> str:
    """Content hash of one file, streamed (large files are never read into memory at once)."""
    fs, path = _fs(uri)

    def digest() -> str:
        h = hashlib.sha256()
        with fs.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    return _retry("read", uri, digest)


def open_file(uri: str, mode: str = "rb") -> Any:
    fs, path = _fs(uri)
    return fs.open(path, mode)


def upload_dir(local_dir: Path, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (which may already hold other files)."""
    if is_local(uri):
        shutil.copytree(local_dir, local_path(uri), dirs_exist_ok=True)
        return
    fs, path = _fs(uri)
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        _retry("upload", f"{uri}/{rel}", lambda f=file, r=rel: fs.put_file(str(f), f"{path}/{r}"))


def upload_file(local_file: Path, uri: str) -> None:
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_file, target)
        return
    fs, path = _fs(uri)
    _retry("upload", uri, lambda: fs.put_file(str(local_file), path))


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the folder or file at ``uri``: the path itself on local disk, else a download."""
    if is_local(uri):
        yield local_path(uri)
        return
    fs, path = _fs(uri)
    with tempfile.TemporaryDirectory(prefix="stage-in-") as tmp:
        target = Path(tmp) / path.rstrip("/").rsplit("/", 1)[-1]
        _retry("download", uri, lambda: fs.get(path, str(target), recursive=True))
        yield target
