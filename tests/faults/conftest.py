"""The faults tier: fault injection and hostile input, with a tally printed as the summary table.

    make test-faults                                # every fault test, then the table
    .venv/bin/python -m pytest -m "faults and not slow" tests/faults   # the subset that make test runs

Each test records what it injected and how the pipeline came out of it in :class:`Tally` *before*
asserting, so a failing fault still shows in the table. "Data lost" counts committed manifests whose
outputs are missing or do not match, adapters that differ from an uninterrupted run, and outputs a
second run touched that it should not have: it must stay 0.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

COLUMNS = ("faults injected", "survived", "steps redone", "bad inputs tried", "rejected cleanly", "data lost")


@dataclass
class Row:
    faults: int = 0
    survived: int = 0
    steps_redone: list[int] = field(default_factory=list)
    bad_inputs: int = 0
    rejected_cleanly: int = 0
    data_lost: int = 0


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = defaultdict(Row)

    def fault(self, kind: str, survived: bool, steps_redone: int | None = None, data_lost: int = 0) -> None:
        row = self.rows[kind]
        row.faults += 1
        row.survived += bool(survived)
        row.data_lost += data_lost
        if steps_redone is not None:
            row.steps_redone.append(steps_redone)

    def bad_input(self, kind: str, rejected_cleanly: bool, data_lost: int = 0) -> None:
        row = self.rows[kind]
        row.bad_inputs += 1
        row.rejected_cleanly += bool(rejected_cleanly)
        row.data_lost += data_lost

    def table(self) -> str:
        def redone(steps: list[int]) -> str:
            return f"{sum(steps)} (max {max(steps)} per kill)" if steps else "-"

        total = Row()
        lines = [
            "| fault or input | " + " | ".join(COLUMNS) + " |",
            "|---|" + "---:|" * len(COLUMNS),
        ]
        for kind, row in sorted(self.rows.items()):
            lines.append(
                f"| {kind} | {row.faults or '-'} | {row.survived if row.faults else '-'} | {redone(row.steps_redone)}"
                f" | {row.bad_inputs or '-'} | {row.rejected_cleanly if row.bad_inputs else '-'} | {row.data_lost} |"
            )
            total.faults += row.faults
            total.survived += row.survived
            total.steps_redone += row.steps_redone
            total.bad_inputs += row.bad_inputs
            total.rejected_cleanly += row.rejected_cleanly
            total.data_lost += row.data_lost
        lines.append(
            f"| **total** | {total.faults} | {total.survived} | {redone(total.steps_redone)} | {total.bad_inputs}"
            f" | {total.rejected_cleanly} | {total.data_lost} |"
        )
        return "\n".join(lines)


TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


def pytest_terminal_summary(terminalreporter):
    if TALLY.rows:
        terminalreporter.section("faults tier summary")
        terminalreporter.write_line(TALLY.table())


# ---------------------------------------------------------------------------------------------
# Shared checks


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256); empty when the folder does not exist."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def lost_outputs(out: Path) -> int:
    """Outputs a committed manifest names that are missing or differ from their hash (0 when not committed)."""
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        return 0
    committed = json.loads(manifest_path.read_text())
    on_disk = tree_hashes(out)
    return sum(on_disk.get(rel) != digest for rel, digest in committed["outputs"].items())
