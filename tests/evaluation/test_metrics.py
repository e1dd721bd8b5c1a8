"""Metrics against hand-computed values (data.md §2, §5), and the offline WordNet build.

METEOR tests that need the real WordNet assert the documented scores when it is available here and the clear
install error when it is not, so each test checks something either way.
"""

from __future__ import annotations

import gzip
import math

import nltk.data
import pytest

from percausal_jax.errors import UserError
from percausal_jax.evaluation import metrics, wordnet

# nltk's single_meteor_score doctest (also `evaluate`'s METEOR example): 0.6944.
HYPOTHESIS1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
REFERENCE1 = "It is a guide to action that ensures that the military will forever heed Party commands"


class NoSynonyms:
    """A WordNet stand-in without synonyms: METEOR then matches exact words and Porter stems only."""

    def synsets(self, word, pos=None):
        return []


def test_rouge_matches_hand_computed_lcs_and_unigram_f1():
    # Tokens are lowercased alphanumerics. Sample 1: pred [mat on the cat], ref [the cat sat on the mat].
    #   rouge1: 4 shared unigrams, P = 4/4, R = 4/6 -> F = 0.8; rougeL: LCS = 2 ("the cat"), P = 2/4, R = 2/6 -> 0.4.
    # Sample 2: empty prediction -> 0 (kept, counted in n). Sample 3: identical after strip/lowercase -> 1.
    out = metrics.rouge(["  Mat on the CAT! ", "", "the cat sat on the mat"],
                        ["The cat sat on the mat.", "A reference nobody matched.", " The cat sat on the mat "])
    assert out["n"] == 3
    assert out["rouge1"] == pytest.approx((0.8 + 0 + 1) / 3)
    assert out["rougeL"] == pytest.approx((0.4 + 0 + 1) / 3)


def test_empty_predictions_are_scored_not_dropped():
    out = metrics.rouge(["", "   "], ["some text", "more text"])
    assert out == {"rouge1": 0.0, "rougeL": 0.0, "n": 2}
    # "" -> 0; identical 2 words: Fmean 1, 1 chunk / 2 matches -> penalty 0.5 * 0.5**3 = 0.0625.
    assert metrics.meteor(["", "the cat"], ["the dog", "the cat"], wordnet=NoSynonyms()) == pytest.approx(0.9375 / 2)


def test_meteor_without_synonyms_by_hand():
    # [the auto stopped] vs [the car stopped]: 2 matches, P = R = 2/3, Fmean = 2/3; 2 chunks / 2 matches -> penalty
    # 0.5 * 1**3 = 0.5 -> 1/3 (data.md: "0.3333 with an empty stub").
    assert metrics.meteor(["the auto stopped"], ["the car stopped"], wordnet=NoSynonyms()) == pytest.approx(1 / 3)


def test_meteor_documented_example():
    if not wordnet.available():
        with pytest.raises(UserError, match="wordnet-base wordnet-sense-index"):
            metrics.meteor([HYPOTHESIS1], [REFERENCE1])
        return
    assert round(metrics.meteor([HYPOTHESIS1], [REFERENCE1]), 4) == 0.6944


def test_meteor_uses_wordnet_synonyms():
    if not wordnet.available():
        with pytest.raises(UserError, match="--no-meteor"):
            metrics.meteor(["the auto stopped"], ["the car stopped"])
        return
    # car ~ auto via WordNet: 3 matches in 1 chunk, penalty 0.5 * (1/3)**3 -> 1 - 1/54 = 0.9815.
    assert metrics.meteor(["the auto stopped"], ["the car stopped"]) == pytest.approx(53 / 54)
    assert round(53 / 54, 4) == 0.9815


def test_missing_wordnet_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCAUSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(wordnet, "DEBIAN_DIR", tmp_path / "no-wordnet")
    monkeypatch.setattr(nltk.data, "path", [])
    assert not wordnet.available()
    with pytest.raises(UserError) as err:
        metrics.meteor(["a"], ["a"])
    for hint in ("wordnet-base wordnet-sense-index", "scripts/install_wordnet.sh", "--no-meteor"):
        assert hint in str(err.value)


def _fake_man_page(path, names):
    rows = "".join(f"{i:02d}\t{name}\tdescription of {name.strip()}  \n" for i, name in enumerate(names))
    with gzip.open(path, "wt") as f:
        f.write(f".TH LEXNAMES 5WN\n.SH DESCRIPTION\n{rows}.SH NOTES\n")


def test_lexnames_from_the_man_page(tmp_path):
    names = ["adj.all", "noun.person  ", "verb.body", "adv.all"] + [f"noun.n{i}" for i in range(41)]
    _fake_man_page(tmp_path / "lexnames.5WN.gz", names)
    lines = wordnet.lexnames(tmp_path / "lexnames.5WN.gz").splitlines()
    assert len(lines) == 45
    assert lines[:4] == ["00\tadj.all\t3", "01\tnoun.person\t1", "02\tverb.body\t2", "03\tadv.all\t4"]
    _fake_man_page(tmp_path / "short.gz", names[:3])
    with pytest.raises(UserError, match="expected 45"):
        wordnet.lexnames(tmp_path / "short.gz")


def test_build_copies_files_atomically(tmp_path, monkeypatch):
    src = tmp_path / "debian"
    src.mkdir()
    for name in wordnet.FILES:
        (src / name).write_text(f"contents of {name}\n")
    man = tmp_path / "lexnames.5WN.gz"
    monkeypatch.setenv("PERCAUSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(wordnet, "DEBIAN_DIR", src)
    monkeypatch.setattr(wordnet, "LEXNAMES_MAN", man)
    monkeypatch.setattr(nltk.data, "path", [])
    with pytest.raises(UserError, match="lexnames.5WN.gz is missing"):  # man page excluded by dpkg
        wordnet.load()
    _fake_man_page(man, [f"noun.n{i}" for i in range(45)])
    assert wordnet.available()

    dest = wordnet.corpus_dir()
    wordnet._build(dest)
    assert dest == tmp_path / "cache" / "nltk_data" / "corpora" / "wordnet"
    for name in wordnet.FILES:
        assert not (dest / name).is_symlink()
        assert (dest / name).read_text() == f"contents of {name}\n"
    assert (dest / "lexnames").read_text().startswith("00\tnoun.n0\t1\n")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["wordnet", "wordnet.lock"]  # no temp dir left


def test_lamp_classification_accuracy_and_macro_f1():
    labels = ("comedy", "action", "classic")
    golds = ["comedy", "comedy", "action", "classic", "action"]
    preds = ["comedy", "action", "action", "Classic", "  action "]  # "Classic": not a label (case) -> -1
    # accuracy 3/5. F1 = 2TP/(2TP+FP+FN): comedy 2/3 (TP1 FN1), action 4/5 (TP2 FP1), classic 0 (FN1).
    out = metrics.lamp_classification(preds, golds, labels)
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    # A label never predicted nor gold still counts (as 0) in the macro average, as in LaMP's sklearn call.
    out = metrics.lamp_classification(preds, golds, (*labels, "romance"))
    assert out["f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 4)
    with pytest.raises(UserError, match="not one of the labels"):
        metrics.lamp_classification(["comedy"], ["horror"], labels)


def test_lamp_regression_with_unparseable_predictions():
    # "four stars" (gold 4): 1.0 is farther -> |1-4| = 3; "x" (gold 3, tie) -> 5.0 -> 2; "nan" (gold 2) -> 5.0 -> 3.
    out = metrics.lamp_regression(["2", "four stars", "x", " 5 ", "nan"], ["1", "4", "3", "5", "2"])
    errors = [1, 3, 2, 0, 3]
    assert out["MAE"] == pytest.approx(sum(errors) / 5)
    assert out["RMSE"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 5))
    with pytest.raises(UserError, match="not a rating"):
        metrics.lamp_regression(["3"], ["three"])


SPAN_RECORDS = [
    {"output": "Hello there. Stay zesty, Marla!", "personal_spans": [[0, 5], [13, 31]]},
    {"output": "Truly a glimmerous kettle.", "personal_spans": [[8, 18]]},
    {"output": "No planted style here."},
    {"completion": "Keep it cozy, Theo out.", "personal_spans": [[0, 23]]},
]
SPAN_PREDS = ["hello world, stay zesty, marla!", "", "anything", "KEEP IT COZY, THEO OUT."]


def test_span_recall():
    # Spans: "Hello" yes, "Stay zesty, Marla!" yes (case-insensitive), "glimmerous" no, "Keep it cozy, Theo out." yes.
    assert metrics.span_recall(SPAN_PREDS, SPAN_RECORDS) == pytest.approx(3 / 4)
    with pytest.raises(UserError, match="personal_spans"):
        metrics.span_recall(["x"], [{"output": "x"}])


def test_compute_dispatch():
    assert set(metrics.compute("LaMP-1", ["[1]", "[2]"], ["[1]", "[1]"])) == {"accuracy", "f1", "n"}
    lamp2 = metrics.compute("LaMP-2", ["comedy", "sci-fi"], ["comedy", "true story"])
    assert lamp2["accuracy"] == 0.5 and lamp2["f1"] == pytest.approx(1 / 15) and lamp2["n"] == 2
    assert metrics.compute("LaMP-3", ["4"], ["5"]) == {"MAE": 1.0, "RMSE": 1.0, "n": 1}
    for task in ("LaMP-4", "LaMP-5", "LaMP-6", "LaMP-7"):
        assert set(metrics.compute(task, ["a b"], ["a c"])) == {"rouge1", "rougeL", "n"}
    out = metrics.compute("synthetic", SPAN_PREDS, [r.get("output", r.get("completion")) for r in SPAN_RECORDS],
                          records=SPAN_RECORDS, meteor=False)
    assert set(out) == {"rouge1", "rougeL", "span_recall", "n"} and out["n"] == 4
    assert set(metrics.compute("topic_writing", ["a b"], ["a c"], records=[{"output": "a c"}],
                               meteor=False)) == {"rouge1", "rougeL", "n"}
    with pytest.raises(UserError, match="no metrics for task"):
        metrics.compute("LaMP-9", ["a"], ["a"])
    with pytest.raises(UserError, match="2 predictions for 1 references"):
        metrics.compute("LaMP-4", ["a", "b"], ["a"])
    with pytest.raises(UserError, match="no predictions"):
        metrics.compute("LaMP-4", [], [])


def test_compute_long_form_includes_meteor():
    if not wordnet.available():
        with pytest.raises(UserError, match="WordNet"):
            metrics.compute("product_review", ["the auto stopped"], ["the car stopped"])
        return
    out = metrics.compute("product_review", ["the auto stopped"], ["the car stopped"])
    assert out == {"rouge1": pytest.approx(2 / 3), "rougeL": pytest.approx(2 / 3), "meteor": pytest.approx(53 / 54),
                   "n": 1}
