"""Chat data for supervised fine-tuning: conversations, chat templates, assistant-only labels and packing.

A conversation is a list of ``{"role", "content"}`` turns (system, user, assistant). It is rendered with a
chat template (the tokenizer's own, a Jinja file, or a built-in one for base models that have none) and
tokenized once; the labels are the token ids where the assistant speaks (its content and the end-of-turn
markup right after it, so that the model learns to stop) and ``IGNORE`` everywhere else. Packing places
several examples in one block with position ids that restart at 0 for each, which keeps attention inside
each example (``transformers`` builds the block-diagonal mask from the position ids when no attention
mask is given) and the loss of a block equal to the sum of its examples' losses.

Used by tokenize (render, label, pack), evaluate and batch_infer (prompts with the generation prompt).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import layout, store
from stages.core.errors import UserError, shown

IGNORE = -100  # the label that carries no loss (PyTorch's cross-entropy ignore_index)
ROLES = ("system", "user", "assistant")

# Named templates for base models whose tokenizer has none. ChatML (Qwen's and many others' format) needs
# the tokenizer to hold <|im_start|> and <|im_end|> as special tokens (base_model's tiny model does).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# Why an example is dropped (counted in tokenize's metrics as dropped_<reason>).
DROP_REASONS = ("unknown_role", "empty_assistant", "no_assistant", "not_ending_with_assistant", "too_long")


class BadRecord(Exception):
    """A record that is not a conversation (counted as unusable, like invalid JSON)."""


class Dropped(Exception):
    """A well-formed conversation that cannot be trained on; ``reason`` is one of DROP_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Fields:
    """Where a record keeps its conversation: a ``messages`` list, or a prompt and a completion."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"


def conversation(record: Any, fields: Fields) -> list[dict[str, str]]:
    """The turns of one record, checked for shape; raises BadRecord or Dropped."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    if fields.messages in record:
        turns = record[fields.messages]
        if not isinstance(turns, list):
            raise BadRecord(f"{fields.messages!r} is {type(turns).__name__}, not a list of turns")
        return [_turn(turn, i) for i, turn in enumerate(turns)]
    if fields.prompt in record or fields.completion in record:
        turns = []
        for role, field in (("user", fields.prompt), ("assistant", fields.completion)):
            value = record.get(field)
            if not isinstance(value, str):
                raise BadRecord(f"{field!r} is {type(value).__name__}, not a string")
            turns.append({"role": role, "content": value})
        return turns
    raise BadRecord(f"neither {fields.messages!r} nor {fields.prompt!r}/{fields.completion!r}")


def _turn(turn: Any, index: int) -> dict[str, str]:
    if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
        raise BadRecord(f"turn {index} is not an object with 'role' and 'content'")
    role, content = turn["role"], turn["content"]
    if not isinstance(role, str) or not isinstance(content, str):
        raise BadRecord(f"turn {index}: role and content must be strings, not {type(content).__name__}")
    return {"role": role, "content": content}


def check_trainable(turns: list[dict[str, str]]) -> None:
    """Raise Dropped unless the conversation has known roles and ends with a non-empty assistant turn."""
    if any(t["role"] not in ROLES for t in turns):
        raise Dropped("unknown_role")
    assistant = [t for t in turns if t["role"] == "assistant"]
    if not assistant:
        raise Dropped("no_assistant")
    if any(not t["content"].strip() for t in assistant):
        raise Dropped("empty_assistant")
    if turns[-1]["role"] != "assistant":
        raise Dropped("not_ending_with_assistant")


# ---------------------------------------------------------------------------------------------
# Templates


def resolve_template(tokenizer: Any, requested: str, base_model: str) -> str:
    """The Jinja chat template to render with: ``requested`` (a built-in name or a file URI), else the tokenizer's."""
    if requested in BUILTIN_TEMPLATES:
        template = BUILTIN_TEMPLATES[requested]
        if requested == "chatml":
            missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
            if missing:
                raise UserError(
                    f"chat_template='chatml' needs the special tokens {missing} in base_model={base_model!r}'s "
                    "tokenizer; give a template file that uses the tokenizer's own markup"
                )
        return template
    if requested:
        try:
            return store.read_text(requested)
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as exc:
            raise UserError(
                f"chat_template={shown(requested)} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
                f"nor a readable Jinja file ({type(exc).__name__})"
            ) from None
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise UserError(
        f"base_model={base_model!r} has no chat template: set chat_template to a built-in "
        f"({', '.join(BUILTIN_TEMPLATES)}) or to the URI of a Jinja template file"
    )


def saved_template(adapter: Path) -> str | None:
    """The chat template an adapter was trained with (train_lora saves it beside the adapter), if any."""
    path = adapter / layout.CHAT_TEMPLATE
    return path.read_text(encoding="utf-8") if path.exists() else None


def is_template_uri(value: str) -> bool:
    """A chat_template setting that names a file (anything but empty or a built-in name)."""
    return bool(value) and value not in BUILTIN_TEMPLATES


ENCODE_BATCH = 1024  # conversations per tokenizer call in Renderer.examples


class Renderer:
    """Renders conversations with one template and tokenizer, and labels the assistant's tokens."""

    def __init__(self, tokenizer: Any, template: str, train_on: str = "assistant") -> None:
        if not tokenizer.is_fast:
            raise UserError("task=sft needs a fast (Rust) tokenizer, for the character offsets of its tokens")
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())

    def text(self, turns: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                turns, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # a Jinja error, or raise_exception() in the template itself
            raise UserError(f"the chat template failed on a conversation: {type(exc).__name__}: {exc}") from None

    def stop_ids(self) -> list[int]:
        """The tokens that end an assistant turn: the template's end-of-turn token (when its markup after the
        content starts with a special token, as ``<|im_end|>``, ``<|eot_id|>`` or ``<end_of_turn>`` do) and eos."""
        probe = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]
        full = self.text(probe)
        ((_, end, closed),) = self.assistant_spans(probe, full)
        closing = full[end:closed]
        stops = []
        if closing:
            first = self.tokenizer(closing, add_special_tokens=False)["input_ids"][:1]
            stops += [t for t in first if t in self.special]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in stops:
            stops.append(eos)
        return stops

    def prompt_ids(self, turns: list[dict[str, str]]) -> list[int]:
        """Token ids of ``turns`` followed by the template's generation prompt (for generating a reply)."""
        return self.encode(self.text(turns, add_generation_prompt=True))["input_ids"]

    def encode(self, text: str) -> dict[str, Any]:
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)

    def assistant_spans(self, turns: list[dict[str, str]], full: str) -> list[tuple[int, int, int]]:
        """Where each assistant turn is in ``full``: (content start, content end, end of the markup that closes
        the turn). The closing markup is what the template writes after the content whichever turn comes next
        (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...), trailing whitespace excluded."""
        spans, position = [], 0
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prefix = self.text(turns[:i], add_generation_prompt=True)
            content = turn["content"].strip()  # templates may trim the content
            search_from = max(position, len(prefix) if full.startswith(prefix) else position)
            start = full.find(content, search_from)
            if start < 0:
                raise UserError(
                    "the chat template produced no assistant span: an assistant turn's content is not in the "
                    f"rendered conversation (rendered: {shown(full)})"
                )
            end = start + len(content)
            through = full if i == len(turns) - 1 else self.text(turns[: i + 1])
            closing = _common_prefix(full[end:], through[end:]) if through[:end] == full[:end] else ""
            spans.append((start, end, end + len(closing.rstrip())))
            position = end
        return spans

    def example(self, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels of one conversation (checked with check_trainable first)."""
        full = self.text(turns)
        return self._labelled(turns, full, self.encode(full))

    def examples(self, conversations: list[list[dict[str, str]]]) -> list[tuple[list[int], list[int]]]:
        """``[example(turns) for turns in conversations]``, with one tokenizer call per batch of conversations
        (the Rust tokenizer spreads a batch over the cores) instead of one per conversation."""
        done = []
        for at in range(0, len(conversations), ENCODE_BATCH):
            batch = conversations[at : at + ENCODE_BATCH]
            texts = [self.text(turns) for turns in batch]
            encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            for k, (turns, full) in enumerate(zip(batch, texts, strict=True)):
                one = {"input_ids": encoded["input_ids"][k], "offset_mapping": encoded["offset_mapping"][k]}
                done.append(self._labelled(turns, full, one))
        return done

    def _labelled(self, turns: list[dict[str, str]], full: str, encoded: dict[str, Any]) -> tuple[list[int], list[int]]:
        ids = encoded["input_ids"]
        if self.train_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE] * len(ids)
            self._label_assistant(turns, full, encoded["offset_mapping"], ids, labels)
            if all(label == IGNORE for label in labels):
                raise UserError(f"the chat template produced no assistant tokens (rendered: {shown(full)})")
        if labels:
            labels[0] = IGNORE  # nothing predicts an example's first token (in a packed block: its neighbour would)
        return ids, labels

    def _label_assistant(self, turns, full: str, offsets, ids: list[int], labels: list[int]) -> None:
        """Label every token that overlaps an assistant content (a token may also hold the space before it),
        then the closing markup's tokens up to and including its first special token (the end of turn)."""
        j = 0
        for start, end, closed in self.assistant_spans(turns, full):
            while j < len(ids) and offsets[j][1] <= start:
                j += 1
            while j < len(ids) and offsets[j][0] < end:
                labels[j] = ids[j]
                j += 1
            while j < len(ids) and offsets[j][1] <= closed and offsets[j][1] > offsets[j][0]:
                labels[j] = ids[j]
                j += 1
                if ids[j - 1] in self.special:
                    break


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def canonical(turns: list[dict[str, str]]) -> str:
    """One string per distinct conversation (for deduplication)."""
    return json.dumps(turns, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Packing


@dataclass
class Blocks:
    """Fixed-length rows: token ids, labels and position ids (restarting at 0 for each example in a row)."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    padding: int  # pad tokens in all rows


def pack(examples: list[tuple[list[int], list[int]]], block_size: int, pad_id: int, packing: bool) -> Blocks:
    """Place examples (each at most ``block_size`` tokens) into rows of ``block_size``.

    Packed: best-fit decreasing (each example, longest first, goes into the fullest row it fits), so rows
    waste little; ties keep input order, so the result is deterministic. Unpacked: one example per row.
    Padding gets label IGNORE and position ids of its own run, so no real token attends to it.
    """
    rows: list[list[int]] = []  # example indices per row
    if packing:
        order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
        free: list[tuple[int, int]] = []  # (free tokens, row), sorted
        for i in order:
            need = len(examples[i][0])
            k = bisect.bisect_left(free, (need, -1))
            if k < len(free):
                space, row = free.pop(k)
                rows[row].append(i)
                bisect.insort(free, (space - need, row))
            else:
                rows.append([i])
                bisect.insort(free, (block_size - need, len(rows) - 1))
    else:
        rows = [[i] for i in range(len(examples))]
    input_ids = np.full((len(rows), block_size), pad_id, dtype=np.int32)
    labels = np.full((len(rows), block_size), IGNORE, dtype=np.int32)
    position_ids = np.zeros((len(rows), block_size), dtype=np.int32)
    padding = 0
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ids, labs = examples[i]
            input_ids[r, at : at + len(ids)] = ids
            labels[r, at : at + len(ids)] = labs
            position_ids[r, at : at + len(ids)] = np.arange(len(ids))
            at += len(ids)
        position_ids[r, at:] = np.arange(block_size - at)
        padding += block_size - at
    return Blocks(input_ids, labels, position_ids, padding)
