"""Offline metrics for LongLaMP, LaMP, Amazon reviews and the synthetic task (data.md §1.2, §2, §5).

* **ROUGE** (:func:`rouge`): ``rouge_score.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)``, the scorer
  ``evaluate.load("rouge")`` wraps, on ``.strip()``-ed texts (as LongLaMP post-processes them). We report the mean
  per-sample F1; ``evaluate`` reports the median of a 1000-sample unseeded bootstrap of that mean, which lands within
  sampling noise of it (the bootstrap is centred on the mean) but is not bit-exact. rougeL is sentence-level LCS.
* **METEOR** (:func:`meteor`): ``nltk.translate.meteor_score.single_meteor_score`` with ``evaluate``'s parameters
  (alpha 0.9, beta 3, gamma 0.5, lowercasing, Porter stems, WordNet synonyms), mean over samples. Texts are tokenized
  with ``TreebankWordTokenizer`` because ``evaluate``'s ``word_tokenize`` needs the punkt model, which is not
  available offline; the difference is that a period ending a sentence *inside* a text stays attached to its word.
  WordNet comes from :mod:`percausal_jax.evaluation.wordnet`.
* **LaMP** (LaMP's ``eval/evaluation.py``): LaMP-1/2 :func:`lamp_classification` (accuracy and macro-F1 over the
  task's label set), LaMP-3 :func:`lamp_regression` (MAE, RMSE), LaMP-4..7 ROUGE-1/ROUGE-L.
* **Personal-span recall** (:func:`span_recall`) for records with planted ``personal_spans``.

Unlike LongLaMP's ``evaluate_data``, which drops samples with an empty generation (inflating scores), every sample
is scored here: an empty prediction scores 0. Every result carries ``n``, the number of scored samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from percausal_jax.errors import UserError
from percausal_jax.evaluation.wordnet import load as load_wordnet

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

LAMP2_TAGS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
              "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story")
# Label sets as LaMP's code lists them (LaMP-3's is informative: its metrics parse numbers instead).
LAMP_LABELS: dict[str, tuple[str, ...]] = {
    "LaMP-1": ("[1]", "[2]"),
    "LaMP-2": LAMP2_TAGS,
    "LaMP-3": ("1", "2", "3", "4", "5"),
}
LAMP_CLASSIFICATION_TASKS = ("LaMP-1", "LaMP-2")
LAMP_GENERATION_TASKS = ("LaMP-4", "LaMP-5", "LaMP-6", "LaMP-7")
# Long-form generation: ROUGE-1, ROUGE-L and METEOR (LongLaMP papers, NextQuill), plus span recall when planted.
GENERATION_TASKS = ("product_review", "abstract_generation", "topic_writing", "amazon_review", "synthetic")
TASKS = (*LAMP_CLASSIFICATION_TASKS, "LaMP-3", *LAMP_GENERATION_TASKS, *GENERATION_TASKS)

METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean per-sample ROUGE-1 and ROUGE-L F1 (no stemming) → ``{"rouge1", "rougeL", "n"}``."""
    from rouge_score.rouge_scorer import RougeScorer  # imports nltk (~1 s): only when scoring

    _check_pairs(preds, refs)
    scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(ref.strip(), pred.strip()) for pred, ref in zip(preds, refs)]
    return {"rouge1": float(np.mean([s["rouge1"].fmeasure for s in scores])),
            "rougeL": float(np.mean([s["rougeL"].fmeasure for s in scores])),
            "n": len(scores)}


def meteor(preds: Sequence[str], refs: Sequence[str], wordnet: WordNetCorpusReader | None = None) -> float:
    """Mean per-sample METEOR (``evaluate``'s parameters, Treebank tokens).

    ``wordnet`` defaults to the offline WordNet (:func:`percausal_jax.evaluation.wordnet.load`), which raises
    :class:`UserError` with install instructions when it cannot be found or built.
    """
    from nltk.tokenize import TreebankWordTokenizer
    from nltk.translate.meteor_score import single_meteor_score

    _check_pairs(preds, refs)
    wn = load_wordnet() if wordnet is None else wordnet
    tokenize = TreebankWordTokenizer().tokenize
    return float(np.mean([
        single_meteor_score(tokenize(ref.strip()), tokenize(pred.strip()), wordnet=wn,
                            alpha=METEOR_ALPHA, beta=METEOR_BETA, gamma=METEOR_GAMMA)
        for pred, ref in zip(preds, refs)]))


_meteor = meteor  # compute()'s flag ``meteor`` shadows the function inside it


def lamp_classification(preds: Sequence[str], refs: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """LaMP-1/2: ``{"accuracy", "f1"}``, macro-F1 over every label in ``labels``.

    Stripped texts are matched exactly (case-sensitive) against ``labels``; a prediction outside the set becomes -1,
    which is wrong for every sample and a false positive for no label. Per label F1 = 2TP / (2TP + FP + FN), 0 for
    a label neither predicted nor present, and the macro average runs over all labels (sklearn's
    ``f1_score(labels=range(n), average="macro")`` as LaMP calls it). A reference outside ``labels`` is an error.
    """
    _check_pairs(preds, refs)
    index = {label: i for i, label in enumerate(labels)}
    for i, ref in enumerate(refs):
        if ref.strip() not in index:
            raise UserError(f"reference {i} ({ref!r}) is not one of the labels {list(labels)}")
    pred = np.array([index.get(p.strip(), -1) for p in preds])
    gold = np.array([index[r.strip()] for r in refs])
    f1 = []
    for k in range(len(labels)):
        tp = np.sum((pred == k) & (gold == k))
        denom = 2 * tp + np.sum((pred == k) & (gold != k)) + np.sum((pred != k) & (gold == k))
        f1.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(pred == gold)), "f1": float(np.mean(f1))}


def lamp_regression(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """LaMP-3: ``{"MAE", "RMSE"}`` of the predicted ratings.

    LaMP's rule for an output that does not parse as a number: it counts as whichever of 1.0 and 5.0 is farther
    from the gold rating (5.0 on a tie at 3). Parseable values are kept as they are, out-of-range ones included;
    a non-finite one ("nan", "inf") counts as unparseable here (LaMP would let it poison the averages).
    """
    _check_pairs(preds, refs)
    gold = np.array([_rating(r, i) for i, r in enumerate(refs)])
    pred = np.array([_parse_or_farthest(p, g) for p, g in zip(preds, gold)])
    err = pred - gold
    return {"MAE": float(np.mean(np.abs(err))), "RMSE": float(np.sqrt(np.mean(err ** 2)))}


def span_recall(preds: Sequence[str], records: Sequence[dict]) -> float:
    """Fraction of all planted personal spans that reappear in the generations (micro-average over spans).

    A record's ``personal_spans`` are ``[start, end)`` character spans of its reference (``output``, or
    ``completion`` for prompt rows); a span counts as recalled when its text occurs as a case-insensitive substring
    of the record's generation. Records without spans contribute nothing; no span at all is an error.
    """
    _check_pairs(preds, records, "records")
    found = total = 0
    for pred, record in zip(preds, records):
        target = record["output"] if "output" in record else record["completion"]
        for start, end in record.get("personal_spans") or ():
            total += 1
            found += target[start:end].casefold() in pred.casefold()
    if total == 0:
        raise UserError("span recall needs records with personal_spans; none has any")
    return found / total


def compute(task: str, preds: Sequence[str], refs: Sequence[str], records: Sequence[dict] | None = None,
            meteor: bool = True) -> dict[str, float]:
    """The task's metrics plus ``n``.

    LaMP-1/2: accuracy, f1; LaMP-3: MAE, RMSE; LaMP-4..7: rouge1, rougeL; long-form tasks (LongLaMP, amazon_review,
    synthetic): rouge1, rougeL, meteor (unless ``meteor=False``) and span_recall when ``records`` carry
    ``personal_spans``.
    """
    _check_pairs(preds, refs)
    if task in LAMP_CLASSIFICATION_TASKS:
        return {**lamp_classification(preds, refs, LAMP_LABELS[task]), "n": len(preds)}
    if task == "LaMP-3":
        return {**lamp_regression(preds, refs), "n": len(preds)}
    if task in LAMP_GENERATION_TASKS:
        return rouge(preds, refs)
    if task not in GENERATION_TASKS:
        raise UserError(f"no metrics for task {task!r}; expected one of {list(TASKS)}")
    out = rouge(preds, refs)
    if meteor:
        out["meteor"] = _meteor(preds, refs)
    if records is not None and any(r.get("personal_spans") for r in records):
        out["span_recall"] = span_recall(preds, records)
    return out


def _check_pairs(preds: Sequence[str], refs: Sequence, what: str = "references") -> None:
    if len(preds) != len(refs):
        raise UserError(f"got {len(preds)} predictions for {len(refs)} {what}")
    if not preds:
        raise UserError("no predictions to score")


def _rating(ref: str, i: int) -> float:
    try:
        return float(ref)
    except ValueError:
        raise UserError(f"reference {i} ({ref!r}) is not a rating") from None


def _parse_or_farthest(pred: str, gold: float) -> float:
    try:
        value = float(pred)
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return value
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0
