"""``percausal prepare`` end to end per source, the raw-schema converters, the data_prep scripts, and errors."""

from __future__ import annotations

import argparse
import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from percausal_jax.commands import prepare
from percausal_jax.data import sources
from percausal_jax.data.featurize import FeaturizeConfig, Featurizer
from percausal_jax.data.files import write_jsonl
from percausal_jax.data.prompts import build_pair
from percausal_jax.data.records import read_records
from percausal_jax.data.retrieval import top_k
from percausal_jax.data.synthetic import generate
from percausal_jax.errors import UserError
from tests.data.tokenizer_fixture import (make_tokenizer, save_tokenizer, write_amazon, write_lamp,
                                          write_longlamp)

REPO = Path(__file__).resolve().parents[2]


def run_prepare(*argv) -> int:
    parser = argparse.ArgumentParser(prog="percausal")
    prepare.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare", *map(str, argv)])
    return args.func(args)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


def test_longlamp_raw_text_prompts(tmp_path, capsys):
    raw = write_longlamp(tmp_path / "raw", {"val": 3})
    out = tmp_path / "new_folder" / "val.jsonl"
    assert run_prepare("--source", "longlamp", "--input", raw / "product_review_user", "--out", out,
                       "--retriever", "recency", "--k", "2") == 0
    canonical = read_records(raw / "product_review_user" / "val-00000-of-00001.parquet")
    rows = read_records(out)
    assert [r["id"] for r in rows] == [r["id"] for r in canonical]
    for row, record in zip(rows, canonical):
        pair = build_pair(record, top_k(record, 2, "recency"), "drop")
        assert (row["prompt"], row["prompt_no_profile"], row["completion"]) == (
            pair.personal.user + "\n", record["input"] + "\n", record["output"])  # the default separator
        assert row["template"] == "none" and row["profile_items_used"] == min(2, len(record["profile"]))
        assert row["reviewerId"] == record["reviewerId"] and "profile" not in row and "input" not in row
        assert (row["user_id"], row["task"]) == (record["user_id"], "product_review")
    printed = capsys.readouterr().out
    assert f"wrote 3 prompt records to {out}\nkept 3, skipped 0\n" in printed
    assert "profile items used: mean 1.67; examples per item count {1: 1, 2: 2}" in printed


def test_lamp_chat_budget_drops_and_round_trips_through_featurize(tmp_path, tokenizer_dir, capsys):
    questions = write_lamp(tmp_path / "raw", "dev", 4)
    records = sources.read_lamp(questions, sources.lamp_outputs_path(questions))
    tok = make_tokenizer()
    zero_item = [len(Featurizer(tok, FeaturizeConfig(template="chat", k=0))(r).example.prompt_ids) for r in records]
    budget = sorted(zero_item)[-2] + 4  # the longest input cannot fit even without profile items
    cfg = FeaturizeConfig(template="chat", retriever="bm25", k=3, max_prompt_len=budget)
    direct = [Featurizer(tok, cfg)(r) for r in records]
    out = tmp_path / "dev.jsonl"
    run_prepare("--source", "lamp", "--input", questions, "--out", out, "--tokenizer", tokenizer_dir,
                "--template", "chat", "--retriever", "bm25", "--k", "3", "--max-prompt-len", budget)
    rows = read_records(out)
    n_dropped = sum(n > budget for n in zero_item)
    assert n_dropped > 0 and len(rows) == len(records) - n_dropped
    printed = capsys.readouterr().out
    assert f"kept {len(rows)}, skipped {n_dropped}\n" in printed
    too_long = [r["id"] for r, n in zip(records, zero_item) if n > budget]
    assert re.search(rf"\n  prompt_too_long +{n_dropped}  {', '.join(too_long)}\n", printed), printed
    kept = [d for d in direct if hasattr(d, "example")]
    reread = [Featurizer(tok, FeaturizeConfig(template="none", max_prompt_len=budget))(row) for row in rows]
    assert [r.example for r in reread] == [k.example for k in kept]  # the written texts give the same ids
    assert [row["profile_items_used"] for row in rows] == [k.items_used for k in kept]
    assert 0 < sum(k.items_used for k in kept) < 3 * len(kept)  # the budget dropped some items, not all
    assert all(row["template"] == "chat" and row["task"] == "LaMP-3" for row in rows)


def test_separator_and_long_responses(tmp_path, tokenizer_dir, capsys):
    raw = write_longlamp(tmp_path / "raw", {"val": 3})
    args = ("--source", "longlamp", "--input", raw / "product_review_user", "--retriever", "recency", "--k", "1")
    run_prepare(*args, "--out", tmp_path / "glued.jsonl", "--separator", "")
    run_prepare(*args, "--out", tmp_path / "blank.jsonl", "--separator", "\n\n")
    for glued, blank in zip(read_records(tmp_path / "glued.jsonl"), read_records(tmp_path / "blank.jsonl")):
        assert blank["prompt"] == glued["prompt"] + "\n\n" and blank["completion"] == glued["completion"]
        assert blank["prompt_no_profile"] == glued["prompt_no_profile"] + "\n\n"
    capsys.readouterr()
    canonical = [{**r, "output": "Loved it. " * i + "Stay zesty!"}
                 for i, r in enumerate(read_records(raw / "product_review_user" / "val-00000-of-00001.parquet"))]
    write_jsonl(tmp_path / "canonical.jsonl", canonical)
    args = ("--source", "jsonl", "--input", tmp_path / "canonical.jsonl", "--retriever", "recency", "--k", "1")
    limit = len(make_tokenizer()(canonical[1]["output"], add_special_tokens=False)["input_ids"]) + 1
    over = [r["id"] for r in canonical[2:]]  # longer than the second output (+EOS)
    run_prepare(*args, "--out", tmp_path / "cut.jsonl", "--tokenizer", tokenizer_dir, "--max-response-len", limit)
    rows = read_records(tmp_path / "cut.jsonl")
    assert [r["completion"] for r in rows] == [r["output"] for r in canonical]  # kept, and written in full
    printed = capsys.readouterr().out
    assert f"truncated responses: {len(over)} over --max-response-len {limit} tokens" in printed
    assert ", ".join(over) in printed and f"kept {len(rows)}, skipped 0" in printed
    run_prepare(*args, "--out", tmp_path / "drop.jsonl", "--tokenizer", tokenizer_dir, "--max-response-len", limit,
                "--no-truncate-response")
    assert len(read_records(tmp_path / "drop.jsonl")) == len(canonical) - len(over)
    printed = capsys.readouterr().out
    assert "truncated responses" not in printed and re.search(rf"response_too_long +{len(over)} ", printed)


def test_amazon_rows_join_meta_and_use_the_nextquill_prompt(tmp_path, tokenizer_dir, capsys):
    main, meta = write_amazon(tmp_path / "raw")
    out = tmp_path / "amazon.jsonl"
    run_prepare("--source", "amazon", "--input", main, "--meta", meta, "--out", out, "--tokenizer", tokenizer_dir,
                "--template", "chat", "--retriever", "recency", "--k", "8", "--counterfactual", "placeholder")
    rows = read_records(out)
    assert [r["id"] for r in rows] == ["U0-B4", "U1-B5"]
    first = rows[0]
    assert first["prompt"].startswith("<|im_start|>system\nGiven the title and description of an item")
    assert "[Item Title]: Book 4\n[Item Description]: A novel about item 4.\n[User's Past Reviews]:\n" \
           "[Review 1]:\n- [Item Title]: Book 2\n" in first["prompt"]  # newest profile review first
    assert "[User's Past Reviews]:\nNone\n[Output Review Rating]: 5.0\n" in first["prompt_no_profile"]
    assert first["completion"] == "User 0 loved it." and first["profile_items_used"] == 3
    assert "tokens (p50 / p90 / p99 / max):" in capsys.readouterr().out


def test_jsonl_keeps_spans_and_gives_trl_rows_ids(tmp_path):
    synth = generate(n_users=2, items_per_user=3, outputs_per_user=2, seed=0)
    write_jsonl(tmp_path / "synth.jsonl", synth)
    run_prepare("--source", "jsonl", "--input", tmp_path / "synth.jsonl", "--out", tmp_path / "s.jsonl",
                "--retriever", "random", "--k", "2")
    rows = read_records(tmp_path / "s.jsonl")
    assert [r["personal_spans"] for r in rows] == [r["personal_spans"] for r in synth]
    assert all(r["completion"][a:b] for r in rows for a, b in r["personal_spans"])
    write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "Q?", "completion": "A."}, {"prompt": "R?", "completion": "B."}])
    run_prepare("--source", "jsonl", "--input", tmp_path / "trl.jsonl", "--out", tmp_path / "t.jsonl")
    assert read_records(tmp_path / "t.jsonl") == [
        {"id": "trl-1", "prompt": "Q?", "prompt_no_profile": "Q?", "completion": "A.", "template": "none",
         "profile_items_used": 0},
        {"id": "trl-2", "prompt": "R?", "prompt_no_profile": "R?", "completion": "B.", "template": "none",
         "profile_items_used": 0}]


def test_prepare_errors_are_clear(tmp_path, tokenizer_dir):
    questions = write_lamp(tmp_path / "raw", "dev", 2)
    test_questions = write_lamp(tmp_path / "raw", "test", 2, with_outputs=False)
    main, meta = write_amazon(tmp_path / "amazon")
    out = tmp_path / "out.jsonl"
    cases = [
        (("--source", "jsonl", "--input", questions, "--task", "LaMP-3"), "--task applies to --source lamp only"),
        (("--source", "amazon", "--input", main), r"--meta \(the DPL-meta file\) is required for --source amazon"),
        (("--source", "lamp", "--input", test_questions), "no outputs file beside it"),
        (("--source", "lamp", "--input", questions, "--max-prompt-len", "10"),
         "a tokenizer is needed for template 'chat' and for a max_prompt_len"),
        (("--source", "lamp", "--input", questions, "--tokenizer", tokenizer_dir, "--max-prompt-len", "3"),
         r"no example is left \(dropped: \{'prompt_too_long': 2\}\)"),
        (("--source", "lamp", "--input", questions, "--tokenizer", tmp_path), "cannot load a tokenizer"),
        (("--source", "longlamp", "--input", tmp_path / "amazon"), "no .parquet files in this folder"),
        (("--source", "longlamp", "--input", write_longlamp(tmp_path / "ll", {"train": 1, "val": 1})),
         r"holds files of several splits \(train, val\)"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            run_prepare(*argv, "--out", out)
    assert not out.exists()


def test_converters_report_bad_raw_rows(tmp_path):
    main, meta = write_amazon(tmp_path)
    meta.write_text(meta.read_text().replace('"asin": "B5"', '"asin": "B9"'))
    with pytest.raises(UserError, match=r"main.jsonl:2: field 'data.asin': item 'B5' is not in .*meta.jsonl"):
        sources.read_amazon(main, meta)
    meta.write_text(json.dumps({"asin": "B1", "title": "T", "description": ["Part one.", "Part two."]}) + "\n")
    assert sources.read_amazon_meta(meta) == {"B1": ("T", "Part one. Part two.")}
    meta.write_text(json.dumps({"asin": "B1", "title": "T", "description": 3}) + "\n")
    with pytest.raises(UserError, match=r"meta.jsonl:1: field 'description': expected a string or a list"):
        sources.read_amazon_meta(meta)

    questions = write_lamp(tmp_path / "lamp", "dev", 2)
    outputs = sources.lamp_outputs_path(questions)
    gold = json.loads(outputs.read_text())
    outputs.write_text(json.dumps({**gold, "golds": gold["golds"][:1]}))
    with pytest.raises(UserError, match=r"dev_questions.json:2: field 'id': question 'dev1' has no gold output"):
        sources.read_lamp(questions, outputs)
    outputs.write_text(json.dumps({**gold, "golds": gold["golds"] + [{"id": "zz", "output": "1"}]}))
    with pytest.raises(UserError, match=r"gold outputs for ids \['zz'\] have no question"):
        sources.read_lamp(questions, outputs)
    with pytest.raises(UserError, match="cannot tell the LaMP task"):
        sources.read_lamp(questions)
    assert [r["task"] for r in sources.read_lamp(questions, task="LaMP-3", require_output=False)] == ["LaMP-3"] * 2


@pytest.mark.parametrize("script, make_args, expected", [
    ("longlamp.py", lambda d: ["--raw", write_longlamp(d, {"val": 2}), "--split", "val"],
     lambda d: read_records(d / "product_review_user" / "val-00000-of-00001.parquet")),
    ("lamp.py", lambda d: ["--questions", write_lamp(d, "dev", 2)],
     lambda d: sources.read_lamp(d / "dev_questions.json", d / "dev_outputs.json")),
    ("amazon_dpl.py", lambda d: ["--main", d / "main.jsonl", "--meta", write_amazon(d)[1]],
     lambda d: sources.read_amazon(d / "main.jsonl", d / "meta.jsonl")),
])
def test_data_prep_scripts_write_canonical_jsonl(tmp_path, monkeypatch, script, make_args, expected):
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(sys, "argv", [script, *map(str, make_args(tmp_path)), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "data_prep" / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert read_records(out) == expected(tmp_path)
