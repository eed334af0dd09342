"""How ``stages`` is layered, read from the sources with ``ast`` (nothing is imported):

    .venv/bin/python -m pytest tests/test_layering.py

``stages/core/`` is the library every stage shares and imports no stage; a stage imports the library
and never another stage; no module of ``stages`` takes part in an import cycle; nothing in ``stages``
imports Airflow (the stage images do not have it). The code version rests on this: it hashes a
stage's own module plus ``stages/core/``, which is all of ours that the stage can run.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stages"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
CORE = {m for m in MODULES if m == "stages.core" or m.startswith("stages.core.")}
STAGES = {m for m in MODULES if m.count(".") == 1 and m not in CORE}


def imported_names(name: str) -> set[str]:
    """Every module that ``name`` imports, at the top or inside a function, relative imports resolved.

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return found


GRAPH = {name: {m for m in imported_names(name) if m in MODULES and m != name} for name in MODULES}


def test_the_import_graph_is_read():
    """A guard for the tests below: the graph holds the edges every stage has."""
    assert {"stages.core", "stages.core.store", "stages.core.runner"} <= CORE
    assert {"stages.tokenize", "stages.train_lora", "stages.publish"} <= STAGES
    assert {"stages.core.store", "stages.core.runner"} <= GRAPH["stages.tokenize"]
    assert "stages.core.uris" in GRAPH["stages.core.store"]


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_shared_library_imports_no_stage(name):
    assert not GRAPH[name] & STAGES


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_imports_no_other_stage(name):
    assert not GRAPH[name] & STAGES


def test_no_module_of_stages_is_in_an_import_cycle():
    cycles = []

    def visit(name: str, path: list[str], done: set[str]) -> None:
        for child in sorted(GRAPH[name]):
            if child in path:
                cycles.append([*path[path.index(child) :], child])
            elif child not in done:
                visit(child, [*path, child], done)
        done.add(name)

    done: set[str] = set()
    for name in sorted(MODULES):
        if name not in done:
            visit(name, [name], done)
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_stages_never_import_airflow_or_the_dags(name):
    roots = {imported.split(".")[0] for imported in imported_names(name)}
    assert not roots & {"airflow", "genai_dags"}


def load_manifest_module(package: Path):
    """The ``manifest`` module of a copy of the package, loaded from the copy's file (the copy is what it
    hashes; what it imports is the real package)."""
    spec = importlib.util.spec_from_file_location(f"copied_manifest_{id(package)}", package / "core/manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_code_version_is_the_stage_module_plus_the_shared_library(tmp_path):
    package = tmp_path / "stages"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    stages = sorted(name.rpartition(".")[2] for name in STAGES)

    def versions() -> dict[str, str]:
        manifest = load_manifest_module(package)
        return {s: manifest.code_version(str(package / f"{s}.py"))["source_sha256"] for s in stages}

    before = versions()
    assert len(set(before.values())) == len(stages)  # each stage has its own

    with (package / "tokenize.py").open("a") as fh:
        fh.write("\n# an edit\n")
    (package / "new_stage.py").write_text('if __name__ == "__main__":\n    pass\n')
    after_stage_edit = versions()
    assert after_stage_edit["tokenize"] != before["tokenize"]
    assert {s: v for s, v in after_stage_edit.items() if s != "tokenize"} == {
        s: v for s, v in before.items() if s != "tokenize"
    }

    with (package / "core/store.py").open("a") as fh:
        fh.write("\n# an edit\n")
    after_core_edit = versions()
    assert all(after_core_edit[s] != after_stage_edit[s] for s in stages)

    (package / "core/new_helper.py").write_text("VALUE = 1\n")
    assert all(v != after_core_edit[s] for s, v in versions().items())


def test_the_names_of_the_artifact_layout_sit_in_a_leaf_module():
    """Every module may use the layout's names, so the layout imports no module of ours (no cycle can form)."""
    assert GRAPH["stages.core.layout"] == set()
