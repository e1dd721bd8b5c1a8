"""Shared fixtures for the training tests: a tiny model directory with a tokenizer, and 4 short prompt records."""

import json

import pytest

from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.common import RECORDS

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    model_dir = d / "model"
    tiny_hf_model("llama", model_dir)
    tiny_tokenizer(model_dir)
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return model_dir, data


