"""Choosing profile items: rank a record's profile, keep the top k, then fit the prompt into a token budget.

Retrievers (data.md §1.1, §2), each giving profile indices best first:

* ``bm25``: ``rank_bm25.BM25Okapi`` (PyPI ``rank-bm25`` 0.2.2; k1=1.5, b=0.75, epsilon=0.25), as the reference
  does: idf = ln(N − n + 0.5) − ln(n + 0.5), a negative idf (a term in more than half of the profile) raised to
  0.25 × the mean idf; query and documents split on whitespace with ``str.split()``, case kept. Order: the
  reference's ``get_top_n`` = ``np.argsort(scores)[::-1]``, i.e. ascending sort reversed, so ties put the later
  profile item first. We sort stably (``kind="stable"``): NumPy's default sort is not stable and breaks ties by
  CPU and NumPy build (SIMD sorts), so the reference's tie order is machine-dependent; ours is fixed, and is the
  reference's wherever its sort keeps ties in order.
* ``recency``: newest first by ``date``, else ``timestamp``, else ``year`` (the first one that every item has);
  without such a field, profile order reversed (LongLaMP's ``rec``). Ties put the later profile item first.
* ``random``: a permutation seeded by (seed, record id), so it does not depend on record order or process. Sampled
  WITHOUT replacement: the reference's ``random.choices`` can repeat an item, which only wastes prompt budget.
* ``contriever``: :class:`Contriever`, a ``facebook/contriever``-style encoder loaded from a local directory.

k larger than the profile is clamped. Document and query texts come from the record's task
(:class:`percausal_jax.data.prompts.Task`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import numpy as np

from percausal_jax.data.prompts import get_task
from percausal_jax.errors import UserError

Method = Literal["bm25", "recency", "random", "contriever"]
METHODS: tuple[Method, ...] = ("bm25", "recency", "random", "contriever")
_TIME_FIELDS = ("date", "timestamp", "year")


def top_k(record: dict, k: int, method: Method, *, seed: int = 0,
          contriever: Contriever | None = None) -> list[dict]:
    """The record's ``k`` best profile items, best first (all of them when k exceeds the profile)."""
    profile = record["profile"]
    return [profile[i] for i in rank(record, method, seed=seed, contriever=contriever)[:max(k, 0)]]


def rank(record: dict, method: Method, *, seed: int = 0, contriever: Contriever | None = None) -> list[int]:
    """Indices of ``record["profile"]``, best first, by ``method``."""
    profile = record["profile"]
    if method == "recency":
        return recency_order(profile)
    if method == "random":
        return random_order(len(profile), seed, record["id"])
    task = get_task(record)
    documents = [task.document(item) for item in profile]
    if method == "bm25":
        return bm25_order(task.query(record), documents)
    if method == "contriever":
        if contriever is None:
            raise UserError("retriever 'contriever' needs an encoder: pass the path of a local "
                            "facebook/contriever-style model directory")
        return contriever.order(task.query(record), documents)
    raise UserError(f"retriever {method!r}: expected one of {list(METHODS)}")


def bm25_order(query: str, documents: Sequence[str]) -> list[int]:
    """``rank_bm25.BM25Okapi`` ranking on ``str.split()`` tokens, best first; ties: the later document first.

    Same scores as the reference's ``BM25Okapi(corpus).get_top_n(query.split(), corpus, n)``, and its order
    ``argsort(scores)[::-1]`` with a stable sort (see module doc). An empty query, or documents without a single
    token (where BM25Okapi would divide by zero), score 0 everywhere: documents in reverse order.
    """
    from rank_bm25 import BM25Okapi

    query_tokens = query.split()
    corpus = [document.split() for document in documents]
    if not query_tokens or not any(corpus):
        return list(range(len(corpus)))[::-1]
    scores = BM25Okapi(corpus, k1=1.5, b=0.75, epsilon=0.25).get_scores(query_tokens)
    return np.argsort(scores, kind="stable")[::-1].tolist()


def recency_order(profile: Sequence[dict]) -> list[int]:
    """Newest first by the first time field every item has; else profile order reversed."""
    for name in _TIME_FIELDS:
        if profile and all(item.get(name) is not None for item in profile):
            keys = [_time_key(item[name]) for item in profile]
            return sorted(range(len(profile)), key=lambda i: (keys[i], i), reverse=True)
    return list(range(len(profile)))[::-1]


def _time_key(value: object) -> tuple[float, ...]:
    """Numbers compare as numbers; strings by their digit groups, so ``"2011-05-03"`` → (2011, 5, 3)."""
    if isinstance(value, (int, float)):
        return (float(value),)
    return tuple(float(d) for d in re.findall(r"\d+", str(value)))


def random_order(n: int, seed: int, record_id: str) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``(seed, record_id)``."""
    digest = hashlib.sha256(f"{seed}\0{record_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n).tolist()


def _descending(scores: np.ndarray) -> list[int]:
    """Indices by descending score; equal scores keep their original order."""
    return np.argsort(-np.asarray(scores), kind="stable").tolist()


class Contriever:
    """Dense retriever: mean-pooled last hidden states of an HF encoder, scored by dot product (as Contriever).

    ``path``: a local directory, a ``gs://`` directory (copied to the local cache) or a hub id (e.g.
    ``facebook/contriever``, downloaded with ``huggingface_hub``; offline, from its cache) holding the encoder and
    its tokenizer. Weights are read from ``*.safetensors`` only: PyTorch ``.bin`` pickles are never loaded and
    ``trust_remote_code`` is never used. ``revision``: the hub revision (``facebook/contriever``'s main branch holds
    only a pickle; its safetensors weights are at commit ``970b380340c2e3fac6eba814e23e906e3635c8ae``).
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 32, max_length: int = 512,
                 revision: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        from percausal_jax import storage

        resolved = storage.resolve_hf_dir(path, what="contriever encoder", allow_patterns=storage.MODEL_PATTERNS,
                                          revision=revision or None)
        local = resolved.local
        if not any(local.glob("*.safetensors")):
            pickles = sorted(p.name for p in local.glob("*.bin"))
            found = f" (it has {', '.join(pickles)}: PyTorch pickles, which are never loaded)" if pickles else ""
            raise UserError(f"{path}: cannot load a contriever encoder: no *.safetensors weights in {local}{found}; "
                            "expected a Hugging Face model directory with model.safetensors and its tokenizer "
                            "(convert once with transformers: save_pretrained(..., safe_serialization=True))")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(local), local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{path}: cannot load a contriever encoder ({str(e).splitlines()[0] if str(e) else e}); "
                            "expected a Hugging Face model directory with safetensors weights and its tokenizer"
                            ) from None
        self.batch_size = batch_size
        self.max_length = max_length

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), hidden]`` float32 embeddings: the mean over non-padding tokens."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * mask).sum(1) / mask.sum(1)).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)

    def order(self, query: str, documents: Sequence[str]) -> list[int]:
        """Document indices by descending dot product with the query; ties in document order."""
        if not documents:
            return []
        return _descending(self.embed(documents) @ self.embed([query])[0])


# ---------------------------------------------------------------------------------------------------- token budget

T = TypeVar("T")


class PromptTooLong(UserError):
    """Even with no profile items the prompt exceeds the budget: the example cannot be used (count it as dropped)."""

    def __init__(self, n_tokens: int, max_prompt_len: int):
        super().__init__(f"prompt needs {n_tokens} tokens even without profile items; the budget is "
                         f"{max_prompt_len} (raise max_prompt_len)")
        self.n_tokens = n_tokens
        self.max_prompt_len = max_prompt_len


def fit_to_budget(build_fn: Callable[[list[dict]], T], items: list[dict], count_tokens: Callable[[T], int],
                  max_prompt_len: int, mode: Literal["drop", "truncate"] = "drop",
                  text_field: str | None = None) -> tuple[T, list[dict]]:
    """Largest prompt ``build_fn(kept)`` with ``count_tokens(...) <= max_prompt_len``; returns it and ``kept``.

    ``items`` are ranked best first. ``drop`` removes whole items, lowest-ranked first (as NextQuill does), down to
    zero items. ``truncate`` first cuts every kept item's ``text_field`` to the same largest number of words that
    fits (words, not tokens, so any tokenizer works; one word at least), and drops the lowest-ranked item only when
    even one word each is too long. Only profile text is shortened, never the target. Raises
    :class:`PromptTooLong` when the zero-item prompt does not fit.
    """
    if mode not in ("drop", "truncate"):
        raise UserError(f"budget mode {mode!r}: expected 'drop' or 'truncate'")
    if mode == "truncate" and text_field is None:
        raise ValueError("fit_to_budget(mode='truncate') needs text_field")
    for n in range(len(items), -1, -1):
        kept = items[:n]
        built = build_fn(kept)
        n_tokens = count_tokens(built)
        if n_tokens <= max_prompt_len:
            return built, kept
        if mode == "truncate" and n > 0:
            fitted = _truncate_to_fit(build_fn, kept, count_tokens, max_prompt_len, text_field)
            if fitted is not None:
                return fitted
    raise PromptTooLong(n_tokens, max_prompt_len)


def _truncate_to_fit(build_fn: Callable[[list[dict]], T], kept: list[dict], count_tokens: Callable[[T], int],
                     max_prompt_len: int, text_field: str) -> tuple[T, list[dict]] | None:
    """Binary search for the largest per-item word cap ≥ 1 that fits; None if even one word does not.

    Only caps that were actually measured are returned, so the result always fits even if a tokenizer is not
    perfectly monotone in text length.
    """
    words = [list(re.finditer(r"\S+", str(item[text_field]))) for item in kept]

    def clipped(cap: int) -> list[dict]:
        return [{**item, text_field: str(item[text_field])[:w[cap - 1].end()] if len(w) > cap else item[text_field]}
                for item, w in zip(kept, words)]

    best = None
    lo, hi = 1, max(len(w) for w in words) - 1  # the full text (cap = max) is known not to fit
    while lo <= hi:
        cap = (lo + hi) // 2
        candidate = clipped(cap)
        built = build_fn(candidate)
        if count_tokens(built) <= max_prompt_len:
            best, lo = (built, candidate), cap + 1
        else:
            hi = cap - 1
    return best
