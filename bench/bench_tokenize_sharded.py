"""Sharded tokenization: genai_finetune's tokenize as N shard tasks plus a merge, against one task.

    python -m bench.bench_tokenize_sharded                    # 200 MB, 1 task vs 2 shards; 1 GB in 4 shards
    python -m bench.bench_tokenize_sharded --mb 20 --big-mb 0 # smaller, no 1 GB run

The corpus is one JSONL file of distinct documents (Shakespeare's lines, three to a document, each
numbered so that none is a duplicate), so the shards cut one big file at byte ranges. Every task is the
stage's own process, as the DAG runs it (``python -m stages.tokenize``): the shard tasks side by side (on
this machine, as many at once as there are cores), then the merge. Each task's wall time and peak memory
(its own ``ru_maxrss``) are measured; the merged dataset must equal the one task's, byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import DATA, ROOT, TINY_BASE, WORK, child_env, corpus_lines, ensure_tiny_base, load_average


def big_corpus(mb: int) -> Path:
    """One JSONL file of at least ``mb`` MB of distinct documents, made once."""
    path = DATA / f"sharded-{mb}mb" / "corpus.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines()
    written, n = 0, 0
    with path.open("w", encoding="utf-8") as fh:
        while written < mb * 1_000_000:
            start = (n * 3) % (len(lines) - 3)
            record = json.dumps({"text": f"{n}. " + " ".join(lines[start : start + 3])}) + "\n"
            fh.write(record)
            written += len(record.encode())
            n += 1
    return path


def anonymous_mib(pid: int) -> int:
    """A process's anonymous memory now (its heap: not the page cache of the files it maps), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) // 1024 for line in fh if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def run_task(args: list[str]) -> dict[str, Any]:
    """One stage process: its wall time, its own peak memory, and its peak anonymous memory (sampled)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "stages.tokenize", *args], cwd=ROOT, env=child_env(None), stdout=out, stderr=err
        )
        peak_anonymous = 0
        while True:  # the merge maps files: its RSS counts their page cache, which the kernel reclaims
            peak_anonymous = max(peak_anonymous, anonymous_mib(child.pid))
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # this child's own rusage: its peak memory
            if pid:
                break
            time.sleep(0.1)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"tokenize {' '.join(args)} failed:\n{err.read().decode()[-3000:]}")
        result = json.loads(out.read().decode().strip().splitlines()[-1])
    return {
        "seconds": seconds,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "peak_anonymous_mib": peak_anonymous,
        "metrics": result["metrics"],
    }


def dataset_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def sharded(corpus: Path, run_id: str, shards: int, parallel: int) -> dict[str, Any]:
    common = [f"input_uri={corpus}", f"base_model={TINY_BASE}", f"artifact_root={WORK}", f"run_id={run_id}"]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        tasks = list(pool.map(run_task, [[*common, f"num_shards={shards}", f"shard_index={i}"] for i in range(shards)]))
    merge = run_task([*common, f"num_shards={shards}", "merge=true"])
    return {
        "seconds": time.perf_counter() - started,
        "shard_seconds": [round(t["seconds"], 1) for t in tasks],
        "shard_peak_rss_mib": [round(t["peak_rss_mib"]) for t in tasks],
        "merge_seconds": round(merge["seconds"], 1),
        "merge_peak_rss_mib": round(merge["peak_rss_mib"]),
        "merge_peak_anonymous_mib": merge["peak_anonymous_mib"],
        "tokens": merge["metrics"]["tokens_total"],
        "docs": merge["metrics"]["records_kept"],
    }


def measure(mb: int, shards: int, big_mb: int, big_shards: int) -> dict[str, Any]:
    ensure_tiny_base()
    cores = os.cpu_count() or 1
    corpus = big_corpus(mb)
    for run_id in ("sharded-one", "sharded-many", "sharded-big"):
        shutil.rmtree(WORK / "runs" / run_id, ignore_errors=True)
    one = run_task([f"input_uri={corpus}", f"base_model={TINY_BASE}", f"artifact_root={WORK}", "run_id=sharded-one"])
    many = sharded(corpus, "sharded-many", shards, parallel=min(shards, cores))
    same = dataset_hashes(WORK / "runs/sharded-one/tokenize") == dataset_hashes(WORK / "runs/sharded-many/tokenize")
    result = {
        "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
        "tokens": one["metrics"]["tokens_total"],
        "one_task": {"seconds": round(one["seconds"], 1), "peak_rss_mib": round(one["peak_rss_mib"])},
        f"{shards}_shards": many,
        "speedup": round(one["seconds"] / many["seconds"], 2),
        "merged_equals_one_task": same,
        "cores": cores,
        "load_average": load_average(),
    }
    if big_mb:
        big = big_corpus(big_mb)
        result["big"] = {
            "corpus_mb": round(big.stat().st_size / 1e6, 1),
            "shards": big_shards,
            **sharded(big, "sharded-big", big_shards, parallel=min(big_shards, cores)),
        }
    for run_id in ("sharded-one", "sharded-many", "sharded-big"):
        shutil.rmtree(WORK / "runs" / run_id, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--big-mb", type=int, default=1000)
    parser.add_argument("--big-shards", type=int, default=4)
    args = parser.parse_args(argv)
    result = measure(args.mb, args.shards, args.big_mb, args.big_shards)
    print(json.dumps(result, indent=2))
    return 0 if result["merged_equals_one_task"] else 1


if __name__ == "__main__":
    sys.exit(main())
