"""Chat data for supervised fine-tuning: conversations, chat templates, assistant-only labels and packing.

A conversation is a list of ``{"role", "content"}`` turns (system, user, assistant). It is rendered with a
chat template (the tokenizer's own, a Jinja file, or a built-in one for base models that have none) and
tokenized once; the labels are the token ids where the assistant speaks (its content and the end-of-turn
markup right after it, so that the model learns to stop) and ``IGNORE`` everywhere else. Where each assistant
turn is comes from rendering the conversation's prefixes, or, for a template with generation marks
(``{% generation %}``, as TRL's ``assistant_only_loss`` reads them; the built-in templates are rendered
with marked twins), from the marks of the one render, which label the same tokens. Packing places
several examples in one block with position ids that restart at 0 for each, which keeps attention inside
each example (``transformers`` builds the block-diagonal mask from the position ids when no attention
mask is given) and the loss of a block equal to the sum of its examples' losses.

Used by tokenize (render, label, pack), evaluate and batch_infer (prompts with the generation prompt).
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import re
from concurrent.futures import Future, ThreadPoolExecutor
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


ENCODE_BATCH = 256  # conversations per tokenizer call in Renderer.examples
MARKS_CHECKED = 64  # conversations labelled both ways before a template's generation marks are trusted

# The generation marks (``{% generation %}...{% endgeneration %}``, as transformers and TRL read them) around
# each assistant turn's content and end-of-turn markup: a template that has them is rendered once per
# conversation, the marks giving each assistant turn's place, instead of once per assistant turn more (the
# prefixes). A built-in template is rendered with its marked twin, which renders the same text.
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
CHATML_MARKED = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ message['content'] }}"
    "<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKED_TWINS = {CHATML: CHATML_MARKED}


def _compiler():
    """transformers' cached compiler of chat templates (its sandbox, filters and generation marks), or None where
    it is not there (then every conversation goes through ``apply_chat_template``)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template


def _plain(turns: list[dict[str, str]]) -> bool:
    """Turns that ``apply_chat_template`` hands to the template as they are (it copies them, drops None values and
    aliases reasoning fields; none of which changes turns of only a string role and content)."""
    return bool(turns) and all(type(t) is dict and len(t) == 2 and type(t.get("role")) is str
                               and type(t.get("content")) is str for t in turns)  # fmt: skip


class Renderer:
    """Renders conversations with one template and tokenizer, and labels the assistant's tokens."""

    def __init__(self, tokenizer: Any, template: str, train_on: str = "assistant") -> None:
        if not tokenizer.is_fast:
            raise UserError("task=sft needs a fast (Rust) tokenizer, for the character offsets of its tokens")
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        # What apply_chat_template would do per call, done once: the template compiled, its variables.
        self._variables = {"tools": None, "documents": None, **dict(tokenizer.special_tokens_map)}
        self._compiled = self._marked = None
        compiler = _compiler()
        if compiler is not None:
            try:
                source = tokenizer.get_chat_template(template)
                self._compiled = compiler(source)
                marked = MARKED_TWINS.get(source, source)
                if GENERATION_TAG.search(marked) and hasattr(self._compiled.environment, "activate_tracker"):
                    self._marked = compiler(marked)
            except Exception:  # a template that does not compile fails in text(), with its own message
                self._compiled = self._marked = None
        self._marks_trusted: bool | None = None  # None: not checked yet
        self._marks_checked = 0

    def text(self, turns: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            if self._compiled is not None and _plain(turns):
                return self._compiled.render(
                    messages=turns, add_generation_prompt=add_generation_prompt, **self._variables
                )
            return self.tokenizer.apply_chat_template(
                turns, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # a Jinja error, or raise_exception() in the template itself
            raise UserError(f"the chat template failed on a conversation: {type(exc).__name__}: {exc}") from None

    def _marked_text(self, turns: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation rendered with the marked template, and where each generation mark's text is in it."""
        if not _plain(turns):
            return self.text(turns), []
        blocks: list[str] = []
        marks: list[tuple[int, int]] = []
        try:
            with self._marked.environment.activate_tracker(blocks, marks):
                for block in self._marked.generate(messages=turns, add_generation_prompt=False, **self._variables):
                    blocks.append(block)
        except Exception as exc:
            raise UserError(f"the chat template failed on a conversation: {type(exc).__name__}: {exc}") from None
        return "".join(blocks), marks

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

    def _encode_batch(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(token ids, character offsets) of each text: what ``tokenizer(texts, add_special_tokens=False,
        return_offsets_mapping=True)`` returns, from the Rust tokenizer straight (that call converts every
        encoding to a dict of lists); through the call where the Rust tokenizer is set to truncate or pad."""
        backend = self.tokenizer.backend_tokenizer
        if (
            backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))
        ):
            return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))

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

    @staticmethod
    def marked_spans(
        turns: list[dict[str, str]], full: str, marks: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]] | None:
        """assistant_spans from the generation marks of one render: each assistant turn's content is found inside
        its mark, and the rest of the mark (trailing whitespace excluded) is the closing markup. None where the
        marks do not hold the assistant turns one each, or where the two could differ (then the prefixes decide)."""
        contents = [t["content"].strip() for t in turns if t["role"] == "assistant"]
        if len(marks) != len(contents):
            return None
        spans, position = [], 0
        for content, (mark_start, mark_end) in zip(contents, marks, strict=True):
            # The prefixes search from the end of the generation prompt, which may be before the mark (a space
            # between them): an empty content, or one found there too, is left to them.
            if not content or full.find(content, position, mark_start + len(content) - 1) >= 0:
                return None
            start = full.find(content, max(position, mark_start), mark_end)
            if start < 0:
                return None
            end = start + len(content)
            spans.append((start, end, end + len(full[end:mark_end].rstrip())))
            position = end
        return spans

    def example(self, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels of one conversation (checked with check_trainable first)."""
        return self.examples([turns])[0]

    def examples(self, conversations: list[list[dict[str, str]]]) -> list[tuple[list[int], list[int]]]:
        """``[example(turns) for turns in conversations]``, with one tokenizer call per batch of conversations
        (the Rust tokenizer spreads a batch over the cores) instead of one per conversation. A batch is
        tokenized on a worker thread (the Rust call releases the GIL) while the next one is rendered and the
        one before labelled; labelling stays in input order."""
        done: list[tuple[list[int], list[int]]] = []
        marked = self._marked is not None and self.train_on != "all"
        one_batch = len(conversations) <= ENCODE_BATCH  # nothing to overlap: tokenized on this thread
        with contextlib.nullcontext(_Inline()) if one_batch else ThreadPoolExecutor(1, "sft-tokenize") as pool:
            previous = None
            for at in range(0, len(conversations), ENCODE_BATCH):
                batch = conversations[at : at + ENCODE_BATCH]
                if marked:
                    texts, marks = map(list, zip(*[self._marked_text(turns) for turns in batch], strict=True))
                else:
                    texts, marks = [self.text(turns) for turns in batch], [None] * len(batch)
                current = (batch, texts, marks, pool.submit(self._encode_batch, texts))
                if previous is not None:
                    done += self._labelled(*previous)
                previous = current
            if previous is not None:
                done += self._labelled(*previous)
        return done

    def _labelled(self, batch, texts: list[str], marks: list, encoding: Future) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels of each conversation of a batch, once its tokenizer call is done."""
        done = []
        for turns, full, (ids, offsets), marked_at in zip(batch, texts, encoding.result(), marks, strict=True):
            if self.train_on == "all":
                labels = list(ids)
            else:
                labels = self._assistant_labels(turns, full, marked_at, ids, offsets)
                if labels.count(IGNORE) == len(labels):
                    raise UserError(f"the chat template produced no assistant tokens (rendered: {shown(full)})")
            if labels:  # nothing predicts an example's first token (in a packed block: its neighbour would)
                labels[0] = IGNORE
            done.append((ids, labels))
        return done

    def _assistant_labels(self, turns, full: str, marks, ids: list[int], offsets) -> list[int]:
        """The labels of the assistant's tokens, from the generation marks where the template has them and they
        are trusted, else from the prefixes. The first MARKS_CHECKED conversations are labelled both ways: where
        the two differ (marks that do not sit around the content and its end-of-turn markup), the prefixes
        label, this conversation and every one after."""
        spans = None if marks is None or self._marks_trusted is False else self.marked_spans(turns, full, marks)
        labels = [IGNORE] * len(ids)
        self._label_assistant(spans or self.assistant_spans(turns, full), offsets, ids, labels)
        if spans is not None and self._marks_trusted is None:
            reference = [IGNORE] * len(ids)
            self._label_assistant(self.assistant_spans(turns, full), offsets, ids, reference)
            if reference != labels:
                self._marks_trusted = False
                return reference
            self._marks_checked += 1
            self._marks_trusted = True if self._marks_checked >= MARKS_CHECKED else None
        return labels

    def _label_assistant(self, spans, offsets, ids: list[int], labels: list[int]) -> None:
        """Label every token that overlaps an assistant content (a token may also hold the space before it),
        then the closing markup's tokens up to and including its first special token (the end of turn)."""
        starts, ends = zip(*offsets, strict=True) if offsets else ((), ())
        if not (all(map(operator.le, starts, starts[1:])) and all(map(operator.le, ends, ends[1:]))):
            starts = ends = None  # offsets out of order: token by token
        j = 0
        for start, end, closed in spans:
            if ends is not None:  # the first token that ends after ``start``, the first that starts at ``end``
                j = bisect.bisect_right(ends, start, j)
                k = bisect.bisect_left(starts, end, j)
                labels[j:k] = ids[j:k]
                j = k
            else:
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


class _Inline:
    """``submit`` of an executor that runs the call at once, on the calling thread."""

    @staticmethod
    def submit(fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def canonical(turns: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    """One key per distinct conversation (for deduplication in memory), made of the turns' own strings (no
    copy of the text): what :func:`conversation` makes of a record is its role and content per turn."""
    return tuple((turn["role"], turn["content"]) for turn in turns)


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
