"""What the stages that load a model agree on, checked without loading one (stages/core/models.py).

    .venv/bin/python -m pytest tests/test_models.py
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
