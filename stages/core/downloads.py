"""Local copies of stage inputs, checked against the manifest that committed them.

    with downloads.local_copy("s3://bucket/genai/runs/r1/base_model/model") as path:
        model = AutoModelForCausalLM.from_pretrained(path)

Inside a committed stage output the files to fetch come from its manifest (read by name, never a
listing) and each one is checked against the hash the manifest committed; anything else is listed and
fetched as it is. This sits above both: the store moves files, the manifest knows which files a
committed output holds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.core import manifest, store, uris
from stages.core.errors import StoreError


@contextmanager
def local_copy(uri: str, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local path holding the folder or file at ``uri``: the path itself on local disk, else a download
    of its files but those that match ``skip`` (see :class:`stages.core.manifest.Input`).

    Inside a committed stage output the files to fetch come from its manifest (no listing) and each
    is checked against the manifest's hash; anything else is listed and fetched as it is.
    """
    if uris.is_local(uri):
        yield uris.local_path(uri)
        return
    expected = manifest.committed_files(uri)
    with tempfile.TemporaryDirectory(prefix="stage-in-") as tmp:
        target = Path(tmp) / uri.rstrip("/").rsplit("/", 1)[-1]
        if expected is not None:
            kept = {rel: digest for rel, digest in expected.items() if not manifest.skipped(rel, skip)}
            _download_committed(uri, target, kept)
        elif skip:
            listed = [store.relative(uri, f) for f in store.expand(uri)]
            store.download_named(uri, [rel for rel in listed if not manifest.skipped(rel, skip)], target)
        else:
            store.download_tree(uri, target)
        yield target


def _download_committed(uri: str, target: Path, expected: dict[str, str]) -> None:
    local = store.download_named(uri, list(expected), target)
    for (rel, digest), file in zip(expected.items(), local, strict=True):
        if not file.is_file() or store.file_sha256(file) != digest:
            raise StoreError(
                f"{uris.join(uri, rel) if rel else uri} does not match the hash its manifest committed: "
                "the object was changed or removed after the commit"
            )
