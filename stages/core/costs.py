"""What a run cost: every attempt of every stage, its wall time, the resources and prices it ran with.

    python -m stages.core.costs ./artifacts      # cost per published model version, then per run
    make costs ARTIFACT_ROOT=gs://bucket/genai

Each attempt of a stage (every try the orchestrator starts: preempted, failed and cache-hit ones
included) writes one small record under its run, beside the stage folders, so that no attempt's time
goes unaccounted and no stage output changes:

    <artifact_root>/runs/<run_id>/.attempts/<stage>-<started>-<id>.json

It is written when the attempt starts, rewritten every ``STAGE_ATTEMPT_HEARTBEAT_S`` seconds (default
60) while it runs, and once more when it ends with how it ended: ``done``, ``cache_hit``, ``preempted``
(SIGTERM, exit 143), ``refused`` (exit 2) or ``failed``. An attempt killed without notice (SIGKILL, a
node gone) keeps its last heartbeat: its time counts up to that, at most a heartbeat short.

The runtime that starts the attempt knows what the stage process cannot (its node pool, spot or on
demand, the platform's prices) and passes it in ``STAGE_RESOURCES`` (JSON; ``genai_dags.settings``
builds it): node pool, capacity, CPU, memory, GPUs, and the price per hour of the unit a pool is billed
by (one GPU on the GPU pools, one requested vCPU on the cpu pool) at the pool's capacity and on demand.
A record carries its own prices, so reports need no price table and a later price change does not
rewrite what a run cost. A stage run by hand (no ``STAGE_RESOURCES``) records its time only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from stages.core import store, uris
from stages.core.layout import MANIFEST

log = logging.getLogger(__name__)
RESOURCES_ENV = "STAGE_RESOURCES"
HEARTBEAT_ENV = "STAGE_ATTEMPT_HEARTBEAT_S"
ATTEMPTS = ".attempts"  # under runs/<run_id>/: dot-named, so no listing takes it for a stage folder
COST_FILE = "cost.json"  # in a published model version: what its run cost
RUNNING = "running"
PREEMPTED = "preempted"


def resources_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The resources and prices the runtime passed (empty when the stage was started by hand)."""
    text = (environ if environ is not None else os.environ).get(RESOURCES_ENV, "")
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        log.warning("%s is not JSON; this attempt records its time only", RESOURCES_ENV)
        return {}
    return value if isinstance(value, dict) else {}


class Attempt:
    """One attempt's record: written at start, on a heartbeat, and at the end. Accounting never fails a stage."""

    def __init__(self, run_uri: str, stage: str, output_uri: str, resources: dict[str, Any]) -> None:
        self.started_at = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.started_at))
        self.id = f"{stage}-{stamp}-{uuid.uuid4().hex[:8]}"
        self.uri = uris.join(run_uri, ATTEMPTS, f"{self.id}.json")
        self.record: dict[str, Any] = {
            "attempt": self.id,
            "stage": stage,
            "output_uri": output_uri,
            "started_at": self.started_at,
            "seconds": 0.0,
            "status": RUNNING,
            "exit_code": None,
            "resources": resources,
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def seconds(self) -> float:
        return round(time.time() - self.started_at, 3)

    def start(self) -> Attempt:
        self._write()
        interval = float(os.environ.get(HEARTBEAT_ENV, "") or 60)
        self._heartbeat = threading.Thread(target=self._beat, args=(max(interval, 0.05),), daemon=True)
        self._heartbeat.start()
        return self

    def finish(self, status: str, exit_code: int) -> None:
        self._stop.set()
        with self._lock:
            self.record.update(status=status, exit_code=exit_code)
        self._write()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._write()

    def _write(self) -> None:
        with self._lock:
            if self._stop.is_set() and threading.current_thread() is self._heartbeat:
                return  # the attempt has ended: its final record is written by finish()
            self.record["seconds"] = self.seconds
            text = json.dumps(self.record, sort_keys=True) + "\n"
            try:
                store.write_text(self.uri, text)
            except Exception as exc:  # the stage's own writes report a failing store; its accounting only warns
                log.warning("could not record attempt %s at %s: %s", self.id, self.uri, exc)


# ---------------------------------------------------------------------------------------------
# The arithmetic: plain functions over records, tested on their own.


def attempt_cost(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """(cost at the capacity it ran on, the same hours on demand); None where no price was given."""
    r = record.get("resources") or {}
    hours = float(record.get("seconds") or 0) / 3600
    units = float(r.get("units") or 0)

    def priced(key: str) -> float | None:
        return None if r.get(key) is None else hours * units * float(r[key])

    return priced("unit_price_per_hour"), priced("on_demand_unit_price_per_hour")


def _add(total: float | None, value: float | None) -> float | None:
    return value if total is None else (total if value is None else total + value)


def summarize(records: Iterable[dict[str, Any]], run_id: str = "") -> dict[str, Any]:
    """Per stage and in total: attempts, preempted ones, wall seconds, GPU hours, cost and its on-demand twin."""
    stages: dict[str, dict[str, Any]] = {}
    currencies: set[str] = set()
    for record in sorted(records, key=lambda r: (r.get("started_at") or 0, r.get("attempt") or "")):
        r = record.get("resources") or {}
        s = stages.setdefault(
            record.get("stage") or "?",
            {"attempts": 0, "preempted": 0, "unpriced": 0, "seconds": 0.0, "gpu_hours": 0.0, "pools": []},
        )
        cost, on_demand = attempt_cost(record)
        seconds = float(record.get("seconds") or 0)
        s["attempts"] += 1
        s["preempted"] += record.get("status") == PREEMPTED
        s["unpriced"] += cost is None
        s["seconds"] += seconds
        s["gpu_hours"] += seconds / 3600 * int(r.get("gpu") or 0)
        s["cost"] = _add(s.get("cost"), cost)
        s["on_demand_cost"] = _add(s.get("on_demand_cost"), on_demand)
        pool = f"{r['node_pool']} ({r.get('capacity', '?')})" if r.get("node_pool") else "-"
        if pool not in s["pools"]:
            s["pools"].append(pool)
        if r.get("currency"):
            currencies.add(r["currency"])
    total: dict[str, Any] = {"attempts": 0, "preempted": 0, "unpriced": 0, "seconds": 0.0, "gpu_hours": 0.0}
    for s in stages.values():
        s.setdefault("cost", None)
        s.setdefault("on_demand_cost", None)
        for key in ("attempts", "preempted", "unpriced", "seconds", "gpu_hours"):
            total[key] += s[key]
        total["cost"] = _add(total.get("cost"), s["cost"])
        total["on_demand_cost"] = _add(total.get("on_demand_cost"), s["on_demand_cost"])
    total.setdefault("cost", None)
    total.setdefault("on_demand_cost", None)
    for s in [*stages.values(), total]:
        for key in ("seconds", "gpu_hours", "cost", "on_demand_cost"):
            if s[key] is not None:
                s[key] = round(s[key], 6)
    currency = next(iter(currencies)) if len(currencies) == 1 else ("mixed" if currencies else None)
    return {"run_id": run_id, "currency": currency, "stages": stages, "total": total}


def read_attempts(run_uri: str, current: Attempt | None = None) -> list[dict[str, Any]]:
    """Every attempt record of a run; ``current`` (the caller's own, still running) counted up to now."""
    folder = uris.join(run_uri, ATTEMPTS)
    records = []
    for rel in store.list_files(folder):
        if not rel.endswith(".json") or "/" in rel or rel.startswith("."):
            continue
        try:
            record = json.loads(store.read_text(uris.join(folder, rel)))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            continue  # unreadable: a record cut short cannot be priced
        if isinstance(record, dict):
            if current is not None and record.get("attempt") == current.id:
                record = {**record, "seconds": current.seconds}
            records.append(record)
    return records


def run_cost(artifact_root: str, run_id: str, current: Attempt | None = None) -> dict[str, Any]:
    return summarize(read_attempts(uris.join(artifact_root, "runs", run_id), current), run_id)


# ---------------------------------------------------------------------------------------------
# Text


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def money(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def saving(cost: dict[str, Any]) -> str:
    """What spot capacity saved against the same hours on demand, as text ('' when not priced)."""
    paid, on_demand = cost.get("cost"), cost.get("on_demand_cost")
    if paid is None or not on_demand:
        return ""
    return f"spot saved {on_demand - paid:.4f} ({(on_demand - paid) / on_demand:.0%})"


def render(cost: dict[str, Any]) -> str:
    """A run's cost as a table: per stage and in total, paid against the same hours on demand."""
    currency = cost.get("currency") or "no price table"
    lines = [
        f"cost of run {cost.get('run_id') or '?'} ({currency}; every attempt, preempted ones included, "
        "at its pool's price; 'on demand': the same hours at on-demand prices)",
        f"  {'stage':<18} {'attempts':>8} {'preempted':>9} {'wall':>8} {'GPU h':>7}  {'cost':>10} {'on demand':>10}"
        "  pool",
    ]
    rows = [*cost["stages"].items(), ("total", cost["total"])]
    for name, s in rows:
        pools = ", ".join(s.get("pools", []))
        lines.append(
            f"  {name:<18} {s['attempts']:>8} {s['preempted']:>9} {duration(s['seconds']):>8} {s['gpu_hours']:>7.3f}"
            f"  {money(s['cost']):>10} {money(s['on_demand_cost']):>10}  {pools}".rstrip()
        )
    if cost["total"].get("unpriced"):
        lines.append(f"  {cost['total']['unpriced']} attempt(s) ran without prices (no costs.prices, or by hand)")
    if text := saving(cost["total"]):
        lines.append(f"  {text}")
    return "\n".join(lines)


def report(artifact_root: str) -> str:
    """Cost per published model version (``models/<name>/<version>/cost.json``), then per run."""
    artifact_root = uris.normalize_uri(artifact_root, "artifact_root").rstrip("/")
    lines = [f"costs under {artifact_root}", "", "published model versions:"]
    header = f"  {'model':<24} {'version':<26} {'wall':>8} {'GPU h':>7}  {'cost':>10} {'on demand':>10}  currency"
    lines.append(header)
    models = uris.join(artifact_root, "models")
    found = 0
    for name in store.list_dirs(models):
        for version in store.list_dirs(uris.join(models, name)):
            folder = uris.join(models, name, version)
            if not store.exists(uris.join(folder, MANIFEST)):
                continue  # not published
            try:
                cost = json.loads(store.read_text(uris.join(folder, COST_FILE)))
            except FileNotFoundError:
                lines.append(f"  {name:<24} {version:<26} (published without a cost record)")
                continue
            t = cost["total"]
            lines.append(
                f"  {name:<24} {version:<26} {duration(t['seconds']):>8} {t['gpu_hours']:>7.3f}"
                f"  {money(t['cost']):>10} {money(t['on_demand_cost']):>10}  {cost.get('currency') or '-'}"
            )
            found += 1
    if not found:
        lines.append("  (none)")
    lines += ["", "runs (every attempt so far, unpublished and batch-inference runs included):"]
    lines.append(f"  {'run':<40} {'attempts':>8} {'preempted':>9} {'wall':>8}  {'cost':>10} {'on demand':>10}")
    runs = uris.join(artifact_root, "runs")
    for run_id in store.list_dirs(runs):
        records = read_attempts(uris.join(runs, run_id))
        if not records:
            continue
        t = summarize(records, run_id)["total"]
        lines.append(
            f"  {run_id:<40} {t['attempts']:>8} {t['preempted']:>9} {duration(t['seconds']):>8}"
            f"  {money(t['cost']):>10} {money(t['on_demand_cost']):>10}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m stages.core.costs <artifact_root>", file=sys.stderr)
        return 2
    print(report(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
