"""The synthetic planted-style task: determinism, honest personal_spans, user split, prompts and the CLI."""

from __future__ import annotations

import argparse

import pytest

from percausal_jax.data import build_pair, read_records, top_k
from percausal_jax.data.synthetic import generate, register, split_by_user
from percausal_jax.errors import UserError


def test_generation_is_deterministic_and_seeded():
    records = generate(4, 3, 2, seed=7)
    assert records == generate(4, 3, 2, seed=7)
    assert [r["output"] for r in records] != [r["output"] for r in generate(4, 3, 2, seed=8)]
    assert len(records) == 8 and len({r["id"] for r in records}) == 8
    # a user's data does not depend on how many users are generated
    assert generate(2, 3, 2, seed=7) == records[:4]


def test_personal_spans_come_from_the_users_profile():
    records = generate(6, 3, 3, seed=0)
    for record in records:
        spans = record["personal_spans"]
        assert len(spans) == 4 and all(0 <= a < b <= len(record["output"]) for a, b in spans)
        for a, b in spans:
            piece = record["output"][a:b]
            assert piece == piece.strip() and all(piece in item["text"] for item in record["profile"])
        # the rest is generic: none of it is the user's invented word
        generic = "".join(record["output"][prev_end:a] for (_, prev_end), (a, _) in
                          zip([(0, 0)] + spans, spans))
        assert record["output"][spans[2][0]:spans[2][1]] not in generic
        assert 20 <= len(record["output"].split()) <= 60
    # styles really differ between users (otherwise there is nothing personal to learn)
    signoffs = {r["user_id"]: r["output"][slice(*r["personal_spans"][-1])] for r in records}
    assert len(set(signoffs.values())) > 1


def test_split_is_by_user():
    records = generate(10, 2, 3, seed=1)
    train, test = split_by_user(records, 0.2, seed=1)
    train_users, test_users = {r["user_id"] for r in train}, {r["user_id"] for r in test}
    assert len(test_users) == 2 and len(train_users) == 8 and not train_users & test_users
    assert len(train) + len(test) == len(records)
    assert split_by_user(records, 0.2, seed=1) == (train, test)
    assert split_by_user(records, 0.0, seed=1) == (records, [])
    assert len({r["user_id"] for r in split_by_user(records[:3], 0.9, seed=1)[0]}) == 1  # train keeps one user


def test_synthetic_prompts():
    record = generate(1, 3, 1, seed=0)[0]
    items = top_k(record, 2, "recency")
    pair = build_pair(record, items, "drop")
    assert pair.personal.user == (f"Past texts by this user:\n- {items[0]['text']}\n- {items[1]['text']}\n\n"
                                  f"{record['input']}")
    assert items[0]["date"] > items[1]["date"]
    assert pair.counterfactual.user == record["input"]
    assert build_pair(record, items, "placeholder").counterfactual.user == (
        f"Past texts by this user:\nNone\n\n{record['input']}")


def run_cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_valid_train_and_test_files(tmp_path, capsys):
    out = tmp_path / "new" / "synth"
    argv = ["synth", "--out-dir", str(out), "--users", "5", "--profile-items", "2", "--per-user", "3",
            "--test-frac", "0.4", "--seed", "3"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 9 records from 3 user(s)" in printed and "wrote 6 records from 2 user(s)" in printed
    train, test = read_records(out / "train.jsonl"), read_records(out / "test.jsonl")  # validates spans too
    assert (len(train), len(test)) == (9, 6)
    by_id = lambda r: r["id"]  # noqa: E731
    assert sorted(train + test, key=by_id) == sorted(generate(5, 2, 3, seed=3), key=by_id)
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl"]


@pytest.mark.parametrize("flag, value, words", [("--users", "0", "--users 0: expected an integer >= 1"),
                                                ("--test-frac", "1", "--test-frac 1.0: expected a number in [0, 1)")])
def test_cli_rejects_bad_arguments(tmp_path, flag, value, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        run_cli(["synth", "--out-dir", str(tmp_path), flag, value])
