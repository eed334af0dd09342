"""Every field of every stage config, fed generated hostile values of every kind (property-based).

The contract for any value: the config is built, or it is refused with a user error (exit 2 in a stage
process) whose one line names the field, is short, and comes quickly. Never another exception (a
traceback, exit 1), never a message that echoes a megabyte, never a hang. Hypothesis draws the values
(huge and negative numbers, NaN and infinities, other scripts' digits, control characters, surrogates,
very long strings, URIs with credentials, lists, mappings, None) from a fixed seed and a fixed budget.
Through a stage process (exit 2, one ``error:`` line, nothing committed) the same contract is checked
in tests/test_contract.py for the values that once broke it.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from stages.core.config import build_config
from stages.core.errors import UserError
from stages.core.runner import StageConfig

STAGES = ["tokenize", "train_lora", "evaluate", "batch_infer", "base_model", "merge_predictions", "publish"]
# The least each stage needs besides the field under test (every other field keeps its default).
REQUIRED = {
    "input_uri": "/data/docs.jsonl",
    "base_model": "org/model",
    "corpus_uri": "/data/corpus",
    "prompts_uri": "/data/prompts.jsonl",
    "model_name": "model",
}
MAX_MESSAGE = 600  # characters of one error line
EXAMPLES_PER_FIELD = 40
TRIED = {"examples": 0, "refused": 0}


def config_class(stage: str) -> type:
    module = importlib.import_module(f"stages.{stage}")
    return next(
        c for c in vars(module).values() if isinstance(c, type) and issubclass(c, StageConfig) and c is not StageConfig
    )


@pytest.fixture(scope="module", autouse=True)
def tally():
    """The count docs/reliability.md reports: generated hostile values tried, and refused with a user error."""
    yield
    print(f"\nhostile config values: {TRIED['examples']} tried, {TRIED['refused']} refused with a user error")


FIELDS = [(stage, f.name) for stage in STAGES for f in dataclasses.fields(config_class(stage))]

text = st.text(st.characters(codec="utf-8"), max_size=40) | st.text(max_size=40)  # the second: lone surrogates too
numbers_as_text = st.sampled_from(
    ["-1", "0", "1e308", "1e-320", "nan", "-inf", "1_000", "0x10", "٣", "１２", "9" * 5000, "1.5", " 7 ", ""]
)
uris = st.sampled_from(
    [
        "s3://user:secret@bucket/k",
        "https://bucket/x?X-Amz-Signature=abc",
        "file:///etc/passwd",
        "/",
        "memory://x",
        "ftp://host/x",
        "../../etc",
        "a" * 5000,
        "s3://" + "b" * 1_000_000,
        "gs://bucket/" + "\x00",
    ]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | text
    | numbers_as_text
    | uris
)
hostile = scalars | st.lists(scalars, max_size=4) | st.dictionaries(text, scalars, max_size=3)


@pytest.mark.parametrize(("stage", "field"), FIELDS, ids=[f"{s}.{f}" for s, f in FIELDS])
def test_any_value_of_any_field_is_taken_or_refused_in_one_short_line_naming_the_field(stage, field):
    cls = config_class(stage)
    names = {f.name for f in dataclasses.fields(cls)}
    required = {k: v for k, v in REQUIRED.items() if k in names and k != field}

    @seed(20261130)
    @settings(
        max_examples=EXAMPLES_PER_FIELD,
        deadline=2000,  # milliseconds per value: a quadratic check of a megabyte would blow it
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(value=hostile)
    def check(value):
        TRIED["examples"] += 1
        try:
            build_config(cls, {**required, field: value})
        except UserError as exc:
            TRIED["refused"] += 1
            message = str(exc)
            assert field in message, message[:300]
            assert len(message) <= MAX_MESSAGE and "\n" not in message, message[:300]

    check()
