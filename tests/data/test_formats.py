"""File formats people already have (JSONL, gzip, JSON arrays, parquet, Arrow, datasets.save_to_disk folders, TRL
messages), read locally and from the loopback GCS server; dirty rows (nulls read as "", empty targets skipped and
reported, --strict errors) through ``percausal prepare``."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from percausal_jax import cli, storage
from percausal_jax.data.featurize import FeaturizeConfig, Featurizer
from percausal_jax.data.files import iter_rows, write_jsonl
from percausal_jax.data.pipeline import make_iterator, open_source
from percausal_jax.data.records import read_records
from percausal_jax.data.skips import SkipReport
from percausal_jax.errors import UserError
from tests.data.tokenizer_fixture import longlamp_rows, make_tokenizer, save_tokenizer
from tests.gcs import upload_tree

ROWS = longlamp_rows("val", 3)  # LongLaMP product_review rows: no id, user id in reviewerId
CANONICAL = [{"id": f"r{i}", "user_id": f"u{i}", "task": "LaMP-7", "input": f"Paraphrase: day {i}",
              "output": f"answer {i}", "profile": [{"text": f"old tweet {i}", "date": "2020-01-01"}]}
             for i in range(3)]
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
                          {"role": "assistant", "content": "A."}], "source": "chat-log"},
            {"messages": [{"role": "user", "content": "R?"}, {"role": "assistant", "content": "B."}]}]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def save_to_disk(rows, folder):
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def write_all_formats(d):
    """The same three canonical records in every supported format; returns {name: path}."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.jsonl").write_text(jsonl(CANONICAL))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(jsonl(CANONICAL))
    (d / "c.json").write_text(json.dumps(CANONICAL, indent=2))  # one JSON array, pretty-printed
    (d / "d.json").write_text(jsonl(CANONICAL))  # JSON lines under a .json name
    with gzip.open(d / "e.json.gz", "wt") as f:
        f.write(json.dumps(CANONICAL))
    pq.write_table(pa.Table.from_pylist(CANONICAL), d / "f.parquet")
    save_to_disk(CANONICAL, d / "g_dataset")
    with pa.ipc.new_stream(d / "h.arrow", pa.Table.from_pylist(CANONICAL).schema) as w:
        w.write_table(pa.Table.from_pylist(CANONICAL))
    return {p.name: p for p in sorted(d.iterdir())}


def test_every_format_reads_the_same_records(tmp_path):
    for name, path in write_all_formats(tmp_path).items():
        assert read_records(path) == CANONICAL, name


def test_every_format_reads_from_gcs(gcs, tmp_path):
    local = tmp_path / "src"
    names = write_all_formats(local)
    url = upload_tree(local, gcs.bucket() + "/data")
    for name in names:
        assert read_records(f"{url}/{name}") == CANONICAL, name
    with pytest.raises(UserError, match=r"gs://.*/data/missing\.jsonl: no such file"):
        read_records(f"{url}/missing.jsonl")


def test_json_and_gzip_errors_are_located(tmp_path):
    (tmp_path / "obj.json").write_text(json.dumps({"task": "LaMP_3", "golds": []}, indent=1))
    with pytest.raises(UserError, match=r"obj\.json: one JSON object .*not records; expected one JSON array"):
        read_records(tmp_path / "obj.json")
    (tmp_path / "arr.json").write_text(json.dumps([CANONICAL[0], 3]))
    with pytest.raises(UserError, match=r"arr\.json:2: expected a JSON object \(array element 2\), got number 3"):
        read_records(tmp_path / "arr.json")
    (tmp_path / "bad.json").write_text('[{"id": ')
    with pytest.raises(UserError, match=r"bad\.json: invalid JSON"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"bad\.jsonl\.gz: not a readable gzip file"):
        read_records(tmp_path / "bad.jsonl.gz")
    with gzip.open(tmp_path / "line.jsonl.gz", "wt") as f:
        f.write(json.dumps(CANONICAL[0]) + "\n{oops\n")
    with pytest.raises(UserError, match=r"line\.jsonl\.gz:2: invalid JSON"):
        read_records(tmp_path / "line.jsonl.gz")


def test_save_to_disk_folders_keep_shard_order_and_need_a_split(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    rows = longlamp_rows("train", 5)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "train"), num_shards=2)
    state = json.loads((tmp_path / "train" / "state.json").read_text())
    assert len(state["_data_files"]) == 2
    records = read_records(tmp_path / "train")
    assert [r["user_id"] for r in records] == [r["reviewerId"] for r in rows]  # shards in state.json order
    assert [r["id"] for r in records] == [f"train-{i}" for i in range(1, 6)]  # {folder}-{row}, across shards

    datasets.DatasetDict({"train": datasets.Dataset.from_list(CANONICAL[:2]),
                          "test": datasets.Dataset.from_list(CANONICAL[2:])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=r"dd: a DatasetDict folder \(datasets\.save_to_disk\) with splits train, "
                                        r"test; pass one split \(--split train, or the folder .*dd/train\)"):
        read_records(tmp_path / "dd")
    assert read_records(tmp_path / "dd" / "test") == CANONICAL[2:]
    with pytest.raises(UserError, match="not a datasets.save_to_disk folder"):
        read_records(tmp_path)  # a plain folder

    out = tmp_path / "p.jsonl"
    assert cli.main(["prepare", "--source", "jsonl", "--input", str(tmp_path / "dd"), "--split", "train",
                     "--out", str(out), "--retriever", "recency"]) == 0
    assert [r["id"] for r in read_records(out)] == ["r0", "r1"]
    assert cli.main(["prepare", "--source", "jsonl", "--input", str(tmp_path / "dd"), "--split", "val",
                     "--out", str(out)]) == 2


def test_trl_messages_rows_become_prompt_and_completion(tmp_path, capsys):
    path = tmp_path / "msgs.jsonl"
    path.write_text(jsonl(MESSAGES))
    first, second = read_records(path)
    assert first == {"source": "chat-log", "prompt": MESSAGES[0]["messages"][:2],
                     "completion": [MESSAGES[0]["messages"][2]]}
    assert second["prompt"] == [{"role": "user", "content": "R?"}]
    tok = make_tokenizer()
    texts, kept = Featurizer(tok, FeaturizeConfig(template="chat")).run(first)
    assert texts.completion == "A." and texts.prompt == texts.prompt_no_profile
    assert texts.prompt == tok.apply_chat_template(MESSAGES[0]["messages"][:2], tokenize=False,
                                                   add_generation_prompt=True)

    tok_dir = save_tokenizer(tmp_path / "tok")
    out = tmp_path / "out.jsonl"
    assert cli.main(["prepare", "--source", "jsonl", "--input", str(path), "--out", str(out), "--tokenizer",
                     str(tok_dir), "--template", "chat"]) == 0
    rows = read_records(out)
    assert [(r["id"], r["completion"], r["template"]) for r in rows] == [("msgs-1", "A.", "chat"),
                                                                         ("msgs-2", "B.", "chat")]
    assert rows[0]["source"] == "chat-log" and "messages" not in rows[0]
    assert rows[0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")

    # a messages file with an empty last turn: skipped, and the surviving row keeps its line-based id
    path.write_text(jsonl([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]},
                           *MESSAGES[1:]]))
    capsys.readouterr()
    assert cli.main(["prepare", "--source", "jsonl", "--input", str(path), "--out", str(out), "--tokenizer",
                     str(tok_dir), "--template", "chat"]) == 0
    assert [r["id"] for r in read_records(out)] == ["msgs-2"]
    assert "empty_completion        1  msgs.jsonl:1" in capsys.readouterr().out


DIRTY = [
    {**ROWS[0], "profile": [{k: v for k, v in ROWS[0]["profile"][0].items() if k != "summary"}]},  # no summary
    {**ROWS[1], "output": None},  # no target: skipped
    {**ROWS[2], "profile": [{**ROWS[2]["profile"][0], "summary": None}]},  # null summary
]


def test_dirty_rows_through_prepare_and_strict(tmp_path, capsys):
    path = tmp_path / "val.parquet"  # a null in parquet, as the HF release has them
    pq.write_table(pa.Table.from_pylist(DIRTY), path)
    out = tmp_path / "out.jsonl"
    assert cli.main(["prepare", "--source", "longlamp", "--input", str(path), "--out", str(out),
                     "--retriever", "recency"]) == 0
    rows = read_records(out)
    assert [r["id"] for r in rows] == ["val-1", "val-3"]
    assert '"" is summary for "It boils fast, review number 0."' in rows[0]["prompt"]  # the missing summary
    assert '"" is summary for "It boils fast, review number 2."' in rows[1]["prompt"]  # the null summary
    printed = capsys.readouterr().out
    assert "wrote 2 prompt records" in printed
    assert "kept 2, skipped 1\n  reason          count  first ids\n  empty_output        1  val-2\n" in printed

    assert cli.main(["prepare", "--source", "longlamp", "--input", str(path), "--out", str(tmp_path / "s.jsonl"),
                     "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: field 'output': expected a non-empty string, got null" in err and "strict" in err
    assert not (tmp_path / "s.jsonl").exists()


def test_everything_skipped_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "val.jsonl"
    path.write_text(jsonl([{**ROWS[0], "output": ""}, {**ROWS[1], "input": None}]))
    assert cli.main(["prepare", "--source", "jsonl", "--input", str(path), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "every row was skipped (empty_input 1: first val-2, empty_output 1: first val-1)" in err


def test_prepare_reads_from_and_writes_to_gcs(gcs, tmp_path, capsys):
    bucket = gcs.bucket()
    pq.write_table(pa.Table.from_pylist(DIRTY), tmp_path / "val.parquet")
    storage.path(f"{bucket}/raw/val.parquet").write_bytes((tmp_path / "val.parquet").read_bytes())
    out = f"{bucket}/prepared/val.jsonl"
    assert cli.main(["prepare", "--source", "longlamp", "--input", f"{bucket}/raw/val.parquet", "--out", out,
                     "--retriever", "recency"]) == 0
    assert gcs.objects(bucket) == ["prepared/val.jsonl", "raw/val.parquet"]
    assert [r["id"] for r in read_records(out)] == ["val-1", "val-3"]
    assert f"wrote 2 prompt records to {out}" in capsys.readouterr().out


def test_write_jsonl_to_gcs_is_whole_or_nothing(gcs):
    url = gcs.bucket() + "/out/rows.jsonl"

    def failing():
        yield CANONICAL[0]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_jsonl(url, failing())
    assert not storage.path(url).exists()
    assert write_jsonl(url, CANONICAL) == 3
    assert read_records(url) == CANONICAL


def test_pipeline_reads_gcs_files_and_reports_skips(gcs, tmp_path):
    url = gcs.bucket() + "/train.jsonl"
    storage.path(url).write_text(jsonl([*CANONICAL, {**CANONICAL[0], "id": "empty", "output": None}]))
    report = SkipReport()
    assert len(open_source(url, report=report)) == 3
    assert (report.kept, report.counts, report.first) == (3, {"empty_output": 1}, {"empty_output": ["empty"]})
    with pytest.raises(UserError, match=r"train\.jsonl:4: field 'output'"):
        open_source(url, strict=True)
    cfg = FeaturizeConfig(retriever="recency", k=1, max_prompt_len=64, max_response_len=16)
    report = SkipReport()
    it = make_iterator(url, make_tokenizer(), cfg, batch_size=4, seed=0, num_epochs=1, shuffle=False,
                       bucket_multiple=16, report=report)
    assert sum(1 for _ in it) == 1 and it.featurize_stats.kept == 3 and report.counts == {"empty_output": 1}
    with pytest.raises(UserError, match="strict"):
        make_iterator(url, make_tokenizer(), cfg, batch_size=4, seed=0, strict=True)


def test_iter_rows_numbers_rows_of_json_arrays(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert list(iter_rows(tmp_path / "q.json")) == [(1, {"a": 1}), (2, {"a": 2})]
