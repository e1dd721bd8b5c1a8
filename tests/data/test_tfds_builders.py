"""TFDS builders: tiny raw files in the real schemas → ArrayRecord → read back (data source and pipeline)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from percausal_jax.data.featurize import FeaturizeConfig
from percausal_jax.data.pipeline import make_iterator
from percausal_jax.data.records import read_records
from percausal_jax.data.tfds_builders import Lamp, LongLamp, prepare
from percausal_jax.errors import UserError
from tests.data.tokenizer_fixture import longlamp_rows, make_tokenizer, write_lamp, write_longlamp


def decoded(source) -> list[dict]:
    return [json.loads(source[i]["record"]) for i in range(len(source))]


def test_longlamp_round_trips_canonical_records_and_feeds_the_pipeline(tmp_path):
    raw = write_longlamp(tmp_path / "raw", {"train": 3, "val": 2})
    builder = prepare(LongLamp, "product_review_user", manual_dir=raw, data_dir=tmp_path / "tfds")
    sources = tfds.data_source("longlamp/product_review_user", data_dir=str(tmp_path / "tfds"))
    assert sorted(sources) == ["train", "val"]
    val = decoded(sources["val"])
    assert val == read_records(raw / "product_review_user" / "val-00000-of-00001.parquet")
    assert [r["id"] for r in val] == ["val-00000-of-00001-1", "val-00000-of-00001-2"]
    assert val[1]["profile"] == longlamp_rows("val", 2)[1]["profile"]  # profile items kept, in order
    assert {r["task"] for r in val} == {"product_review"} and val[0]["user_id"] == "Aval0"

    cfg = FeaturizeConfig(retriever="recency", k=2, max_prompt_len=512, max_response_len=64)
    it = make_iterator(builder.as_data_source()["train"], make_tokenizer(), cfg, batch_size=4, seed=0,
                       num_epochs=1)
    (batch,) = list(it)
    assert batch.response.seq_weight.sum() == pytest.approx(3.0)  # three sequences, one per record
    assert it.featurize_stats.kept == 3


def test_longlamp_finds_the_datasets_server_layout(tmp_path):
    folder = tmp_path / "raw" / "topic_writing_user" / "test"
    folder.mkdir(parents=True)
    rows = [{"author": "bob", "input": "Generate the content for a reddit post about tea.", "output": "Tea is life.",
             "profile": [{"author": "bob", "content": "Coffee is fine.", "id": "x1", "summary": "coffee"}]}]
    pq.write_table(pa.Table.from_pylist(rows), folder / "0000.parquet")
    builder = prepare(LongLamp, "topic_writing_user", manual_dir=tmp_path / "raw", data_dir=tmp_path / "tfds")
    (record,) = decoded(builder.as_data_source()["test"])
    assert (record["id"], record["user_id"], record["task"]) == ("0000-1", "bob", "topic_writing")


def test_lamp_merges_outputs_and_keeps_test_questions_without_targets(tmp_path):
    write_lamp(tmp_path / "raw" / "dev", "dev", 3)
    write_lamp(tmp_path / "raw", "test", 2, with_outputs=False)
    builder = prepare(Lamp, "LaMP-3", manual_dir=tmp_path / "raw", data_dir=tmp_path / "tfds")
    sources = tfds.data_source("lamp/LaMP-3", data_dir=str(tmp_path / "tfds"))
    assert sorted(sources) == ["dev", "test"]
    dev = decoded(sources["dev"])
    assert [(r["id"], r["user_id"], r["task"], r["output"]) for r in dev] == [
        ("dev0", "dev0", "LaMP-3", "1"), ("dev1", "dev1", "LaMP-3", "2"), ("dev2", "dev2", "LaMP-3", "3")]
    assert dev[2]["profile"][2] == {"id": "dev2-2", "text": "Old review 2 about mugs.", "score": "3"}
    assert all("output" not in r for r in decoded(builder.as_data_source()["test"]))


def test_builder_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no such folder; expected the folder of raw longlamp files"):
        prepare(LongLamp, "product_review_user", manual_dir=tmp_path / "nope", data_dir=tmp_path / "tfds")
    with pytest.raises(UserError, match=r"longlamp config 'product_review': expected one of \["):
        prepare(LongLamp, "product_review", manual_dir=tmp_path, data_dir=tmp_path / "tfds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="manual dir: Manual directory .* does not exist or is empty"):
        prepare(LongLamp, "product_review_user", manual_dir=tmp_path / "empty", data_dir=tmp_path / "tfds")
    (tmp_path / "empty" / "README.md").write_text("nothing here")
    with pytest.raises(UserError, match="no LongLaMP parquet files for splits"):
        prepare(LongLamp, "product_review_user", manual_dir=tmp_path / "empty", data_dir=tmp_path / "tfds")
    with pytest.raises(UserError, match="no LaMP files; expected"):
        prepare(Lamp, "LaMP-3", manual_dir=tmp_path / "empty", data_dir=tmp_path / "tfds")
    write_lamp(tmp_path / "lamp3", "dev", 2)
    with pytest.raises(UserError, match=r"dev_outputs.json: field 'task': the file is for LaMP-3, but LaMP-4"):
        prepare(Lamp, "LaMP-4", manual_dir=tmp_path / "lamp3", data_dir=tmp_path / "tfds")
