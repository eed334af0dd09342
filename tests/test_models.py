"""What the stages that load a model agree on, checked without loading one (stages/core/models.py).

    .venv/bin/python -m pytest tests/test_models.py

Fakes stand in for model configs and tokenizers: the rules are about attributes, not weights.
"""

from __future__ import annotations

import os

import pytest

from stages.core import models
from stages.core.errors import ConfigError, UserError


class TestCheckBaseModel:
    def test_a_hub_id_is_kept_as_given(self):
        assert models.check_base_model("org/model-7b") == "org/model-7b"

    def test_a_plain_path_becomes_a_file_uri(self, tmp_path):
        assert models.check_base_model(str(tmp_path / "model")) == f"file://{tmp_path}/model"
        assert models.check_base_model("./model") == "file://" + os.path.abspath("model")

    def test_a_uri_is_kept(self):
        assert models.check_base_model("s3://bucket/models/base") == "s3://bucket/models/base"

    def test_empty_is_refused_naming_the_field(self):
        with pytest.raises(ConfigError, match="base_model is required"):
            models.check_base_model("")

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("ftp://host/model", "base_model='ftp://host/model' uses scheme 'ftp'"),
            ("s3://key:secret@bucket/model", "base_model='s3://***@bucket/model' carries credentials"),
        ],
    )
    def test_a_bad_uri_is_refused_naming_the_field_and_value(self, value, message):
        with pytest.raises(UserError) as exc:
            models.check_base_model(value)
        assert message in str(exc.value)


class FakeConfig:
    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


class FakeTokenizer:
    def __init__(self, model_max_length: int) -> None:
        self.model_max_length = model_max_length


class TestContextLength:
    @pytest.mark.parametrize("attr", models.CONTEXT_ATTRS)
    def test_each_config_attribute_is_a_source(self, attr):
        assert models.context_length(FakeConfig(**{attr: 512})) == 512

    def test_the_config_attributes_are_read_in_lm_evals_order(self):
        config = FakeConfig(n_ctx=1024, max_position_embeddings=2048, n_positions=4096)
        assert models.context_length(config) == 4096
        assert models.context_length(FakeConfig(n_ctx=1024, max_position_embeddings=2048)) == 2048

    def test_a_multimodal_config_is_read_through_its_text_config(self):
        config = FakeConfig(text_config=FakeConfig(max_position_embeddings=8192), max_position_embeddings=4)
        assert models.context_length(config) == 8192

    def test_the_config_comes_before_the_tokenizer(self):
        assert models.context_length(FakeConfig(max_position_embeddings=256), FakeTokenizer(1024)) == 256

    @pytest.mark.parametrize("unset", [None, 0])
    def test_an_unset_config_attribute_is_skipped(self, unset):
        config = FakeConfig(n_positions=unset, max_position_embeddings=300)
        assert models.context_length(config) == 300
        assert models.context_length(FakeConfig(max_position_embeddings=unset), FakeTokenizer(64)) == 64

    def test_the_tokenizer_is_the_source_when_the_config_has_none(self):
        assert models.context_length(FakeConfig(hidden_size=64), FakeTokenizer(1024)) == 1024
        assert models.context_length(None, FakeTokenizer(1024)) == 1024

    def test_transformers_unset_sentinel_is_unknown(self):
        from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

        assert models.UNSET_MODEL_MAX_LENGTH == VERY_LARGE_INTEGER
        assert models.context_length(FakeConfig(), FakeTokenizer(VERY_LARGE_INTEGER)) is None

    def test_unknown_when_neither_says(self):
        assert models.context_length(FakeConfig()) is None
        assert models.context_length(FakeConfig(), None) is None
        assert models.context_length(FakeConfig(), FakeTokenizer(0)) is None

    def test_a_real_transformers_config_and_tokenizer(self, tmp_path):
        """As the stages load them: AutoConfig from a saved folder, a tokenizer that nothing gave a limit."""
        from tokenizers import Tokenizer
        from tokenizers import models as tokenizer_models
        from transformers import AutoConfig, LlamaConfig, PreTrainedTokenizerFast

        LlamaConfig(max_position_embeddings=128).save_pretrained(tmp_path)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tokenizer_models.BPE()))
        assert models.context_length(AutoConfig.from_pretrained(tmp_path), tokenizer) == 128
        assert models.context_length(None, tokenizer) is None  # a tokenizer saved without a limit
