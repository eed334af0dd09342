"""The model registry in the artifact root: published versions, and aliases that move between them.

    <artifact_root>/models/<name>/<version>/                      a published version (``publish``), immutable
    <artifact_root>/models/<name>/aliases/<alias>/00000001.json   the alias's moves, one record each
    <artifact_root>/models/<name>/decisions/<version>.json        what promotion concluded about a version

An alias (``champion``) is a log of moves (``version``, ``previous``, the run and the reason), numbered
from 1; its value is its newest record. A move writes record N+1 with a create-only write (S3
If-None-Match, GCS ifGenerationMatch=0, Azure If-None-Match, O_EXCL on local disk): of two promotions
that read record N at once, exactly one writes N+1 and the other gets :class:`AliasMoved`, having
written nothing. Nothing is overwritten, so the log is the alias's whole history, rollbacks included.

Champion and challenger (``genai_finetune``): ``plan`` names the champion to ``evaluate``, which scores
it on the same held-out data as the new adapter; after ``publish``, ``promote`` moves the alias when the
new version beat it (or, for a model's first version, beat the base). A challenger that did not stays
published, with the comparison in its evaluation and a ``rejected`` decision. ``genai_promote`` moves an
alias by hand (a rollback), recorded the same way. Plain functions on fsspec, no Airflow.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec

CHAMPION = "champion"
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MANIFEST = "manifest.json"  # a stage's commit marker: a version without it is not published
_RECORD = re.compile(r"^(\d{8})\.json$")


class RegistryError(ValueError):
    """A name, alias or version that does not resolve: the user's to fix."""


class AliasMoved(RegistryError):
    """Another promotion moved the alias between this one's read and its write; nothing was written."""


@dataclass(frozen=True)
class AliasRecord:
    number: int  # the record's place in the alias's log, from 1
    version: str
    fields: dict[str, Any]


def check_alias(alias: str, field: str = "alias") -> str:
    """An alias becomes a path segment: lower-case letters, digits and dashes only."""
    if not ALIAS_PATTERN.fullmatch(alias):
        raise RegistryError(
            f"{field}={alias!r} is not an alias name: lower-case letters, digits and '-', starting with a letter"
        )
    return alias


def model_uri(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/models/{name}"


def version_uri(root: str, name: str, version: str) -> str:
    return f"{model_uri(root, name)}/{version}"


def is_published(root: str, name: str, version: str) -> bool:
    fs, path = fsspec.core.url_to_fs(f"{version_uri(root, name, version)}/{MANIFEST}")
    return fs.exists(path)


def check_published(root: str, name: str, version: str) -> None:
    if not is_published(root, name, version):
        raise RegistryError(
            f"version={version!r} of model_name={name!r} is not published "
            f"({version_uri(root, name, version)}/{MANIFEST} does not exist)"
        )


def read_alias(root: str, name: str, alias: str) -> AliasRecord | None:
    """The alias's newest record, or None when it was never set."""
    fs, folder = fsspec.core.url_to_fs(f"{model_uri(root, name)}/aliases/{alias}")
    fs.invalidate_cache(folder)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return None
    numbers = [int(m.group(1)) for n in names if (m := _RECORD.match(n))]
    if not numbers:
        return None
    number = max(numbers)
    for _ in range(20):  # on local disk a record being created can be read before its bytes are in
        try:
            fields = json.loads(fs.cat_file(f"{folder}/{number:08d}.json"))
            return AliasRecord(number, fields["version"], fields)
        except ValueError:
            time.sleep(0.05)
    raise RegistryError(f"{folder}/{number:08d}.json is not a readable alias record")


def move_alias(
    root: str, name: str, alias: str, version: str, expected: AliasRecord | None, **fields: Any
) -> AliasRecord:
    """Point ``alias`` at ``version`` if it still is where ``expected`` says (None: never set); else AliasMoved."""
    check_alias(alias)
    number = (expected.number if expected else 0) + 1
    record = {
        "alias": alias,
        "version": version,
        "previous": expected.version if expected else None,
        "moved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **fields,
    }
    fs, path = fsspec.core.url_to_fs(f"{model_uri(root, name)}/aliases/{alias}/{number:08d}.json")
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    try:
        create_only(fs, path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    except FileExistsError:
        current = read_alias(root, name, alias)
        raise AliasMoved(
            f"{name}@{alias} moved to {current.version if current else '?'} while this promotion of {version} "
            "decided; nothing was written: decide again against the new one"
        ) from None
    return AliasRecord(number, version, record)


def create_only(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a new file, or raise FileExistsError: atomic on every store, so two writers never both win."""
    if "file" in fs.protocol:  # fsspec's local create mode checks, then writes: O_EXCL is the atomic form
        with open(path, "xb") as fh:
            fh.write(data)
    else:  # conditional PUTs: S3 If-None-Match, GCS ifGenerationMatch=0, Azure If-None-Match
        fs.pipe_file(path, data, mode="create")


def write_decision(root: str, name: str, version: str, decision: dict[str, Any]) -> dict[str, Any]:
    """Record what promotion concluded about ``version`` (its newest decision)."""
    stamped = {"version": version, "decided_at": datetime.now(UTC).isoformat(timespec="seconds"), **decision}
    fs, path = fsspec.core.url_to_fs(f"{model_uri(root, name)}/decisions/{version}.json")
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, (json.dumps(stamped, indent=2, sort_keys=True) + "\n").encode())
    return stamped


def move_by_hand(root: str, name: str, version: str, alias: str, reason: str, run_id: str) -> dict[str, Any]:
    """Point ``alias`` at a published version by hand (a rollback), recorded with the reason and the run."""
    check_published(root, name, version)
    current = read_alias(root, name, alias)
    if current is not None and current.version == version:
        return {"decision": "already", "alias": alias, "version": version}
    moved = move_alias(root, name, alias, version, current, run_id=run_id, reason=reason, by="hand")
    decision = {"decision": "promoted", "alias": alias, "reason": reason, "by": "hand",
                "previous": moved.fields["previous"]}  # fmt: skip
    return write_decision(root, name, version, decision)


def resolve(root: str, name: str, version: str | None) -> str:
    """The published version a reference names: ``version`` itself, or the one ``name@alias`` points at."""
    name, _, alias = name.partition("@")
    if alias:
        if version:
            raise RegistryError(f"model_name={name}@{alias} names an alias: give no version beside it")
        record = read_alias(root, name, check_alias(alias, "model_name"))
        if record is None:
            raise RegistryError(f"model_name={name}@{alias}: model {name!r} has no {alias!r} alias yet")
        version = record.version
    if not version:
        raise RegistryError("version is required (or name an alias: model_name=<name>@champion)")
    return version


def promotion_decision(
    root: str, name: str, version: str, evaluation: dict[str, Any], run_id: str, alias: str = CHAMPION
) -> dict[str, Any]:
    """Promote ``version`` if its evaluation beat the alias's version, or the base for a first version.

    ``evaluation`` is evaluate's metrics: ``quality_gate`` (against the base) and, when ``plan`` named a
    champion, ``champion`` (``uri``, its scores, ``improvement``, ``passed``, ``reason``). Returns the
    decision, also written under ``decisions/``: ``promoted``, ``already``, ``rejected`` (it did not beat
    the champion), ``not_compared`` (evaluated against no champion or another one than the alias's now).
    """
    current = read_alias(root, name, alias)
    compared = evaluation.get(CHAMPION)
    if current is not None and current.version == version:
        return write_decision(root, name, version, {"decision": "already", "alias": alias})
    if current is None and compared is None:
        reason = f"first version of {name} to pass its gate: {evaluation['quality_gate']['reason']}"
    elif current is None or compared is None or compared.get("uri") != version_uri(root, name, current.version):
        against = compared.get("uri", "?") if compared else "no champion"
        now = current.version if current else "none"
        reason = f"evaluated against {against}, but {name}@{alias} is {now}: promote it by hand (genai_promote)"
        return write_decision(root, name, version, {"decision": "not_compared", "alias": alias, "reason": reason})
    elif not compared["passed"]:
        return write_decision(
            root, name, version, {"decision": "rejected", "alias": alias, "reason": compared["reason"],
                                  "champion": current.version, "comparison": compared},
        )  # fmt: skip
    else:
        reason = f"beat {name}@{alias} ({current.version}): {compared['reason']}"
    move_alias(root, name, alias, version, current, run_id=run_id, reason=reason)
    return write_decision(
        root, name, version, {"decision": "promoted", "alias": alias, "reason": reason,
                              "previous": current.version if current else None},
    )  # fmt: skip
