"""The commit marker: ``manifest.json`` is written last, and a stage output without one does not exist.

A manifest records what went in (URIs with content hashes), how (the resolved config and the code
version), what came out (every output file with its hash), the metrics and the timings. Its
``cache_key`` hashes inputs + config + code version: a stage that finds a committed manifest with the
same key does no work.

Readers never need a listing to know what a stage produced: ``manifest.json`` is read by name, it
names every output with its hash, and :func:`committed_files` hands that list to downloads, which
check each file against it. Object stores have no rename, so the manifest is written once, last, as a
single create-only object: a second attempt that finishes later cannot overwrite the first one's.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from stages import __version__
from stages.core import store, uris
from stages.core.errors import UserError
from stages.core.layout import CHECKPOINTS, MANIFEST

log = logging.getLogger(__name__)
# How far above a URI to look for the manifest of the stage output that holds it (dataset/, model/, ...).
MAX_DEPTH_IN_OUTPUT = 3
# Working state that lives beside the outputs but is not one of them.
NOT_OUTPUTS = (CHECKPOINTS + "/", ".")
_CORE = Path(__file__).resolve().parent  # stages/core: the library every stage runs
_PACKAGE = _CORE.parent  # stages/


def code_version(stage_file: str) -> dict[str, str]:
    """The package version plus a hash of the code a stage runs: the package's ``__init__``, the stage's
    own module and every module of ``stages/core``.

    That is all a stage can run of ours, by construction: a stage imports the shared library and never
    another stage (tests/test_layering.py), so changing one stage does not invalidate another's cache,
    while a change to the library invalidates every stage's.
    """
    stage = Path(stage_file).resolve()
    h = hashlib.sha256()
    for path in [_PACKAGE / "__init__.py", stage, *sorted(_CORE.rglob("*.py"))]:
        name = path.relative_to(_PACKAGE).as_posix() if path.is_relative_to(_PACKAGE) else path.name
        h.update(name.encode())
        h.update(path.read_bytes())
    version = {"package": __version__, "source_sha256": h.hexdigest()}
    if os.environ.get("STAGE_IMAGE"):
        version["image"] = os.environ["STAGE_IMAGE"]
    return version


class Input(NamedTuple):
    """An input of which a stage reads only some files: ``skip`` holds patterns (``fnmatch``) of the paths,
    relative to ``uri``, that are neither part of its identity nor fetched (a model's weights, for a stage
    that reads only its tokenizer)."""

    uri: str
    skip: tuple[str, ...] = ()


def skipped(relative: str, skip: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in skip)


def hash_input(uri: str, field: str = "uri", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Content identity of one input: a committed stage output (or a folder or file inside one), a folder
    or glob of files, or one file; files that match ``skip`` (see :class:`Input`) are left out, and the
    record says so (``without``): its hash is not the content hash of the whole input.

    A committed stage output is identified by its manifest's output hashes, so downstream stages
    never re-read gigabytes to hash them, and never list it. Anything else is listed by
    :func:`stages.core.store.expand`: a URI that names no file is :class:`~stages.core.errors.InputNotFound`
    naming ``field``.
    """
    partial = {"without": list(skip)} if skip else {}
    covering = None if uris.is_glob(uri) else _covering_manifest(uri)
    if covering is not None:
        committed, sub = covering
        if not sub and not skip:
            return {"uri": uri, "sha256": committed["outputs_sha256"], "committed_by": committed["stage"]}
        files = {rel: digest for rel, digest in _files_below(committed, sub).items() if not skipped(rel, skip)}
        if files:
            digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
            return {"uri": uri, "sha256": digest, "committed_by": committed["stage"], "files": len(files), **partial}
    files = [f for f in store.expand(uri, field) if not skipped(store.relative(uri, f), skip)]
    h = hashlib.sha256()
    for file in files:  # adapters record their base model's identity: its form never changes
        h.update(file.removeprefix(uri).encode())
        h.update(store.sha256(file).encode())
    return {"uri": uri, "sha256": h.hexdigest(), "files": len(files), **partial}


def committed_files(uri: str) -> dict[str, str] | None:
    """The files at ``uri`` as a committed manifest lists them (path relative to ``uri`` -> sha256).

    ``uri`` is a committed stage output or a folder or file inside one (a file maps to the key "").
    None when no committed manifest covers it: then only a listing can tell what is there.
    """
    covering = None if uris.is_glob(uri) else _covering_manifest(uri)
    if covering is None:
        return None
    committed, sub = covering
    return _files_below(committed, sub) or None


def _covering_manifest(uri: str) -> tuple[dict[str, Any], str] | None:
    """The committed manifest of ``uri`` or of the stage output up to MAX_DEPTH_IN_OUTPUT levels above it."""
    scheme, _, path = uri.partition("://")
    parts = path.rstrip("/").split("/")
    for up in range(min(MAX_DEPTH_IN_OUTPUT, len(parts) - 2) + 1):
        base = "/".join(parts[: len(parts) - up])
        committed = read(f"{scheme}://{base}")
        if committed is not None:
            return committed, "/".join(parts[len(parts) - up :])
    return None


def _files_below(committed: dict[str, Any], sub: str) -> dict[str, str]:
    outputs = committed.get("outputs", {})
    if not sub:
        return dict(outputs)
    if sub in outputs:
        return {"": outputs[sub]}
    prefix = sub + "/"
    return {rel[len(prefix) :]: digest for rel, digest in outputs.items() if rel.startswith(prefix)}


def cache_key(stage: str, config: dict[str, Any], inputs: dict[str, Any], code: dict[str, str]) -> str:
    identity = {
        "stage": stage,
        "config": config,
        "inputs": {k: v["sha256"] for k, v in inputs.items()},
        "code": code["source_sha256"],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read(out_uri: str) -> dict[str, Any] | None:
    """The committed manifest of a stage output, or None when it is not committed."""
    uri = uris.join(out_uri, MANIFEST)
    try:
        manifest = json.loads(store.read_text(uri))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # unreadable: treated as not committed
    return manifest if isinstance(manifest, dict) and "outputs_sha256" in manifest else None


def output_files(out_uri: str) -> list[str]:
    """What a listing shows under a stage output, less the manifest and working state."""
    return [f for f in store.list_files(out_uri) if _is_output(f)]


def _is_output(rel: str) -> bool:
    return rel != MANIFEST and not rel.startswith(NOT_OUTPUTS) and "/." not in rel


def commit(out_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every output, then write the manifest: the last write of the stage.

    The outputs are what this process wrote (hashed as they were uploaded, so nothing is read back)
    plus whatever a listing shows; a listing that lags behind the writes cannot drop an output.
    """
    written = {rel: digest for rel, digest in store.written_under(out_uri).items() if _is_output(rel)}
    listed = set(output_files(out_uri))
    outputs = {}
    for rel in sorted(listed | set(written)):
        uri = uris.join(out_uri, rel)
        digest = written.get(rel)
        try:
            if digest is None:
                digest = store.sha256(uri)
            elif rel not in listed and not store.exists(uri):
                continue  # written here, then removed again
        except FileNotFoundError:
            continue  # listed, but already gone
        outputs[rel] = digest
    manifest = {
        **manifest,
        "outputs": outputs,
        "outputs_sha256": hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest(),
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    try:
        store.write_text(uris.join(out_uri, MANIFEST), text, create_only=True)
    except FileExistsError:
        existing = read(out_uri)
        if existing is not None and existing.get("cache_key") == manifest.get("cache_key"):
            log.warning("%s was committed by another attempt with the same cache key meanwhile; keeping it", out_uri)
            return existing
        raise UserError(
            f"{out_uri} was committed by another attempt while this one ran; its manifest is kept "
            "(use a new run_id, or delete the output to recompute)"
        ) from None
    return manifest
