"""Raw releases where people keep them: the hub layouts (``{config}/{split}-0000k-of-0000n.parquet``) from a
local snapshot, from a hub id through an offline hub cache, and from gs://; LaMP and DPL folders and hub ids;
``--tokenizer`` / ``--contriever`` hub ids. Nothing reaches the network (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import hub_snapshot

from percausal_jax import cli
from percausal_jax.data import sources
from percausal_jax.data.records import read_records
from percausal_jax.data.skips import SkipReport
from percausal_jax.data.retrieval import Contriever
from percausal_jax.errors import UserError
from tests.data.tokenizer_fixture import longlamp_rows, save_tokenizer, write_amazon, write_lamp
from tests.gcs import upload_tree

REPO = Path(__file__).resolve().parents[2]
REV = "c" * 40


def parquet(rows, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def longlamp_snapshot(root: Path) -> Path:
    """Two configs; product_review_user's train split in two shards, plus a val split."""
    train = longlamp_rows("train", 5)
    folder = root / "product_review_user"
    parquet(train[:3], folder / "train-00000-of-00002.parquet")
    parquet(train[3:], folder / "train-00001-of-00002.parquet")
    parquet(longlamp_rows("val", 2), folder / "val-00000-of-00001.parquet")
    abstracts = [{"name": "N0", "input": "Generate an abstract for the title 'On kettles'.", "output": "We study.",
                  "profile": [{"title": "Old", "abstract": "Earlier work."}]}]
    parquet(abstracts, root / "abstract_generation_user" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text("# LongLaMP\n")
    return root


EXPECTED_IDS = [f"train-00000-of-00002-{i}" for i in (1, 2, 3)] + [f"train-00001-of-00002-{i}" for i in (1, 2)]


def hub_repo(cache: Path, repo_id: str, repo_type: str = "dataset") -> Path:
    return hub_snapshot(cache, repo_id, repo_type, REV)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("PERCAUSAL_CACHE", str(tmp_path / "percausal_cache"))
    return cache


def prepare_ids(*argv) -> list[str]:
    out = argv[argv.index("--out") + 1]
    assert cli.main(["prepare", *map(str, argv)]) == 0
    return [r["id"] for r in read_records(out)]


def test_longlamp_snapshot_root_config_and_shards(tmp_path):
    root = longlamp_snapshot(tmp_path / "snap")
    files = sources.find_longlamp(root, config="product_review_user", split="train")
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    records = list(sources.read_longlamp(files))
    assert [r["id"] for r in records] == EXPECTED_IDS  # stable, unique across shards, in shard order
    assert [r["user_id"] for r in records] == [r["reviewerId"] for r in longlamp_rows("train", 5)]
    out = tmp_path / "train.jsonl"
    assert prepare_ids("--source", "longlamp", "--input", root, "--config", "product_review_user", "--split",
                       "train", "--out", out, "--retriever", "recency") == EXPECTED_IDS
    # one config's folder works the same; --config may also name the folder itself
    assert sources.find_longlamp(root / "product_review_user", split="train") == files
    assert sources.find_longlamp(root / "product_review_user", split="train", config="product_review_user") == files


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="train"), r"holds several configs \(abstract_generation_user, product_review_user\); pass one with "
                          r"--config"),
    (dict(config="product_review_user"), r"holds files of several splits \(train, val\); pass --split"),
    (dict(config="product_review_user", split="test"),
     r"no \.parquet files of split 'test' \(found splits: train, val\)"),
    (dict(config="topic_writing_user", split="train"),
     r"no sub-folder 'topic_writing_user' for --config \(sub-folders: abstract_generation_user, product_review_user"),
])
def test_longlamp_folder_errors_list_what_is_there(tmp_path, kwargs, message):
    root = longlamp_snapshot(tmp_path / "snap")
    with pytest.raises(UserError, match=message):
        sources.find_longlamp(root, **kwargs)


def test_longlamp_hub_id_from_the_offline_cache(tmp_path, hub_cache):
    longlamp_snapshot(hub_repo(hub_cache, "LongLaMP/LongLaMP"))
    files = sources.find_longlamp("LongLaMP/LongLaMP", config="product_review_user", split="train")
    assert all(str(f).startswith(str(hub_cache)) for f in files) and len(files) == 2
    out = tmp_path / "train.jsonl"
    assert prepare_ids("--source", "longlamp", "--input", "LongLaMP/LongLaMP", "--config", "product_review_user",
                       "--split", "train", "--out", out) == EXPECTED_IDS
    with pytest.raises(UserError, match=r"LongLaMP/LongLaMP: a hub dataset id needs --config and --split"):
        sources.find_longlamp("LongLaMP/LongLaMP")
    with pytest.raises(UserError, match=r"--config 'product_review': expected one of"):
        sources.find_longlamp("LongLaMP/LongLaMP", config="product_review", split="train")
    with pytest.raises(UserError, match=r"has no product_review_user/test-\*\.parquet files"):
        sources.find_longlamp("LongLaMP/LongLaMP", config="product_review_user", split="test")
    with pytest.raises(UserError, match=r"org/absent: not a local LongLaMP dataset, and the hub download failed "
                                        r"\(HF_HUB_OFFLINE is set"):
        sources.find_longlamp("org/absent", config="product_review_user", split="train")

    # the data_prep script: the hub id is its default input
    main = runpy.run_path(str(REPO / "data_prep" / "longlamp.py"))["main"]
    assert main(["--config", "product_review_user", "--split", "train", "--out", str(tmp_path / "c.jsonl")]) == 0
    assert [r["id"] for r in read_records(tmp_path / "c.jsonl")] == EXPECTED_IDS
    assert main(["--input", str(hub_cache), "--split", "train", "--out", str(tmp_path / "x.jsonl")]) == 2
    with pytest.raises(UserError, match=r"split 'train' has files in several folders \(.*abstract_generation_user, "
                                        r".*product_review_user\); pass --config"):
        sources.find_longlamp(hub_cache, split="train")  # a tree of several configs is never mixed


def test_longlamp_snapshot_on_gcs(gcs, tmp_path):
    url = upload_tree(longlamp_snapshot(tmp_path / "snap"), gcs.bucket() + "/longlamp")
    files = sources.find_longlamp(url, config="product_review_user", split="train")
    assert [str(f) for f in files] == [f"{url}/product_review_user/train-0000{i}-of-00002.parquet" for i in (0, 1)]
    out = f"{url}/prepared/train.jsonl"
    assert prepare_ids("--source", "longlamp", "--input", url, "--config", "product_review_user", "--split",
                       "train", "--out", out) == EXPECTED_IDS
    main = runpy.run_path(str(REPO / "data_prep" / "longlamp.py"))["main"]
    assert main(["--raw", f"{url}/product_review_user", "--split", "val", "--out", f"{url}/canonical/val.jsonl"]) == 0
    assert len(read_records(f"{url}/canonical/val.jsonl")) == 2


def test_lamp_folder_split_and_hub_id(tmp_path, hub_cache):
    folder = tmp_path / "LaMP_3"
    write_lamp(folder, "dev", 3)
    write_lamp(folder, "train", 2)
    with pytest.raises(UserError, match=r"holds several splits \(dev, train\); pass --split"):
        sources.find_lamp(folder)
    assert sources.find_lamp(folder, split="dev").name == "dev_questions.json"
    with pytest.raises(UserError, match=r"no test_questions\.json \(found splits: dev, train\)"):
        sources.find_lamp(folder, split="test")
    assert prepare_ids("--source", "lamp", "--input", folder, "--split", "dev", "--out",
                       tmp_path / "dev.jsonl") == ["dev0", "dev1", "dev2"]

    snap = hub_repo(hub_cache, "org/lamp")
    write_lamp(snap / "LaMP_3", "dev", 2)
    write_lamp(snap / "LaMP_4", "dev", 1)
    with pytest.raises(UserError, match=r"several dev_questions\.json files \(LaMP_3/dev_questions\.json, "
                                        r"LaMP_4/dev_questions\.json\); pass --config"):
        sources.find_lamp("org/lamp", split="dev")
    assert prepare_ids("--source", "lamp", "--input", "org/lamp", "--config", "LaMP_3", "--split", "dev", "--out",
                       tmp_path / "hub.jsonl") == ["dev0", "dev1"]


def test_lamp_null_gold_output_is_skipped(tmp_path):
    questions = write_lamp(tmp_path, "dev", 3)
    outputs = sources.lamp_outputs_path(questions)
    gold = json.loads(outputs.read_text())
    gold["golds"][1]["output"] = None
    outputs.write_text(json.dumps(gold))
    report = SkipReport()
    assert [r["id"] for r in sources.read_lamp(questions, outputs, report=report)] == ["dev0", "dev2"]
    assert report.counts == {"empty_output": 1} and report.first == {"empty_output": ["dev1"]}
    with pytest.raises(UserError, match=r"dev_questions\.json:2: field 'output': expected a non-empty string, got "
                                        "null"):
        sources.read_lamp(questions, outputs, strict=True)


def dpl_tables(tmp_path) -> tuple[list[dict], list[dict]]:
    main, meta = write_amazon(tmp_path / "jsonl", n_users=3)
    rows = [json.loads(line) for line in main.read_text().splitlines()]
    rows[2]["data"]["text"] = None  # a review without text: skipped
    rows[0]["profile"][0]["title"] = None  # a review without a title: ""
    metas = [json.loads(line) for line in meta.read_text().splitlines()]
    metas[0]["description"] = None
    metas.append({"asin": "B6", "title": "Book 6", "description": "A novel about item 6."})
    return rows, metas


def write_dpl(root: Path, rows, metas) -> None:
    parquet(rows[:2], root / "main" / "Books" / "train-00000-of-00002.parquet")
    parquet(rows[2:], root / "main" / "Books" / "train-00001-of-00002.parquet")
    parquet(rows[:1], root / "main" / "Books" / "val-00000-of-00001.parquet")
    parquet(rows[:1], root / "main" / "CDs_and_Vinyl" / "train-00000-of-00001.parquet")
    parquet(metas, root / "meta" / "Books" / "full-00000-of-00001.parquet")
    parquet(metas, root / "meta" / "CDs_and_Vinyl" / "full-00000-of-00001.parquet")


def test_amazon_dpl_hub_layout_from_folders_and_hub_ids(tmp_path, hub_cache, capsys):
    rows, metas = dpl_tables(tmp_path)
    write_dpl(tmp_path / "dpl", rows, metas)
    main_files, meta_files = sources.find_amazon(tmp_path / "dpl" / "main", tmp_path / "dpl" / "meta",
                                                 config="Books", split="train")
    assert [f.name for f in main_files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    report = SkipReport()
    records = sources.read_amazon(main_files, meta_files, report=report)
    assert [r["id"] for r in records] == ["U0-B4", "U1-B5"]
    assert records[0]["profile"][0]["title"] == "" and records[0]["profile"][0]["item_description"] == ""
    assert report.counts == {"empty_output": 1} and report.first == {"empty_output": ["U2-B6"]}
    with pytest.raises(UserError, match=r"holds several configs \(Books, CDs_and_Vinyl\); pass one with --config"):
        sources.find_amazon(tmp_path / "dpl" / "main", tmp_path / "dpl" / "meta", split="train")

    main_snap, meta_snap = hub_repo(hub_cache, "SnowCharmQ/DPL-main"), hub_repo(hub_cache, "SnowCharmQ/DPL-meta")
    write_dpl(tmp_path / "hub_src", rows, metas)
    for src, snap in ((tmp_path / "hub_src" / "main", main_snap), (tmp_path / "hub_src" / "meta", meta_snap)):
        for f in src.rglob("*.parquet"):
            (snap / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (snap / f.relative_to(src)).write_bytes(f.read_bytes())
    out = tmp_path / "amazon.jsonl"
    capsys.readouterr()
    assert prepare_ids("--source", "amazon", "--input", "SnowCharmQ/DPL-main", "--meta", "SnowCharmQ/DPL-meta",
                       "--config", "Books", "--split", "train", "--out", out, "--retriever", "recency") == [
        "U0-B4", "U1-B5"]
    assert "empty_output        1  U2-B6" in capsys.readouterr().out
    script = runpy.run_path(str(REPO / "data_prep" / "amazon_dpl.py"))["main"]
    assert script(["--category", "Books", "--split", "val", "--out", str(tmp_path / "val.jsonl")]) == 0
    assert [r["id"] for r in read_records(tmp_path / "val.jsonl")] == ["U0-B4"]


def test_tokenizer_hub_id_from_the_offline_cache(tmp_path, hub_cache):
    save_tokenizer(hub_repo(hub_cache, "org/tiny-tok", "model"))
    questions = write_lamp(tmp_path / "lamp", "dev", 2)
    out = tmp_path / "dev.jsonl"
    assert cli.main(["prepare", "--source", "lamp", "--input", str(questions), "--out", str(out), "--tokenizer",
                     "org/tiny-tok", "--template", "chat"]) == 0
    assert all(r["prompt"].startswith("<|im_start|>user\n") for r in read_records(out))
    assert cli.main(["prepare", "--source", "lamp", "--input", str(questions), "--out", str(out), "--tokenizer",
                     "org/no-such-tok"]) == 2


@pytest.fixture
def encoder_dir(tmp_path):
    """A tiny random BERT with a word-level tokenizer (safetensors, as save_pretrained writes)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path / "contriever"
    d.mkdir()
    words = "kettle boils fast review number it loved".split()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).eval().save_pretrained(d)
    return d


def test_contriever_from_hub_id_and_gcs_safetensors_only(tmp_path, hub_cache, gcs, encoder_dir):
    snap = hub_repo(hub_cache, "org/contriever", "model")
    for f in encoder_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    docs = ["kettle boils fast", "loved it", "review number"]
    reference = Contriever(encoder_dir).order("kettle", docs)
    assert Contriever("org/contriever").order("kettle", docs) == reference
    url = upload_tree(encoder_dir, gcs.bucket() + "/contriever")
    assert Contriever(url).order("kettle", docs) == reference

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((encoder_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle that must never be opened")
    with pytest.raises(UserError, match=r"cannot load a contriever encoder: no \*\.safetensors weights in .* \(it "
                                        r"has pytorch_model\.bin: PyTorch pickles, which are never loaded\)"):
        Contriever(pickled)

    raw = tmp_path / "raw"
    parquet(longlamp_rows("val", 2), raw / "val.parquet")
    out = tmp_path / "val.jsonl"
    assert prepare_ids("--source", "longlamp", "--input", raw / "val.parquet", "--out", out, "--retriever",
                       "contriever", "--contriever", "org/contriever", "--k", "1") == ["val-1", "val-2"]
