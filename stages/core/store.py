"""The artifact store: every stage input and output is a URI, read and written through fsspec.

``file://`` works out of the box; ``s3://``, ``gs://`` and ``abfs://`` need the optional extras
(``pip install 'genai-pipelines[s3]'`` and so on). Which URIs are allowed and how secrets are kept
out of messages: :mod:`stages.core.uris`; which failures are retried, and how often:
:mod:`stages.core.retries`.

Object stores have no atomic rename, so the commit protocol never relies on one: a stage writes its
outputs, then ``manifest.json`` last as a single object. A single-object write is atomic on every
store; on local disk it is a temp file plus ``os.replace``. The store remembers the hash of every
object this process wrote, so the manifest lists a stage's outputs without trusting a fresh listing.
The store knows nothing of manifests: reading a committed output by its manifest, with each file
checked against the committed hash, is :func:`stages.core.downloads.local_copy`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

# gcsfs >= 2026 probes every bucket for zonal / hierarchical layouts over gRPC; the stages need none of
# that, and against an emulator (or without a route to the gRPC endpoint) each probe stalls for a minute.
# Set it before gcsfs is imported (fsspec imports it on the first gs:// URI); "true" turns it back on.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec

from stages.core.errors import InputNotFound, UserError, shown
from stages.core.retries import client_options, tune_client_retries, with_retries
from stages.core.uris import is_glob, is_local, join, local_path

log = logging.getLogger(__name__)
# Azure's SDK logs every request and its headers at INFO; the stages log at INFO.
logging.getLogger("azure").setLevel(logging.WARNING)
CHUNK = 8 << 20  # streaming block: memory per open stream stays at this, whatever the file size


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(uri, **client_options(uri.partition("://")[0]))
    except ImportError as exc:
        raise UserError(f"{uri!r} needs an optional filesystem package: {exc}") from None
    tune_client_retries(fs)
    return fs, path


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
    return with_retries("check", uri, lambda: fs.exists(path))


def read_bytes(uri: str) -> bytes:
    """A whole (small) object in memory: manifests, markers, configs. Large files go through open_file/download."""
    fs, path = _fs(uri)
    return with_retries("read", uri, lambda: fs.cat_file(path))


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
            with_retries("write", uri, lambda: fs.pipe_file(path, data, mode="create"))
        except FileExistsError:
            if read_bytes(uri) != data:
                raise
        except NotImplementedError as exc:  # an S3-compatible store without If-None-Match on PUT
            log.warning("%s; writing it without the create-only condition", exc)
            with_retries("write", uri, lambda: fs.pipe_file(path, data))
    else:
        with_retries("write", uri, lambda: fs.pipe_file(path, data))
    _written[uri] = digest


def write_text(uri: str, text: str, create_only: bool = False) -> None:
    write_bytes(uri, text.encode("utf-8"), create_only=create_only)


def remove(uri: str) -> None:
    """Remove a file or a whole folder; missing is fine."""
    _forget(uri)
    fs, path = _fs(uri)
    if not with_retries("check", uri, lambda: fs.exists(path)):
        return
    # FileNotFoundError: gone between the check and the delete (or a retried delete that had succeeded)
    with contextlib.suppress(FileNotFoundError):
        with_retries("remove", uri, lambda: fs.rm(path, recursive=True))


def list_files(uri: str) -> list[str]:
    """Paths of all files under a folder, relative to it, sorted."""
    fs, path = _fs(uri)
    if not with_retries("list", uri, lambda: fs.exists(path)):
        return []
    found = with_retries("list", uri, lambda: fs.find(path))
    root = path.rstrip("/") + "/"
    return sorted(p[len(root) :] for p in found if p.startswith(root))


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-folders of a folder, sorted."""
    fs, path = _fs(uri)
    if not with_retries("list", uri, lambda: fs.exists(path)):
        return []
    entries = with_retries("list", uri, lambda: fs.ls(path, detail=True))
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def expand(uri: str, field: str = "uri") -> list[str]:
    """The files an input URI names, as full URIs, sorted: the file itself, every file under a folder (at
    any depth) or every file a glob matches; listed files whose names start with "." are left out.

    A URI that names no file (nothing there, or a folder or glob without files) is :class:`InputNotFound`
    naming ``field``. Not fsspec's ``expand_path``: that also returns folders, and the files inside the
    folders a glob matches.
    """
    if is_local(uri) and not is_glob(uri):
        return _expand_local(uri, field)
    fs, path = _fs(uri)
    if is_glob(uri):
        matches = with_retries("list", uri, lambda: fs.glob(path, detail=True))  # types come with the listing
        listed = [m for m, info in matches.items() if info.get("type") != "directory"]
    elif with_retries("check", uri, lambda: fs.isdir(path)):
        listed = with_retries("list", uri, lambda: fs.find(path))
    elif with_retries("check", uri, lambda: fs.exists(path)):
        return [uri]
    else:
        raise InputNotFound(f"{field}={uri!r} does not exist")
    files = [f for f in listed if not f.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise InputNotFound(f"{field}={uri!r} {'matches' if is_glob(uri) else 'holds'} no files")
    return sorted(_rebase(uri, path, f) for f in files)


def _expand_local(uri: str, field: str) -> list[str]:
    """:func:`expand` for a local file or folder. Symbolic links are followed, to files and to folders
    (fsspec lists a link to a folder as a file, which then cannot be read), each folder listed once
    (a link back up does not loop); links that lead nowhere are skipped and counted."""
    top = local_path(uri)
    try:
        top.stat()
    except FileNotFoundError:
        target = f" (a symbolic link to {os.readlink(top)}, which does not exist)" if top.is_symlink() else ""
        raise InputNotFound(f"{field}={uri!r} does not exist{target}") from None
    except OSError as exc:  # a link loop, a name too long for the file system, no permission
        raise UserError(f"{field}={shown(uri)} cannot be read: {exc.strerror}") from None
    if not top.is_dir():
        return [uri]
    files, dead, listed = [], 0, set()
    for folder, subfolders, names in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in listed:
            subfolders.clear()
            continue
        listed.add(real)
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith("."):
                continue
            if os.path.exists(path):  # follows links: False for a dangling or looping one
                files.append(path)
            else:
                dead += 1
    if dead:
        log.warning("%s: skipped %d symbolic link(s) that lead to no file", uri, dead)
    if not files:
        only = f" but {dead} symbolic link(s) that lead to no file" if dead else ""
        raise InputNotFound(f"{field}={uri!r} holds no files{only}")
    return sorted(f"file://{path}" for path in files)


def relative(uri: str, found: str) -> str:
    """The path of ``found``, a URI that :func:`expand` gave for ``uri``, relative to ``uri`` (a file that
    ``uri`` names itself is ""; a file a glob matches keeps its whole path)."""
    base = uri.partition("://")[2].strip("/")
    return found.partition("://")[2].lstrip("/").removeprefix(base).lstrip("/")


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


def size(uri: str) -> int:
    """Bytes of one file."""
    if is_local(uri):
        return local_path(uri).stat().st_size
    fs, path = _fs(uri)
    return int(with_retries("stat", uri, lambda: fs.size(path)))


def sha256(uri: str) -> str:
    """Content hash of one file, streamed in fixed-size range reads (never the whole file in memory)."""
    if is_local(uri):
        return with_retries("read", uri, lambda: file_sha256(local_path(uri)))
    if _written.get(uri):
        return _written[uri]  # type: ignore[return-value]
    fs, path = _fs(uri)

    def digest() -> str:
        h = hashlib.sha256()
        with fs.open(path, "rb", block_size=CHUNK, cache_type="none") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    return with_retries("read", uri, digest)


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
        return with_retries("open", uri, lambda: fs.open(path, mode))
    raw = with_retries("open", uri, lambda: fs.open(path, "rb", block_size=CHUNK, cache_type="none"))
    buffered = io.BufferedReader(raw, buffer_size=CHUNK)
    return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding="utf-8")


def download_file(uri: str, local_file: Path) -> None:
    """Stream one object to a local file (the client writes it to disk block by block)."""
    local_file.parent.mkdir(parents=True, exist_ok=True)
    if is_local(uri):
        with_retries("read", uri, lambda: shutil.copyfile(local_path(uri), local_file))
        return
    fs, path = _fs(uri)
    with_retries("download", uri, lambda: fs.get_file(path, str(local_file)))


def copy_file(src_uri: str, dst_uri: str) -> None:
    """Copy one object without holding it in memory: server-side within a store, else streamed through a temp file."""
    if is_local(src_uri):
        upload_file(local_path(src_uri), dst_uri)
        return
    src_fs, src = _fs(src_uri)
    dst_fs, dst = _fs(dst_uri)
    if src_fs is dst_fs:
        with_retries("copy", f"{src_uri} to {dst_uri}", lambda: dst_fs.copy(src, dst))
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
        with_retries("upload", uri, lambda: fs.put_file(str(local_file), path))
    _written[uri] = digest


def download_tree(uri: str, target: Path) -> None:
    """Fetch the file or folder at ``uri`` to ``target``, as a listing shows it."""
    fs, path = _fs(uri)
    with_retries("download", uri, lambda: fs.get(path, str(target), recursive=True))


def download_named(uri: str, names: list[str], target: Path) -> list[Path]:
    """Fetch the named files under the folder ``uri`` (paths relative to it) into ``target``, in one
    batch and without a listing; ``[""]`` names ``uri`` itself, one file, fetched to ``target``.

    Returns the local path of each name, in order.
    """
    fs, path = _fs(uri)
    if names == [""]:
        remote, local = [path], [target]
    else:
        remote = [f"{path.rstrip('/')}/{rel}" for rel in names]
        local = [target / rel for rel in names]
    for file in local:
        file.parent.mkdir(parents=True, exist_ok=True)
    with_retries("download", uri, lambda: fs.get(remote, [str(p) for p in local]))
    return local
