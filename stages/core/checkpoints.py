"""Training checkpoints in the artifact store that survive spot preemption.

    <stage output>/checkpoints/step-00000120/{adapter_model.safetensors, optimizer.pt, ..., COMPLETE.json}

A checkpoint is uploaded file by file, then ``COMPLETE.json`` (every file's sha256) last, as one
object. A checkpoint without it, or whose files no longer match it (a truncated upload, a corrupted
object), is skipped in favour of the previous one: a partial checkpoint is never used. Object stores
make each file appear whole or not at all (multipart, resumable and block uploads are invisible until
finished), and the hashes catch whatever else. Files are streamed both ways, never held in memory.

The listing of ``step-*`` folders only proposes candidates; what makes one usable is its marker, read
by name, and the hashes of the files it names. A listing that lags behind only means resuming from an
older complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from stages.core import store, uris

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
_NAME = re.compile(r"step-(\d{8})")


def save(local_dir: Path, checkpoints_uri: str, step: int, fingerprint: str) -> str:
    """Upload a local checkpoint folder as ``step-<step>``; the completion marker goes last."""
    uri = uris.join(checkpoints_uri, f"step-{step:08d}")
    _remove(uri)  # leftovers of an attempt that died mid-upload
    files = {p.name: store.file_sha256(p) for p in sorted(local_dir.iterdir()) if p.is_file()}
    for name in files:
        store.upload_file(local_dir / name, uris.join(uri, name))
    marker = {"step": step, "fingerprint": fingerprint, "files": files}
    store.write_text(uris.join(uri, MARKER), json.dumps(marker, indent=2))
    return uri


def newest_complete(checkpoints_uri: str, fingerprint: str, download_to: Path) -> tuple[int, Path] | None:
    """Download the newest checkpoint that is complete, intact and made for this run's config."""
    steps = sorted(
        (int(m.group(1)) for d in store.list_dirs(checkpoints_uri) if (m := _NAME.fullmatch(d))), reverse=True
    )
    for step in steps:
        uri = uris.join(checkpoints_uri, f"step-{step:08d}")
        try:
            marker = json.loads(store.read_text(uris.join(uri, MARKER)))
        except FileNotFoundError:
            log.warning("checkpoint %s has no %s (interrupted upload); skipping it", uri, MARKER)
            continue
        except ValueError:
            log.warning("checkpoint %s has an unreadable %s; skipping it", uri, MARKER)
            continue
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict) or not marker["files"]:
            log.warning("checkpoint %s has a %s without a file list; skipping it", uri, MARKER)
            continue
        if marker.get("fingerprint") != fingerprint:
            log.warning("checkpoint %s was made for other inputs or config; skipping it", uri)
            continue
        target = download_to / f"step-{step:08d}"
        target.mkdir(parents=True, exist_ok=True)
        intact = True
        for name, digest in marker["files"].items():
            if "/" in name or name.startswith("."):
                intact = False
                break
            local = target / name
            try:
                store.download_file(uris.join(uri, name), local)
            except FileNotFoundError:
                intact = False
                break
            if store.file_sha256(local) != digest:
                intact = False
                break
        if intact:
            return step, target
        log.warning("checkpoint %s is corrupt (a file is missing or does not match its hash); skipping it", uri)
    return None


def prune(checkpoints_uri: str, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; delete older ones."""
    steps = sorted(int(m.group(1)) for d in store.list_dirs(checkpoints_uri) if (m := _NAME.fullmatch(d)))
    for step in steps[:-keep] if keep > 0 else steps:
        _remove(uris.join(checkpoints_uri, f"step-{step:08d}"))


def _remove(uri: str) -> None:
    """Delete one checkpoint, its marker first: a delete cut short never leaves a marker beside missing files."""
    store.remove(uris.join(uri, MARKER))
    store.remove(uri)
