"""The stage contract in one function: every ``python -m stages.<name>`` goes through :func:`run_stage`.

    load config -> resolve inputs -> cache check -> work -> commit manifest -> print result

Exit codes: 0 done (or cache hit), 2 the user's mistake (message, no traceback),
143 stopped by SIGTERM (training saves a checkpoint first), 1 anything else (a bug or the infrastructure).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.core import costs, layout, manifest, store, telemetry, uris
from stages.core.config import check_bounds, check_run_id, config_to_dict, describe, help_field, load_config
from stages.core.errors import InputNotFound, StoreError, UserError

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143
EXIT_FAILED = 1  # anything else: infrastructure or a bug; the orchestrator retries
log = logging.getLogger("stages")


class Preempted(Exception):
    """SIGTERM stopped the stage (training saves a checkpoint first); it exits 143 so the orchestrator retries it."""


@dataclass(kw_only=True)
class StageConfig:
    """Fields every stage shares: where artifacts live and which run this is."""

    artifact_root: str = help_field(
        "./artifacts", "URI under which every run's artifacts live (file://, s3://, gs://, abfs://)."
    )
    run_id: str = help_field("dev", "Run name; outputs go to <artifact_root>/runs/<run_id>/<stage>/.")

    # Fields that change how a stage runs but not what it produces: left out of the cache key.
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset()
    # An output that others hold on to (a published model version) is never replaced: the same inputs and
    # config committed by other code is kept as it is (a cache hit), anything else under its name refused.
    IMMUTABLE_OUTPUT: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.artifact_root = uris.normalize_uri(self.artifact_root, "artifact_root").rstrip("/")
        uris.check_artifact_root(self.artifact_root)
        check_run_id("run_id", self.run_id)
        check_bounds(self)

    def run_uri(self, *parts: str) -> str:
        return uris.join(self.artifact_root, "runs", self.run_id, *parts)

    def output_uri(self, stage: str) -> str:
        """Where this stage commits its outputs (a stage with shards overrides it)."""
        return self.run_uri(stage)

    def resolve_input(self, field: str, default_stage: str) -> None:
        """An empty input field means "the output of <default_stage> in this run"."""
        value = getattr(self, field)
        setattr(self, field, uris.normalize_uri(value, field) if value else self.run_uri(default_stage))


@dataclass
class StageRun:
    """What a stage's work function gets besides its config."""

    name: str
    out_uri: str
    scratch: Path
    inputs: dict[str, Any]
    cache_key: str
    # Working state (such as checkpoints) to delete once the manifest is committed.
    remove_after_commit: list[str] = dataclasses.field(default_factory=list)
    # This attempt's record (stages.core.costs): its wall time so far, the resources it runs with.
    attempt: costs.Attempt | None = None

    def output(self, *parts: str) -> str:
        return uris.join(self.out_uri, *parts)


def run_stage(
    name: str,
    config_cls: type[StageConfig],
    inputs: Callable[[Any], dict[str, str | manifest.Input]],
    work: Callable[[Any, StageRun], dict[str, Any]],
    argv: list[str] | None = None,
) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}",
        description=f"Run the {name} stage. Settings: dataclass default < --config file < key=value.",
        epilog="settings:\n" + describe(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file (or URI) of settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=log_format(name), stream=sys.stderr, force=True)
    # SIGTERM (a pod deleted, a spot node reclaimed) stops the stage without a traceback; a training loop
    # installs its own handler, which checkpoints first. (Signal handlers belong to the main thread: a stage
    # called in another thread keeps the process's.)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if in_main else None
    try:
        return _run(name, config_cls, inputs, work, args.config, args.overrides)
    except UserError as exc:
        log.error("%s", exc)
        print(f"error: {name}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as exc:
        log.warning("preempted: %s", exc)
        return EXIT_PREEMPTED
    except StoreError as exc:  # the store kept failing: infrastructure, worth a retry, not a stack trace
        log.error("%s", exc)
        print(f"error: {name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def log_format(name: str) -> str:
    """Every log line of a stage names it (and, in a training process, its rank)."""
    return f"%(asctime)s %(levelname)s [{name}] %(message)s"


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM outside a training loop (which checkpoints first): stop now; outputs commit whole or not at all."""
    raise Preempted("SIGTERM before the stage finished; nothing of it was committed, the next try redoes it")


@contextmanager
def _scratch(name: str, out_uri: str) -> Iterator[Path]:
    """This attempt's scratch folder in the temporary directory, removed at the end.

    A killed attempt (SIGKILL: no cleanup runs) leaves its folder behind, gigabytes for a trainer. The
    folder is named after the output and the process, so the next attempt at the same output removes
    the folders of earlier attempts whose process is gone.
    """
    tag = f"stage-{name}-{hashlib.sha256(out_uri.encode()).hexdigest()[:12]}"
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{tag}.*"):
        pid = old.suffix[1:]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an earlier attempt that was killed", old)
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{tag}.{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)  # in a container, attempts get the same pid
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _run(name, config_cls, inputs_fn, work, config_uri, overrides) -> int:
    config = load_config(config_cls, config_uri, overrides)
    out_uri = config.output_uri(name)
    # Every attempt past its config costs its time, whatever its end: the record says how it ended.
    attempt = costs.Attempt(config.run_uri(), name, out_uri, costs.resources_from_env()).start()
    try:
        cache_hit, metrics = _attempt(name, config_cls, inputs_fn, work, config, attempt)
    except Preempted:
        _finish(attempt, costs.PREEMPTED, EXIT_PREEMPTED, name, config)
        raise
    except UserError:
        _finish(attempt, "refused", EXIT_USER_ERROR, name, config)
        raise
    except BaseException:
        _finish(attempt, "failed", EXIT_FAILED, name, config)
        raise
    _finish(attempt, "cache_hit" if cache_hit else "done", 0, name, config, {} if cache_hit else metrics)
    return 0


def _finish(attempt: costs.Attempt, status: str, code: int, name: str, config, metrics: dict | None = None) -> None:
    """Record how the attempt ended, and push its metrics where the runtime configured a Pushgateway."""
    attempt.finish(status, code)
    metrics = metrics or {}
    values: dict[str, Any] = {
        "genai_stage_duration_seconds": ({"status": status}, attempt.record["seconds"]),
        "genai_stage_tokens_per_second": metrics.get("tokens_per_second"),
    }
    cost = metrics.get("cost") if isinstance(metrics.get("cost"), dict) else {}
    if cost:  # publish prices the whole run (stages.core.costs)
        currency = {"currency": cost.get("currency") or "none"}
        values["genai_run_cost"] = (currency, cost.get("total"))
        values["genai_run_on_demand_cost"] = (currency, cost.get("on_demand"))
        values["genai_run_duration_seconds"] = cost.get("seconds")
    telemetry.push(telemetry.labels(name, config), values)


def _attempt(name, config_cls, inputs_fn, work, config, attempt: costs.Attempt) -> tuple[bool, dict[str, Any]]:
    """Cache check, work, commit and result line; whether it was a cache hit, and the committed metrics."""
    started = attempt.started_at
    resolved = config_to_dict(config)
    log.info("config: %s", json.dumps(resolved, sort_keys=True))
    out_uri = config.output_uri(name)

    input_uris = inputs_fn(config)
    input_hashes = {}
    for field, value in input_uris.items():
        uri, skip = (value.uri, value.skip) if isinstance(value, manifest.Input) else (value, ())
        if not uris.is_uri(uri):  # a hub model id: its name is its identity
            input_hashes[field] = {"id": uri, "sha256": uri}
            continue
        try:
            input_hashes[field] = manifest.hash_input(uris.normalize_uri(uri, field), field, skip)
        except InputNotFound:
            raise  # names the field and says what is missing (nothing there, or a folder or glob with no files)
        except FileNotFoundError:
            raise UserError(f"{field}={uri!r} does not exist (or holds no files)") from None
    code = manifest.code_version(inspect.getsourcefile(work))
    keyed = {k: v for k, v in resolved.items() if k not in config_cls.OPERATIONAL}
    key = manifest.cache_key(name, keyed, input_hashes, code)

    existing = manifest.read(out_uri)
    if existing is not None:
        if _up_to_date(existing, key, keyed, input_hashes, config_cls.IMMUTABLE_OUTPUT, out_uri):
            _report(name, out_uri, existing, cache_hit=True, attempt=attempt)
            return True, existing.get("metrics") or {}
        # The same settings over changed inputs or code: the committed output is stale. Uncommit it
        # (manifest first: a cut-short removal leaves only uncommitted files, cleared just below).
        store.remove(uris.join(out_uri, manifest.MANIFEST))

    _check_writable(out_uri)
    _clear_uncommitted(out_uri)
    with _scratch(name, out_uri) as scratch:
        run = StageRun(name=name, out_uri=out_uri, scratch=scratch, inputs=input_hashes, cache_key=key, attempt=attempt)
        try:
            metrics = work(config, run)
        except (Preempted, KeyboardInterrupt):
            raise
        except BaseException:
            try:
                _clear_uncommitted(out_uri)  # nothing half-written stays behind
            except Exception as cleanup:  # a failing store must not hide the failure that matters
                log.warning("could not remove the uncommitted outputs under %s: %s", out_uri, cleanup)
            raise
    committed = manifest.commit(
        out_uri,
        {
            "stage": name,
            "cache_key": key,
            "config": resolved,
            "inputs": input_hashes,
            "code": code,
            "metrics": metrics,
            "timings": {"started_at": started, "seconds": round(time.time() - started, 3), "attempt": attempt.id},
            # What this attempt ran with (node pool, capacity, CPU, memory, GPUs, prices), as the runtime said.
            "resources": attempt.record["resources"],
        },
    )
    log.info("committed %s in %.1fs", uris.join(out_uri, manifest.MANIFEST), time.time() - started)
    for uri in run.remove_after_commit:
        store.remove(uri)
    _report(name, out_uri, committed, cache_hit=False, attempt=attempt)
    return False, committed.get("metrics") or {}


def _up_to_date(
    existing: dict[str, Any], key: str, keyed: dict[str, Any], inputs: dict[str, Any], immutable: bool, out_uri: str
) -> bool:
    """Whether the committed output serves this run as it is; raises when it belongs to other settings.

    Same cache key: a cache hit. Same settings over other inputs or code: stale, so False (recompute: a
    run triggered again after an upstream stage or this stage's code changed). Other settings under the
    same run id: refused, since that is another run, which must not overwrite this one. An immutable
    output is never recomputed: the same inputs and settings committed by other code are kept.
    """
    if existing.get("cache_key") == key:
        log.info("cache hit: %s is committed for the same inputs, config and code; nothing to do", out_uri)
        return True
    keyed, inputs = json.loads(json.dumps(keyed)), json.loads(json.dumps(inputs))  # as the manifest holds them
    committed = existing.get("config") or {}
    # A setting the committed run did not have is new code with its default, not another run's choice.
    changed = sorted(k for k in keyed.keys() & committed.keys() if committed[k] != keyed[k])
    immutable_hint = "it is immutable: publish under a new name or version" if immutable else "use a new run_id"
    if changed:
        settings = ", ".join(f"{k}: {committed[k]!r} -> {keyed[k]!r}" for k in changed)
        raise UserError(f"{out_uri} is already committed for other settings ({settings}); {immutable_hint}")
    stale = sorted(f for f in inputs if (existing.get("inputs") or {}).get(f) != inputs[f])
    if immutable and stale:
        raise UserError(f"{out_uri} is already committed for other inputs ({', '.join(stale)}); {immutable_hint}")
    if immutable:
        log.info("%s is committed for the same inputs and settings by other code; it is immutable: kept", out_uri)
        return True
    log.warning(
        "recomputing %s: it was committed for %s",
        out_uri,
        f"other inputs ({', '.join(stale)})" if stale else "other code (the same inputs and settings)",
    )
    return False


def _check_writable(out_uri: str) -> None:
    probe = uris.join(out_uri, ".write-probe")
    try:
        store.write_bytes(probe, b"")
        store.remove(probe)
    except (UserError, OSError) as exc:
        raise UserError(f"artifact_root is not writable at {out_uri!r}: {exc}") from None


def _clear_uncommitted(out_uri: str) -> None:
    """Remove leftovers of an earlier, uncommitted attempt.

    Checkpoints are kept for resuming, and sub-folders committed on their own (such as the shards of
    a sharded stage) are not leftovers.
    """
    files = manifest.output_files(out_uri)
    committed = {rel.rsplit("/", 1)[0] + "/" for rel in files if rel.endswith("/" + manifest.MANIFEST)}
    for rel in files:
        if not rel.startswith(tuple(committed)):
            store.remove(uris.join(out_uri, rel))
    if uris.is_local(out_uri):  # object stores have no empty folders or temp files; local disk keeps them
        root = uris.local_path(out_uri)
        for tmp in root.glob("**/.*.tmp-*"):  # an atomic write cut short (store.write_bytes)
            tmp.unlink(missing_ok=True)
        for folder in sorted(root.glob("**/"), reverse=True):
            working_state = folder.relative_to(root).parts[:1] == (layout.CHECKPOINTS,)
            if not working_state and not any(folder.iterdir()):
                folder.rmdir()


def _report(name: str, out_uri: str, committed: dict[str, Any], cache_hit: bool, attempt: costs.Attempt) -> None:
    """The small result that goes to the orchestrator (XCom): paths and metrics, never data."""
    result = {
        "stage": name,
        "cache_hit": cache_hit,
        "output_uri": out_uri,
        "manifest_uri": uris.join(out_uri, manifest.MANIFEST),
        "metrics": committed.get("metrics", {}),
        "attempt": {"id": attempt.id, "seconds": attempt.seconds},
    }
    text = json.dumps(result, sort_keys=True)
    print(text, flush=True)
    if path := os.environ.get("STAGE_RESULT_PATH"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
