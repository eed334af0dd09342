"""task=sft labels: the Renderer's fast paths give exactly the labels of the prefix method, on every family.

The Renderer renders a conversation with the compiled template straight (not through
``apply_chat_template``), tokenizes with the Rust tokenizer straight, and, for a template with generation
marks (``{% generation %}``), takes each assistant turn's place from the marks of one render instead of
rendering the conversation's prefixes. ``reference`` below is the prefix method as it was before those
paths (``apply_chat_template`` for every render, the tokenizer's own call, token by token labelling); every
family's template, plain and with marks, gives the same token ids and labels through both, on multi-turn
conversations with system turns, unicode, empty and space-padded assistant turns and repeated text.
"""

from __future__ import annotations

import pytest

from stages.core import chat
from stages.core.errors import UserError
from tests import families

# The tokenize_sft benchmark's template (bench.common.SFT_TEMPLATE): ChatML with marks, written differently.
BENCH_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The generation marks put into each family's template around the assistant's content and end-of-turn markup
# (what the family's own text becomes for an assistant turn); the marked template renders the same text.
ASSISTANT_ONLY = "{% if message['role'] == 'assistant' %}{% generation %}X{% endgeneration %}{% else %}X{% endif %}"
MARKED = {
    "llama": ("{{ message['content'] | trim }}<|eot_id|>", ASSISTANT_ONLY),
    "qwen2": ("{{ message['content'] }}<|im_end|>\n", ASSISTANT_ONLY + "{{ '\\n' }}"),
    "qwen2_moe": ("{{ message['content'] }}<|im_end|>\n", ASSISTANT_ONLY + "{{ '\\n' }}"),
    "mistral": ("{{ message['content'] }}{{ eos_token }}", "{% generation %}X{% endgeneration %}"),
    "gemma2": ("{{ message['content'] | trim }}<end_of_turn>\n", ASSISTANT_ONLY + "{{ '\\n' }}"),
    "phi3": ("{{ message['content'] }}<|end|>\n", ASSISTANT_ONLY + "{{ '\\n' }}"),
    "gpt2": (
        "{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}",
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}"
        "{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}",
    ),
}


def marked(name: str) -> str:
    family = families.FAMILIES[name]
    template = family.template or family.template_file
    old, new = MARKED[name]
    assert template.count(old) == 1, name
    return template.replace(old, new.replace("X", old.removesuffix("\n")))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


EDGE = [
    [system("You are terse."), user("Card 1: spell alpha backwards."), assistant("ahpla")],
    [system("Be kind."), user("Hi"), assistant("Hello."), user("Again?"), assistant("Again."), user("x"),
     assistant("y"), user("z"), assistant("done")],
    [user("Ünïcödé: café — 日本語 🙂"), assistant("Ça va — 🙂 très bien, 日本")],
    [user("e\u0301 combining"), assistant("n\u0303o\u0308 and 𝔘𝔫𝔦")],
    [user("Say nothing"), assistant(""), user("Now say it"), assistant("it")],
    [user("Say nothing at the end"), assistant("  ")],
    [user("pad"), assistant("   spaced out   \n\n"), user("more"), assistant("\tok\t")],
    [user("echo"), assistant("echo"), user("echo"), assistant("echo")],
    [user("assistant"), assistant("assistant")],
    [user("lines"), assistant("one\n\ntwo\nthree\n")],
    [user("tokens"), assistant("a <|im_end|> b <|eot_id|> c </s> d <end_of_turn> e <|end|> f")],
    [user("only one"), assistant("one")],
]  # fmt: skip


def conversations() -> list[list[dict]]:
    return [r["messages"] for r in families.conversations(24, seed=3)] + EDGE


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    corpus = [t["content"] for r in families.conversations(48) for t in r["messages"]]
    root = tmp_path_factory.mktemp("render_families")
    return {
        name: AutoTokenizer.from_pretrained(families.build(family, root / name, corpus))
        for name, family in families.FAMILIES.items()
    }


def reference(tokenizer, template: str, turns: list[dict], train_on: str = "assistant") -> tuple[list, list]:
    """The prefix method, as the Renderer labelled before its fast paths."""

    def text(part, add_generation_prompt=False):
        try:
            return tokenizer.apply_chat_template(
                part, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:
            raise UserError(f"the chat template failed on a conversation: {type(exc).__name__}: {exc}") from None

    full = text(turns)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if train_on == "all":
        labels = list(ids)
    else:
        spans, position = [], 0
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prefix = text(turns[:i], add_generation_prompt=True)
            content = turn["content"].strip()
            start = full.find(content, max(position, len(prefix) if full.startswith(prefix) else position))
            if start < 0:
                raise UserError("the chat template produced no assistant span")
            end = start + len(content)
            through = full if i == len(turns) - 1 else text(turns[: i + 1])
            closing = ""
            if through[:end] == full[:end]:
                n = 0
                while n < min(len(full), len(through)) - end and full[end + n] == through[end + n]:
                    n += 1
                closing = full[end : end + n]
            spans.append((start, end, end + len(closing.rstrip())))
            position = end
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        labels, j = [chat.IGNORE] * len(ids), 0
        for start, end, closed in spans:
            while j < len(ids) and offsets[j][1] <= start:
                j += 1
            while j < len(ids) and offsets[j][0] < end:
                labels[j] = ids[j]
                j += 1
            while j < len(ids) and offsets[j][1] <= closed and offsets[j][1] > offsets[j][0]:
                labels[j] = ids[j]
                j += 1
                if ids[j - 1] in special:
                    break
        if all(label == chat.IGNORE for label in labels):
            raise UserError("the chat template produced no assistant tokens")
    if labels:
        labels[0] = chat.IGNORE
    return ids, labels


def outcome(call):
    try:
        return call()
    except UserError as exc:
        return str(exc).split(" (rendered")[0]


def rendered(tokenizer, template: str, turns: list[dict], prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def assert_same_as_reference(tokenizer, template: str, fast_template: str | None = None, train_on="assistant"):
    """Every conversation alone (errors included), then the ones that render all in one call, give the
    reference's ids and labels; returns the renderer that labelled them all."""
    every = conversations()
    fast = chat.Renderer(tokenizer, fast_template or template, train_on)
    expected = [outcome(lambda t=turns: reference(tokenizer, template, t, train_on)) for turns in every]
    assert [outcome(lambda t=turns: fast.example(t)) for turns in every] == expected
    good = [turns for turns, e in zip(every, expected, strict=True) if isinstance(e, tuple)]
    assert len(good) >= len(families.conversations(24)), "most conversations label"
    batched = chat.Renderer(tokenizer, fast_template or template, train_on)
    assert batched.examples(good) == [e for e in expected if isinstance(e, tuple)]
    return batched


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_each_family_template_labels_as_the_prefix_method(name, tokenizers):
    family = families.FAMILIES[name]
    template = family.template or family.template_file
    renderer = assert_same_as_reference(tokenizers[name], template)
    assert renderer._compiled is not None  # rendered without apply_chat_template
    assert (renderer._marked is not None) == (template in chat.MARKED_TWINS)  # ChatML: its marked twin


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_each_family_template_with_generation_marks_labels_from_one_render(name, tokenizers, monkeypatch):
    monkeypatch.setattr(chat, "MARKS_CHECKED", 2)  # trust the marks after two conversations agree
    family = families.FAMILIES[name]
    tokenizer, template = tokenizers[name], marked(name)
    plain = family.template or family.template_file
    for turns in conversations():  # the marks change nothing in the text
        assert rendered(tokenizer, template, turns) == rendered(tokenizer, plain, turns)
    renderer = assert_same_as_reference(tokenizer, plain, template)
    assert renderer._marks_trusted is True  # the marks labelled, the prefixes were not rendered
    assert_same_as_reference(tokenizer, template)


def test_the_built_in_chatml_renders_as_its_marked_twin(tokenizers, monkeypatch):
    monkeypatch.setattr(chat, "MARKS_CHECKED", 2)
    tokenizer = tokenizers["qwen2"]
    for turns in conversations():
        for prompt in (False, True):
            assert rendered(tokenizer, chat.CHATML, turns, prompt) == rendered(
                tokenizer, chat.CHATML_MARKED, turns, prompt
            )
    assert assert_same_as_reference(tokenizer, chat.CHATML)._marks_trusted is True
    assert assert_same_as_reference(tokenizer, BENCH_TEMPLATE)._marks_trusted is True  # the benchmark's template
    assert_same_as_reference(tokenizer, chat.CHATML, train_on="all")


def test_marks_that_do_not_hold_the_end_of_turn_leave_the_labels_to_the_prefixes(tokenizers, monkeypatch):
    monkeypatch.setattr(chat, "MARKS_CHECKED", 2)
    tokenizer = tokenizers["qwen2"]
    only_content = chat.CHATML_MARKED.replace("<|im_end|>{% endgeneration %}", "{% endgeneration %}<|im_end|>")
    assert assert_same_as_reference(tokenizer, chat.CHATML, only_content)._marks_trusted is False


def test_a_tokenizer_set_to_truncate_is_called_as_before(tokenizers):
    tokenizer = tokenizers["llama"]
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    try:
        assert_same_as_reference(tokenizer, families.LLAMA3)
    finally:
        tokenizer.backend_tokenizer.no_truncation()
