"""The synthetic planted-style task: determinism, honest personal_spans, user split, prompts and the CLI."""

from __future__ import annotations

import argparse

import pytest

from percausal_jax.commands.synth import register
from percausal_jax.data import build_pair, read_records, top_k
from percausal_jax.data.synthetic import generate, split_by_user
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


# ------------------------------------------------------------------------------------- difficulty levels, val users

# sha256 of train.jsonl / test.jsonl written by `percausal synth` before the difficulty levels existed (easy must
# reproduce them byte for byte)
GOLDEN = {(): ("62c533f7d53d09d5996b394b1cffa3dbb5fc54566255411e1d0612798ece7071",
               "ea44e718acec4313daa748eff0f83694ee494b15b1b2341183446357050d5b97"),
          ("--seed", "7", "--users", "5", "--profile-items", "3", "--per-user", "2", "--test-frac", "0.4"):
              ("637bafc300a86cd74e9a2b0c6bb80e32aef4f2786020f4d0d3fb7ce2fc64c0b4",
               "ca3ddf0b1a894a5c3bd2d6294ba828efdb92abb286018cb71fffe9b70dc3fc9b")}


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("extra", list(GOLDEN))
def test_easy_reproduces_the_original_files(tmp_path, capsys, extra):
    for flags in ((), ("--difficulty", "easy", "--val-users", "3")):
        out = tmp_path / str(len(flags))
        assert run_cli(["synth", "--out-dir", str(out), *extra, *flags]) == 0
        assert (_sha(out / "train.jsonl"), _sha(out / "test.jsonl")) == GOLDEN[extra]
    assert not (tmp_path / "0" / "val.jsonl").exists() and (tmp_path / "4" / "val.jsonl").exists()


def _base_form(piece: str, profile: list[str]) -> str:
    """The profile form of a target's style piece: itself, or the adjective an adverb was inflected from."""
    from percausal_jax.data.synthetic import adverb

    if any(piece in text for text in profile):
        return piece
    for base in (piece[:-3] + "y", piece[:-4], piece[:-2]):
        if adverb(base) == piece and any(base in text for text in profile):
            return base
    raise AssertionError(f"{piece!r} is neither in the profile nor inflected from a word of it")


def _repeats(records) -> float:
    """Mean number of profile items holding each (profile form of each) style piece of a target."""
    counts = []
    for record in records:
        texts = [item["text"] for item in record["profile"]]
        for a, b in record["personal_spans"]:
            base = _base_form(record["output"][a:b], texts)
            counts.append(sum(base in text for text in texts))
    return sum(counts) / len(counts)


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_levels_are_valid_and_spans_mark_the_planted_pieces(tmp_path, difficulty):
    import re

    out = tmp_path / difficulty
    assert run_cli(["synth", "--out-dir", str(out), "--users", "6", "--per-user", "3", "--seed", "2",
                    "--difficulty", difficulty]) == 0
    records = read_records(out / "train.jsonl") + read_records(out / "test.jsonl")  # validates spans too
    assert len(records) == 18 and all(r["task"] == "synthetic" for r in records)
    for record in records:
        output, spans = record["output"], record["personal_spans"]
        texts = [item["text"] for item in record["profile"]]
        pieces = [output[a:b] for a, b in spans]
        assert len(spans) == 4 and all(p == p.strip() and p for p in pieces)
        forms = [_base_form(p, texts) for p in pieces]  # each is copied from the profile, or inflected from it
        inflected = [p != f for p, f in zip(pieces, forms)]
        assert inflected == {"easy": [False] * 4, "medium": [False, True, False, False],
                             "hard": [False, True, True, False]}[difficulty]
        bounds = [0, *(x for span in spans for x in span), len(output)]
        generic = "".join(output[a:b] for a, b in zip(bounds[::2], bounds[1::2]))
        assert not any(p in generic for p in pieces[1:3])
        if difficulty != "easy":  # the generic content comes from the query: the numbers of its facts
            assert set(re.findall(r"\d+", generic)) == set(re.findall(r"\d+", record["input"]))
        assert 20 <= len(output.split()) <= 60
    # a user's pieces are the same in all their targets and differ between users
    by_user = {}
    for record in records:
        by_user.setdefault(record["user_id"], set()).add(
            tuple(record["output"][a:b] for a, b in record["personal_spans"]))
    assert all(len(v) == 1 for v in by_user.values()) and len({next(iter(v)) for v in by_user.values()}) > 1


def test_harder_levels_repeat_the_style_less_among_distractors():
    from percausal_jax.data.synthetic import OPENINGS

    reps = {d: _repeats(generate(8, 6, 2, seed=0, difficulty=d)) for d in ("easy", "medium", "hard")}
    assert reps["easy"] == 6 and 3 <= reps["medium"] < 3.5 and 2 <= reps["hard"] < 2.5
    for difficulty, n_distractors in (("easy", 0), ("medium", 2), ("hard", 3)):
        for record in generate(8, 6, 1, seed=0, difficulty=difficulty):
            own = record["output"][slice(*record["personal_spans"][0])]
            others = [item for item in record["profile"] if any(o != own and o in item["text"] for o in OPENINGS)]
            assert len(others) == n_distractors  # items in other styles: another opening line


@pytest.mark.parametrize("difficulty", ["medium", "hard"])
def test_levels_are_deterministic_per_seed(difficulty):
    records = generate(4, 6, 2, seed=7, difficulty=difficulty)
    assert records == generate(4, 6, 2, seed=7, difficulty=difficulty)
    assert [r["output"] for r in records] != [r["output"] for r in generate(4, 6, 2, seed=8, difficulty=difficulty)]
    assert generate(2, 6, 2, seed=7, difficulty=difficulty) == records[:4]
    assert generate(2, 6, 2, seed=7, difficulty=difficulty, first_user=2) == records[4:]
    assert [r["output"] for r in records] != [r["output"] for r in generate(4, 6, 2, seed=7)]  # not easy's


def test_val_users_are_disjoint_and_leave_train_test_unchanged(tmp_path, capsys):
    argv = ["synth", "--users", "5", "--per-user", "2", "--test-frac", "0.4", "--difficulty", "hard"]
    assert run_cli([*argv, "--out-dir", str(tmp_path / "a")]) == 0
    assert run_cli([*argv, "--out-dir", str(tmp_path / "b"), "--val-users", "3"]) == 0
    assert "wrote 6 records from 3 user(s)" in capsys.readouterr().out.strip().splitlines()[-1]
    for name in ("train.jsonl", "test.jsonl"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
    users = {name: {r["user_id"] for r in read_records(tmp_path / "b" / name)}
             for name in ("train.jsonl", "test.jsonl", "val.jsonl")}
    assert len(users["val.jsonl"]) == 3 and not users["val.jsonl"] & (users["train.jsonl"] | users["test.jsonl"])
    assert read_records(tmp_path / "b" / "val.jsonl") == generate(3, 6, 2, seed=0, difficulty="hard", first_user=5)


def test_bad_difficulty_and_val_users(tmp_path):
    with pytest.raises(UserError, match="--val-users -1: expected an integer >= 0"):
        run_cli(["synth", "--out-dir", str(tmp_path), "--val-users", "-1"])
    with pytest.raises(UserError, match="--difficulty 'extreme': expected one of easy, medium, hard"):
        generate(1, 1, 1, seed=0, difficulty="extreme")
    with pytest.raises(SystemExit):  # argparse names the choices
        run_cli(["synth", "--out-dir", str(tmp_path), "--difficulty", "extreme"])
