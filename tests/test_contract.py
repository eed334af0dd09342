"""The stage contract shared by every stage: config precedence, the manifest commit marker, caching."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from stages.core import manifest, store
from stages.core.config import SEED_BOUNDS, build_config, check, help_field, load_config
from stages.core.errors import ConfigError, InputNotFound, UserError
from stages.core.runner import StageConfig, run_stage

ROOT = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class EchoConfig(StageConfig):
    source: str = help_field("", "A file to copy.")
    repeat: int = help_field(1, "How many copies.")
    scale: float = help_field(1.0, "A number.")
    tags: list[str] = help_field(["a"], "A list.")
    mode: Literal["fast", "slow"] = help_field("fast", "An enum.")
    fail_with: str = help_field("", "Raise this after writing one output (for failure tests).")
    seed: int = help_field(0, "A seed.", bounds=SEED_BOUNDS)

    OPERATIONAL = frozenset({"scale"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.repeat > 0, f"repeat={self.repeat} must be > 0")


def echo(config: EchoConfig, run) -> dict:
    data = store.read_bytes(config.source)
    for i in range(config.repeat):
        store.write_bytes(run.output(f"copy-{i}.txt"), data)
        if config.fail_with == "user":
            raise UserError("source has a problem the user must fix")
        if config.fail_with == "crash":
            raise RuntimeError("a bug")
        if config.fail_with in ("sigterm", "sigkill"):  # a pod deletion or spot notice; a kill with no grace
            os.kill(os.getpid(), getattr(signal, config.fail_with.upper()))
    return {"bytes": len(data) * config.repeat}


def run_echo(*args: str) -> int:
    return run_stage("echo", EchoConfig, lambda c: {"source": c.source}, echo, list(args))


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("hello")
    return path


def test_precedence_is_default_then_file_then_override(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("repeat: 3\nscale: 2.5\ntags: [x, y]\n")
    config = load_config(EchoConfig, str(config_file), ["repeat=4", "mode=slow"])
    assert (config.repeat, config.scale, config.tags, config.mode) == (4, 2.5, ["x", "y"], "slow")
    assert load_config(EchoConfig, None, ["tags=p,q"]).tags == ["p", "q"]
    assert load_config(EchoConfig, None, ["scale=1e-4"]).scale == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("repaet=2", "unknown config key 'repaet' for EchoConfig; did you mean 'repeat'?"),
        ("repeat=two", "repeat='two' must be an integer"),
        ("repeat=0", "repeat=0 must be > 0"),
        ("scale=nan", "scale='nan' must be a finite number"),
        ("mode=medium", "mode='medium' is not one of ['fast', 'slow']"),
        ("run_id=../../etc", "run_id='../../etc' must be"),
        ("artifact_root=ftp://host/x", "artifact_root='ftp://host/x' uses scheme 'ftp'"),
        ("artifact_root=memory://x", "artifact_root='memory://x' is a store inside this process"),
        ("artifact_root=/etc/genai", "artifact_root='file:///etc/genai' is inside the system folder /etc"),
        ("artifact_root=file:///usr/../", "artifact_root='file:///usr/..' is the file system's root"),
        ("novalue", "override 'novalue' is not of the form key=value"),
        ("seed=-1", "seed=-1 must be in [0, 4294967295]"),
        ("seed=4294967296", "seed=4294967296 must be in [0, 4294967295]"),
        ("repeat=٣", "repeat='٣' must be an integer written with the digits 0-9"),  # Arabic-Indic 3
        ("scale=١.5", "must be a number written with the digits 0-9"),
        ("repeat=" + "9" * 5000, "(5000 characters) must be an integer written with the digits 0-9"),
        ("source=" + "x" * 5000, "source is 5000 characters long, over the 4096 allowed: 'xxxxx"),
    ],
)
def test_bad_config_names_the_field_and_value(override, message):
    with pytest.raises(UserError, match=None) as exc:
        load_config(EchoConfig, None, [override])
    assert message in str(exc.value)


def test_a_megabyte_value_is_refused_at_once_in_one_short_line(tmp_path):
    """It hung: redacting secrets from the message was quadratic in the value's length (minutes per MB)."""
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input_uri": "s3://b/" + "a" * 1_000_000, "base_model": "org/model"}))
    command = [sys.executable, "-m", "stages.tokenize", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "input_uri is 1000007 characters long, over the 4096 allowed" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr) < 2000


def test_redaction_is_linear_and_still_hides_passwords():
    from stages.core.uris import redact

    assert redact("a" * 1_000_000) == "a" * 1_000_000  # seconds per call when it was quadratic, a hang per MB
    assert redact("see s3://user:pw@bucket/k and abfs://c@acct/x") == "see s3://***@bucket/k and abfs://c@acct/x"
    long_scheme = "q" * 40 + "://u:pw@h/x"  # more than 32 characters of scheme: still redacted
    assert "pw" not in redact(long_scheme)


def test_config_file_must_be_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(EchoConfig, str(bad), [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(EchoConfig, str(tmp_path / "missing.yaml"), [])


def test_manifest_is_written_last_and_records_inputs_outputs_config(tmp_path, source, capsys):
    assert run_echo(f"artifact_root={tmp_path}/art", f"source={source}", "repeat=2") == 0
    out = tmp_path / "art/runs/dev/echo"
    committed = json.loads((out / "manifest.json").read_text())
    assert sorted(committed["outputs"]) == ["copy-0.txt", "copy-1.txt"]
    assert committed["inputs"]["source"]["sha256"] == manifest.hash_input(f"file://{source}")["sha256"]
    assert committed["config"]["repeat"] == 2
    assert committed["metrics"] == {"bytes": 10}
    assert committed["code"]["source_sha256"]
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["cache_hit"] is False and result["metrics"] == {"bytes": 10}


def test_second_run_is_a_cache_hit_that_touches_nothing(tmp_path, source, capsys):
    args = (f"artifact_root={tmp_path}/art", f"source={source}")
    assert run_echo(*args) == 0
    out = tmp_path / "art/runs/dev/echo"
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    # scale is operational: it does not change the cache key
    assert run_echo(*args, "scale=3") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache_hit"] is True
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_changed_input_with_same_run_id_recomputes_the_stale_output(tmp_path, source, capsys):
    args = (f"artifact_root={tmp_path}/art", f"source={source}")
    assert run_echo(*args) == 0
    source.write_text("changed")
    capsys.readouterr()
    assert run_echo(*args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache_hit"] is False
    assert (tmp_path / "art/runs/dev/echo/copy-0.txt").read_text() == "changed"
    assert (
        manifest.read(f"file://{tmp_path}/art/runs/dev/echo")["inputs"]["source"]["sha256"]
        == manifest.hash_input(f"file://{source}")["sha256"]
    )


def test_changed_code_with_same_run_id_recomputes(tmp_path, source, capsys, monkeypatch):
    args = (f"artifact_root={tmp_path}/art", f"source={source}")
    assert run_echo(*args) == 0
    monkeypatch.setattr(manifest, "code_version", lambda stage_file: {"source_sha256": "edited"})
    capsys.readouterr()
    assert run_echo(*args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache_hit"] is False
    assert manifest.read(f"file://{tmp_path}/art/runs/dev/echo")["code"] == {"source_sha256": "edited"}
    assert run_echo(*args) == 0  # and the recomputed output is a cache hit for that code
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache_hit"] is True


def test_other_settings_under_the_same_run_id_are_refused_not_overwritten(tmp_path, source, capsys):
    args = (f"artifact_root={tmp_path}/art", f"source={source}")
    assert run_echo(*args) == 0
    before = (tmp_path / "art/runs/dev/echo/manifest.json").read_bytes()
    assert run_echo(*args, "repeat=3") == 2
    assert "already committed for other settings (repeat: 1 -> 3); use a new run_id" in capsys.readouterr().err
    assert (tmp_path / "art/runs/dev/echo/manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "art/runs/dev/echo").iterdir()) == ["copy-0.txt", "manifest.json"]


@pytest.mark.parametrize(("fail_with", "code"), [("user", 2), ("crash", None)])
def test_failed_stage_leaves_no_output_and_no_manifest(tmp_path, source, fail_with, code, capsys):
    args = (f"artifact_root={tmp_path}/art", f"source={source}", f"fail_with={fail_with}")
    if code is None:
        with pytest.raises(RuntimeError):
            run_echo(*args)
    else:
        assert run_echo(*args) == code
        assert "error: echo: source has a problem" in capsys.readouterr().err
    out = tmp_path / "art/runs/dev/echo"
    assert not out.exists() or [p.name for p in out.iterdir()] == []


def test_sigterm_stops_a_stage_at_once_with_143_and_commits_nothing(tmp_path, source):
    """A pod deleted or a spot node reclaimed: the stage stops at once, without a traceback."""
    before = signal.getsignal(signal.SIGTERM)
    assert run_echo(f"artifact_root={tmp_path}/art", f"source={source}", "fail_with=sigterm", "repeat=3") == 143
    assert manifest.read(f"file://{tmp_path}/art/runs/dev/echo") is None
    assert not (tmp_path / "art/runs/dev/echo/copy-1.txt").exists()  # stopped at the signal, not after the work
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_scratch_folders_of_killed_attempts_are_removed_by_the_next_one(tmp_path, source, monkeypatch):
    import subprocess
    import sys
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    args = [f"artifact_root={tmp_path}/art", f"source={source}"]
    killed = f"from tests.test_contract import run_echo; run_echo(*{[*args, 'fail_with=sigkill']!r})"
    done = subprocess.run([sys.executable, "-c", killed], cwd=ROOT, env={**os.environ, "TMPDIR": str(temp)})
    assert done.returncode == -signal.SIGKILL
    (left,) = temp.iterdir()  # no cleanup ran
    live = temp / f"{left.name.rsplit('.', 1)[0]}.{os.getppid()}"  # an attempt at the same output, still running
    live.mkdir()
    other = temp / "stage-echo-000000000000.1"  # another output's
    other.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert run_echo(*args) == 0
    assert sorted(p.name for p in temp.iterdir()) == sorted([live.name, other.name])


def test_leftovers_of_a_killed_attempt_are_never_committed(tmp_path, source):
    out = tmp_path / "art/runs/dev/echo"
    out.mkdir(parents=True)
    (out / "stale-partial.bin").write_bytes(b"half")
    assert manifest.read(f"file://{out}") is None  # no manifest: not committed
    assert run_echo(f"artifact_root={tmp_path}/art", f"source={source}") == 0
    assert sorted(json.loads((out / "manifest.json").read_text())["outputs"]) == ["copy-0.txt"]
    assert not (out / "stale-partial.bin").exists()


def test_missing_input_and_unwritable_root_exit_2(tmp_path, source, capsys):
    assert run_echo(f"artifact_root={tmp_path}/art", f"source={tmp_path}/nope.txt") == 2
    assert "source=" in capsys.readouterr().err
    if os.geteuid() != 0:  # root can write anywhere; the permission check needs a normal user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert run_echo(f"artifact_root={locked}", f"source={source}") == 2
        assert "not writable" in capsys.readouterr().err
    assert run_echo(f"artifact_root={source}/under-a-file", f"source={source}") == 2  # even for root
    assert "artifact_root is not writable" in capsys.readouterr().err


def test_an_input_expands_to_its_files_sorted_without_hidden_ones(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl", ".hidden.jsonl", "notes.txt"):
        (data / name).write_text("{}\n")
    (data / "dir.jsonl").mkdir()  # a folder that a glob matches is not a file
    root = f"file://{data}"

    assert store.expand(f"{root}/a.jsonl") == [f"{root}/a.jsonl"]
    assert store.expand(f"{root}/.hidden.jsonl") == [f"{root}/.hidden.jsonl"]  # named, so taken
    assert store.expand(root) == [f"{root}/{n}" for n in ("a.jsonl", "b.jsonl", "notes.txt", "sub/c.jsonl")]
    assert store.expand(f"{root}/*.jsonl") == [f"{root}/a.jsonl", f"{root}/b.jsonl"]
    assert store.expand(f"{root}/**/*.jsonl") == [f"{root}/a.jsonl", f"{root}/b.jsonl", f"{root}/sub/c.jsonl"]


@pytest.mark.parametrize(
    ("where", "message"),
    [("nope.jsonl", "does not exist"), ("*.parquet", "matches no files"), ("empty", "holds no files")],
)
def test_an_input_that_names_no_file_is_a_user_error_naming_the_field(tmp_path, where, message):
    (tmp_path / "empty").mkdir()
    uri = f"file://{tmp_path}/{where}"
    with pytest.raises(InputNotFound) as exc:
        store.expand(uri, "input_uri")
    assert str(exc.value) == f"input_uri={uri!r} {message}"
    assert isinstance(exc.value, UserError) and isinstance(exc.value, FileNotFoundError)


def test_atomic_write_never_leaves_a_temp_file(tmp_path):
    target = f"file://{tmp_path}/m.json"
    store.write_text(target, "{}")
    store.write_text(target, '{"a": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert store.read_text(target) == '{"a": 1}'


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exc:
        run_echo("--help")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in ("artifact_root", "run_id", "source", "repeat", "tags", "mode"):
        assert f"{name}=" in text


@pytest.mark.parametrize(
    ("stage", "values", "message"),
    [
        ("evaluate", {"sample_max_new_tokens": 100_000}, "sample_max_new_tokens=100000 must be in [1, 32768]"),
        ("batch_infer", {"max_new_tokens": 10**9, "prompts_uri": "/p.jsonl"}, "must be in [1, 131072]"),
        ("train_lora", {"rank": 4096}, "rank=4096 must be in [1, 1024]"),
        ("base_model", {"hidden_size": 2048, "num_layers": 48}, "make about 2424M parameters"),
    ],
)
def test_every_size_is_bounded_before_anything_is_allocated(stage, values, message):
    """Unbounded, these ended in an allocator error with a traceback, or generated until killed."""
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    config_class = next(
        c for c in vars(module).values() if isinstance(c, type) and issubclass(c, StageConfig) and c is not StageConfig
    )
    required = {"corpus_uri": "/corpus"} if stage == "base_model" else {"base_model": "org/model"}
    with pytest.raises(ConfigError) as refused:
        build_config(config_class, {**required, **values})
    assert message in str(refused.value)


def test_sample_completions_must_fit_the_models_context():
    from stages.evaluate import EvaluateConfig, check_lengths

    config = build_config(EvaluateConfig, {"base_model": "org/model", "sample_max_new_tokens": 300})
    with pytest.raises(UserError, match=r"sample_max_new_tokens=300 after a 32-token prompt is longer than .* 256"):
        check_lengths(config, context=256)
    check_lengths(
        build_config(EvaluateConfig, {"base_model": "org/model", "num_samples": 0, "sample_max_new_tokens": 300}), 256
    )
