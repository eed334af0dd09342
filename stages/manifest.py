"""The commit marker: ``manifest.json`` is written last, and a stage output without one does not exist.

A manifest records what went in (URIs with content hashes), how (the resolved config and the code
version), what came out (every output file with its hash), the metrics and the timings. Its
``cache_key`` hashes inputs + config + code version: a stage that finds a committed manifest with the
same key does no work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from stages import __version__, store

MANIFEST = "manifest.json"
# Working state that lives beside the outputs but is not one of them.
NOT_OUTPUTS = ("checkpoints/", ".")


def code_version(stage_file: str) -> dict[str, str]:
    """The package version plus a hash of the code a stage runs: its own module and the shared library.

    Other stages' modules (files with a ``__main__`` block) are left out, so that changing one stage
    does not invalidate every other stage's cache.
    """
    h = hashlib.sha256()
    stage = Path(stage_file).resolve()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        source = path.read_bytes()
        if path.resolve() != stage and b'if __name__ == "__main__":' in source:
            continue
        h.update(path.name.encode())
        h.update(source)
    version = {"package": __version__, "source_sha256": h.hexdigest()}
    if os.environ.get("STAGE_IMAGE"):
        version["image"] = os.environ["STAGE_IMAGE"]
    return version


def hash_input(uri: str) -> dict[str, Any]:
    """Content identity of one input: a committed stage output, a folder or glob of files, or one file.

    A committed stage output is identified by its manifest's output hashes, so downstream stages
    never re-read gigabytes to hash them.
    """
    committed = read(uri) if store.isdir(uri) else None
    if committed is not None:
        return {"uri": uri, "sha256": committed["outputs_sha256"], "committed_by": committed["stage"]}
    files = store.expand(uri)
    h = hashlib.sha256()
    for file in files:
        h.update(file.removeprefix(uri).encode())
        h.update(store.sha256(file).encode())
    return {"uri": uri, "sha256": h.hexdigest(), "files": len(files)}


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
    uri = store.join(out_uri, MANIFEST)
    try:
        manifest = json.loads(store.read_text(uri))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # unreadable: treated as not committed
    return manifest if isinstance(manifest, dict) and "outputs_sha256" in manifest else None


def output_files(out_uri: str) -> list[str]:
    return [f for f in store.list_files(out_uri) if f != MANIFEST and not f.startswith(NOT_OUTPUTS) and "/." not in f]


def commit(out_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every output, then write the manifest: the last write of the stage."""
    outputs = {rel: store.sha256(store.join(out_uri, rel)) for rel in output_files(out_uri)}
    manifest = {
        **manifest,
        "outputs": outputs,
        "outputs_sha256": hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest(),
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_text(store.join(out_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
