"""Every shipped stage config (examples/configs/<stage>.yaml) loads through its stage's own parser, and its
header comment is the command that launches it: the torchtune habit, checked without running anything.

    .venv/bin/pytest tests/test_shipped_configs.py -q
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from stages.core.config import load_config
from stages.core.runner import StageConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples/configs").glob("*.yaml"))
# The data a user points a config at (the header's launch command names them as placeholders).
DATA = {"base_model": ["corpus_uri=/data/texts/*.txt"], "tokenize": ["input_uri=/data/folio"]}


def stage_config_class(stage: str) -> type[StageConfig]:
    module = importlib.import_module(f"stages.{stage}")
    (cls,) = {
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, StageConfig) and obj is not StageConfig
    }
    return cls


def header(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))


def test_every_stage_of_the_chain_has_a_shipped_config():
    assert {p.stem for p in CONFIGS} == {"base_model", "tokenize", "train_lora", "evaluate", "batch_infer", "publish"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_shipped_config_loads_with_its_stages_parser_and_its_header_launches_it(path):
    stage = path.stem
    launch = re.search(r"^# Launch: +(.+)$", header(path), re.MULTILINE)
    assert launch, f"{path.name}: the header has no '# Launch:' line"
    assert launch.group(1).startswith(f"python -m stages.{stage} --config examples/configs/{path.name}")
    assert re.search(r"^# Override: ", header(path), re.MULTILINE)
    # Unknown keys, wrong types and out-of-range values would raise ConfigError here.
    config = load_config(stage_config_class(stage), str(path), DATA.get(stage, []))
    assert config.run_id == yaml.safe_load(path.read_text())["run_id"]
    # A local base model is a path ('./...'), which becomes a file:// URI: 'artifacts/...' would be a hub id.
    assert getattr(config, "base_model", "file://").startswith("file://")


def test_make_chain_runs_every_shipped_config():
    makefile = (ROOT / "Makefile").read_text()
    for path in CONFIGS:
        assert f"-m stages.{path.stem} --config $(CONFIGS)/{path.name}" in makefile
