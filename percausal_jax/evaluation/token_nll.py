"""Teacher-forced NLL of a response split into its *personal* and *generic* tokens.

A record's ``personal_spans`` are ``[start, end)`` character spans of its reference text (``output``, or
``completion`` for prompt records). A response token with character span ``[a, b)`` in that text is **personal**
when it overlaps any span — ``any(a < e and s < b for s, e in spans)``, the rule of the identification benchmark
(``bench/identification.py``) — and **generic** otherwise. The end token(s) appended to every response (EOS or the
chat template's end-of-turn) have no characters in the reference and count as generic, so over a set of records that
all carry spans ``Σ nll_personal + Σ nll_generic = Σ nll`` of the plain eval NLL. Tokens of records without spans
(and padding) are *unclassified* and count in neither class.

Classes travel with the batch as ``Response.token_class`` int32[B, R] (:data:`UNCLASSIFIED`, :data:`GENERIC`,
:data:`PERSONAL`), written by the featurizer (:func:`response_classes`), so the periodic eval sums them inside its
one compiled step (:func:`class_sums`) and ``percausal eval`` on its own teacher-forced pass. The per-class mean
is Σ nll / Σ tokens over a whole pass (:func:`class_means`), never a mean of per-batch or per-record means.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

UNCLASSIFIED, GENERIC, PERSONAL = 0, 1, 2
CLASSES = {"personal": PERSONAL, "generic": GENERIC}
SUM_KEYS = ("nll_personal_sum", "tokens_personal", "nll_generic_sum", "tokens_generic")


def char_offsets(tokenizer: Any, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """``[a, b)`` of each of ``ids`` (``text`` tokenized without special tokens) in ``text``.

    From a fast tokenizer's offset mapping when re-tokenizing ``text`` gives ``ids``; otherwise by decoding prefixes
    (:func:`decoded_offsets`, as the identification benchmark does)."""
    ids = list(ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    return decoded_offsets(tokenizer, ids)


def decoded_offsets(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """``[a, b)`` of each id in ``decode(ids)``, by decoding prefixes (byte-level BPE safe for ASCII)."""
    spans, prev = [], 0
    for i in range(len(ids)):
        cur = len(tokenizer.decode(list(ids[:i + 1])))
        spans.append((prev, cur))
        prev = cur
    return spans


def classify(offsets: Sequence[tuple[int, int]], spans: Sequence[Sequence[int]]) -> list[int]:
    """Per token: :data:`PERSONAL` if its ``[a, b)`` overlaps any ``[s, e)`` of ``spans``, else :data:`GENERIC`."""
    return [PERSONAL if any(a < e and s < b for s, e in spans) else GENERIC for a, b in offsets]


def response_classes(tokenizer: Any, text: str, text_ids: Sequence[int], n_response: int,
                     spans: Sequence[Sequence[int]] | None) -> tuple[int, ...] | None:
    """The classes of a response of ``n_response`` ids that starts with ``text_ids`` (``text`` tokenized) and
    continues with end tokens (generic); a truncated response (``n_response < len(text_ids)``) keeps its first
    classes. None when the record has no ``personal_spans`` (its tokens stay unclassified)."""
    if spans is None:
        return None
    classes = classify(char_offsets(tokenizer, text, text_ids), spans) if text_ids else []
    classes += [GENERIC] * max(n_response - len(classes), 0)
    return tuple(classes[:n_response])


def class_sums(logp, weight, token_class) -> dict:
    """Σ nll and Σ tokens per class: ``logp`` f32[B, R] gold log-probs (teacher forced, personalized prompt),
    ``weight`` f32[B, R] (0 on padding), ``token_class`` int[B, R] → the scalar sums of :data:`SUM_KEYS`.
    Works on jax (inside a jitted step) and numpy arrays alike."""
    out = {}
    for name, cls in CLASSES.items():
        w = weight * (token_class == cls)  # f32[B, R]
        out[f"nll_{name}_sum"] = jnp.sum(-logp * w)
        out[f"tokens_{name}"] = jnp.sum(w)
    return out


def add_sums(total: dict | None, sums: dict) -> dict:
    """Running float64 totals of :func:`class_sums` results (host side, over a pass's batches)."""
    sums = {k: float(np.asarray(sums[k], np.float64)) for k in SUM_KEYS}
    return sums if total is None else {k: total[k] + sums[k] for k in SUM_KEYS}


def class_means(total: dict | None, prefix: str = "") -> dict:
    """``{prefix}nll_personal`` / ``{prefix}nll_generic`` (Σ nll / Σ tokens of the class over the pass) and
    ``{prefix}tokens_personal`` / ``{prefix}tokens_generic``; {} when no token was classified (no record carries
    spans). A class without tokens gets its count (0) but no mean."""
    if total is None or total["tokens_personal"] + total["tokens_generic"] == 0:
        return {}
    out = {}
    for name in CLASSES:
        n = total[f"tokens_{name}"]
        if n > 0:
            out[f"{prefix}nll_{name}"] = total[f"nll_{name}_sum"] / n
        out[f"{prefix}tokens_{name}"] = n
    return out
