"""Readers and validators: real schemas read back normalized; every bad row names file, line, field, expectation."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from percausal_jax.data.files import write_jsonl
from percausal_jax.data.records import detect_kind, read_records
from percausal_jax.data.skips import SkipReport
from percausal_jax.errors import UserError

REVIEW_ITEM = {"overall": 5.0, "description": "A kettle.", "summary": "Great", "reviewText": "Boils fast."}
# A row as in the LongLaMP HF release (product_review_*): no id, no task, user id in reviewerId.
LONGLAMP_ROW = {"reviewerId": "A1", "input": "Generate the review text ...", "output": "Nice kettle.",
                "profile": [REVIEW_ITEM]}
CANONICAL = {"id": "r1", "user_id": "u1", "task": "LaMP-3", "input": "review: fine", "output": "4",
             "profile": [{"id": "p1", "text": "ok", "score": "3"}]}
AMAZON = {"id": "a1", "user_id": "u1", "task": "amazon_review", "input": "Kettle", "output": "Loved it.",
          "target": {"item_title": "Kettle", "item_description": "Steel.", "rating": 5.0, "title": "Wow"},
          "profile": [{"item_title": "Mug", "item_description": "Blue.", "rating": 4.0, "title": "Nice",
                       "text": "Holds tea.", "asin": "B1", "timestamp": 1700000000}]}
PROMPT = {"id": "p1", "prompt": "Past: x\nWrite.", "prompt_no_profile": "Write.", "completion": "Hello there.",
          "personal_spans": [[0, 5]], "source": "mine"}


def write_lines(path, *rows):
    """Writes rows (dicts, or raw strings for malformed lines) as JSONL."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_longlamp_hf_row_gets_id_user_and_task(tmp_path):
    path = write_lines(tmp_path / "val.jsonl", {**LONGLAMP_ROW, "reviewerId": "A0"}, "", LONGLAMP_ROW)
    first, second = read_records(path)
    assert (first["id"], first["user_id"], first["task"]) == ("val-1", "A0", "product_review")
    assert (second["id"], second["user_id"]) == ("val-3", "A1")  # line numbers count the blank line
    assert second["reviewerId"] == "A1" and second["profile"] == [REVIEW_ITEM]


def test_parquet_rows_read_like_jsonl(tmp_path):
    path = tmp_path / "0000.parquet"
    rows = [{**LONGLAMP_ROW, "output": "First."}, {**LONGLAMP_ROW, "output": "Second."}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = read_records(path)
    assert [r["id"] for r in records] == ["0000-1", "0000-2"]
    assert [r["output"] for r in records] == ["First.", "Second."]
    assert records[1]["profile"] == [REVIEW_ITEM]


def test_kinds_are_detected_and_extra_keys_kept(tmp_path):
    assert detect_kind(CANONICAL) == "canonical"
    assert detect_kind(PROMPT) == "prompt"
    assert detect_kind({"prompt": "a", "completion": "b"}) == "trl"
    assert read_records(write_lines(tmp_path / "p.jsonl", PROMPT)) == [PROMPT]
    assert read_records(write_lines(tmp_path / "a.jsonl", AMAZON)) == [AMAZON]
    trl = [{"prompt": "Q?", "completion": "A."},
           {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
            "completion": [{"role": "assistant", "content": "A."}]}]
    assert read_records(write_lines(tmp_path / "t.jsonl", *trl)) == trl


def test_output_may_be_absent_only_when_allowed(tmp_path):
    row = {k: v for k, v in CANONICAL.items() if k != "output"}
    path = write_lines(tmp_path / "q.jsonl", row)
    assert read_records(path, require_output=False) == [row]
    with pytest.raises(UserError, match=r"q\.jsonl: no records left: every row was skipped "
                                        r"\(empty_output 1: first r1\)"):
        read_records(path)  # a missing required output skips the row
    with pytest.raises(UserError, match=r"q\.jsonl:1: field 'output': missing; expected a non-empty string \(strict"):
        read_records(path, strict=True)
    report = SkipReport()
    blank = write_lines(tmp_path / "e.jsonl", {**row, "id": "r0"}, {**row, "output": " "})
    assert read_records(blank, require_output=False, report=report) == [{**row, "id": "r0"}]
    assert (report.kept, report.counts, report.first) == (1, {"empty_output": 1}, {"empty_output": ["r1"]})


def without(row, key):
    return {k: v for k, v in row.items() if k != key}


BAD_ROWS = [
    # (second line of the file, field named in the message or None, words that must appear)
    ('{"id": "r2", "input": ', None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object, got list"),
    ({"text": "hi"}, None, "unknown record kind"),
    ({**CANONICAL, "id": 7}, "id", "expected a non-empty string, got number 7"),
    (without(CANONICAL, "id"), "id", "missing; expected a non-empty string"),
    (without(CANONICAL, "user_id"), "user_id", "missing"),
    ({**CANONICAL, "id": "r2", "task": "LaMP-9"}, "task", "unknown task 'LaMP-9'; expected one of"),
    ({**CANONICAL, "id": "r2", "profile": {"text": "x"}}, "profile", "expected a list of objects, got object"),
    ({**CANONICAL, "id": "r2", "profile": [CANONICAL["profile"][0], "oops"]}, "profile[1]",
     "expected an object with fields ['score', 'text'], got string 'oops'"),
    ({**CANONICAL, "id": "r2", "profile": [{"text": "ok", "score": True}]}, "profile[0].score",
     "expected a string or number, got boolean True"),
    ({**CANONICAL, "id": "r2", "profile": [{"text": 3, "score": 3}]}, "profile[0].text",
     "expected a string, got number 3"),
    ({**CANONICAL, "id": "r2", "output": 4}, "output", "expected a non-empty string, got number 4"),
    ({**CANONICAL, "id": "r2", "personal_spans": [[0, 2]]}, "personal_spans[0]",
     "0 <= start < end <= 1 (the length of 'output')"),
    ({**CANONICAL}, "id", "duplicate id 'r1' (first used on line 1)"),
    ({**PROMPT, "completion": "x"}, None, "started with canonical records"),
]


@pytest.mark.parametrize("bad, field, words", BAD_ROWS, ids=[w for _, _, w in BAD_ROWS])
def test_bad_canonical_rows_are_located(tmp_path, bad, field, words):
    path = write_lines(tmp_path / "train.jsonl", CANONICAL, bad)
    with pytest.raises(UserError) as e:
        read_records(path)
    message = str(e.value)
    prefix = f"{path}:2" + (f": field '{field}'" if field else "")
    assert message.startswith(prefix), message
    assert words in message


BAD_OTHER_KINDS = [
    (PROMPT, {**PROMPT, "id": "p2", "completion": 5}, "completion", "expected a non-empty string, got number 5"),
    (PROMPT, {**PROMPT, "id": "p2", "personal_spans": [[3, 2]]}, "personal_spans[0]", "got [3, 2]"),
    (PROMPT, {**PROMPT, "id": "p2", "prompt_no_profile": None}, "prompt_no_profile", "expected a string, got null"),
    ({"prompt": "Q", "completion": "A"}, {"prompt": [{"role": "user"}], "completion": [{"role": "assistant",
                                                                                        "content": "A"}]},
     "prompt[0].content", "missing"),
    ({"prompt": "Q", "completion": "A"}, {"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]},
     "completion", "expected a non-empty string, got list"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                   {"role": "user", "content": "again?"}]},
     "messages[2].role",
     "expected the conversation to end with the assistant's turn (the completion), got role 'user'"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     {"messages": [{"role": "user", "content": "Q"}, "A"]}, "messages[1]", "expected a {role, content} object"),
    (AMAZON, {**AMAZON, "id": "a2", "target": {**AMAZON["target"], "title": 3}}, "target.title",
     "expected a string, got number 3"),
    (AMAZON, without({**AMAZON, "id": "a2"}, "target"), "target",
     "expected an object with fields ['item_description', 'item_title', 'rating', 'title'], got null"),
]


@pytest.mark.parametrize("good, bad, field, words", BAD_OTHER_KINDS, ids=[f for _, _, f, _ in BAD_OTHER_KINDS])
def test_bad_prompt_trl_and_amazon_rows_are_located(tmp_path, good, bad, field, words):
    path = write_lines(tmp_path / "data.jsonl", good, bad)
    with pytest.raises(UserError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:2: field '{field}'"), str(e.value)
    assert words in str(e.value)


def test_bad_files_are_reported(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(UserError, match=r"rows\.json: no records; expected at least one"):
        read_records(tmp_path / "rows.json")  # .json: an empty JSON array
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"unsupported file type '\.csv'; expected \.jsonl, \.jsonl\.gz, \.json"):
        read_records(tmp_path / "rows.csv")
    with pytest.raises(UserError, match="no records"):
        read_records(write_lines(tmp_path / "empty.jsonl", ""))
    (tmp_path / "latin.jsonl").write_bytes(json.dumps(CANONICAL).encode() + b'\n{"id": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl:2: not UTF-8"):
        read_records(tmp_path / "latin.jsonl")


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    assert write_jsonl(path, [CANONICAL, PROMPT]) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [CANONICAL, PROMPT]

    def failing():
        yield CANONICAL
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(path, failing())
    assert [json.loads(line) for line in path.read_text().splitlines()] == [CANONICAL, PROMPT]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left behind


def test_corrupt_parquet_is_reported(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"bad\.parquet: not a readable parquet file"):
        read_records(tmp_path / "bad.parquet")


# (file rows, expected reason, field named with --strict, words of the strict message)
SKIPPED_ROWS = [
    ({**CANONICAL, "id": "r2", "input": ""}, "empty_input", "input", "expected a non-empty string, got string ''"),
    ({**CANONICAL, "id": "r2", "input": None}, "empty_input", "input", "expected a non-empty string, got null"),
    (without({**CANONICAL, "id": "r2"}, "output"), "empty_output", "output", "missing; expected a non-empty string"),
    ({**CANONICAL, "id": "r2", "output": None}, "empty_output", "output", "got null"),
    ({**CANONICAL, "id": "r2", "output": "  "}, "empty_output", "output", "got string '  '"),
]


@pytest.mark.parametrize("bad, reason, field, words", SKIPPED_ROWS, ids=[f"{r}-{w}" for _, r, _, w in SKIPPED_ROWS])
def test_rows_with_empty_required_fields_are_skipped_and_reported(tmp_path, bad, reason, field, words):
    path = write_lines(tmp_path / "train.jsonl", CANONICAL, bad)
    report = SkipReport()
    assert read_records(path, report=report) == [CANONICAL]
    assert (report.kept, report.skipped, report.counts, report.first) == (1, 1, {reason: 1}, {reason: ["r2"]})
    with pytest.raises(UserError) as e:
        read_records(path, strict=True)
    assert str(e.value).startswith(f"{path}:2: field '{field}': "), str(e.value)
    assert words in str(e.value) and "strict" in str(e.value)


def test_prompt_and_trl_rows_with_empty_text_are_skipped(tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", PROMPT, {**PROMPT, "id": "p2", "completion": ""},
                          without({**PROMPT, "id": "p3"}, "prompt"))
    report = SkipReport()
    assert read_records(prompts, report=report) == [PROMPT]
    assert report.counts == {"empty_completion": 1, "empty_prompt": 1}
    assert report.first == {"empty_completion": ["p2"], "empty_prompt": ["p3"]}
    trl = write_lines(tmp_path / "t.jsonl", {"prompt": "Q", "completion": "A"}, {"prompt": "Q", "completion": ""},
                      {"prompt": [], "completion": []}, {"prompt": None, "completion": "A"},
                      {"prompt": [{"role": "user", "content": "Q"}],
                       "completion": [{"role": "assistant", "content": " "}]})
    report = SkipReport()
    assert read_records(trl, report=report) == [{"prompt": "Q", "completion": "A"}]
    assert report.counts == {"empty_completion": 2, "empty_prompt": 2}
    assert report.first == {"empty_completion": ["t.jsonl:2", "t.jsonl:5"], "empty_prompt": ["t.jsonl:3", "t.jsonl:4"]}
    with pytest.raises(UserError, match=r"t\.jsonl:2: field 'completion': expected a non-empty string"):
        read_records(trl, strict=True)


def test_null_or_missing_item_and_target_fields_read_as_empty_strings(tmp_path):
    review = {k: v for k, v in REVIEW_ITEM.items() if k != "summary"}  # a review without a summary
    row = {**LONGLAMP_ROW, "profile": [review, {**REVIEW_ITEM, "description": None, "overall": None}]}
    amazon = {**AMAZON, "target": {**AMAZON["target"], "title": None, "rating": None},
              "profile": [{**AMAZON["profile"][0], "title": None, "timestamp": float("nan")}]}
    (first,) = read_records(write_lines(tmp_path / "val.jsonl", row))
    assert first["profile"] == [{**review, "summary": ""}, {**REVIEW_ITEM, "description": "", "overall": ""}]
    assert row["profile"][0] == review  # the input row is not modified
    (second,) = read_records(write_lines(tmp_path / "a.jsonl", amazon))
    assert second["target"] == {**AMAZON["target"], "title": "", "rating": ""}
    assert second["profile"][0]["title"] == "" and second["profile"][0]["timestamp"] == ""


def test_skip_report_merges_counts_first_ids_and_round_trips_json():
    a, b = SkipReport(), SkipReport()
    a.keep(2)
    for i in range(4):
        a.skip("empty_output", f"r{i}")
    b.keep()
    b.skip("empty_output", "x")
    b.skip("prompt_too_long", "y")
    a.merge(b)
    assert (a.kept, a.skipped) == (3, 6)
    assert a.first == {"empty_output": ["r0", "r1", "r2"], "prompt_too_long": ["y"]}
    state = json.loads(json.dumps(a.to_json()))
    assert state == {"kept": 3, "skipped": 6, "by_reason": {"empty_output": {"count": 5, "first": ["r0", "r1", "r2"]},
                                                           "prompt_too_long": {"count": 1, "first": ["y"]}}}
    assert SkipReport.from_json(state).to_json() == state
    table = a.table()
    assert table.splitlines()[0] == "kept 3, skipped 6"
    assert "empty_output" in table and "r0, r1, r2, ..." in table and "prompt_too_long        1  y" in table
    assert SkipReport().table() == "kept 0, skipped 0"
