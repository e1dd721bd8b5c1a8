"""The pairing contract: one example → two aligned token sequences (with and without the profile).

This module is the one place the contract lives:

1. The response is tokenized **once** (its text, then EOS appended) and the *same ids* follow both prompts, so BPE
   merges never cross the prompt/response boundary and token i of the response is the same id in both passes.
2. Each pass's input is ``prompt_ids + response_ids`` without its last token (nothing predicts past EOS).
3. Response token t is predicted by the hidden state at row ``len(prompt) - 1 + t`` of that pass; these rows are
   the index arrays ``index_personal`` / ``index_counterfactual``. The prompts have different lengths, so the two
   index arrays differ; the ids and weights are shared.
4. Padding is explicit: ``segment_ids == 0`` (never in-band token ids) for sequences, ``weight == 0.0`` for
   response slots. Weights are float32 (never integer masks). ``seq_weight = weight / (number of response tokens
   of the sequence)``, so ``sum(seq_weight)`` counts sequences (per-sequence normalization).
5. Packing places several examples in one row with segment ids 1, 2, ... and positions restarting at 0; the index
   arrays then point into the packed row, so objectives never see the difference.
6. ``token_class`` labels each response slot for evaluation only (objectives never read it): personal / generic
   for records with ``personal_spans``, 0 (unclassified) otherwise and on padding
   (:mod:`percausal_jax.evaluation.token_nll`).

::

    PairedBatch
      personal:        tokens, positions, segment_ids     int32[B, Lp]
      counterfactual:  tokens, positions, segment_ids     int32[B, Lc]
      response:        ids int32[B, R], weight f32[B, R], seq_weight f32[B, R],
                       index_personal int32[B, R], index_counterfactual int32[B, R], segment_ids int32[B, R],
                       token_class int32[B, R]
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class PairedExample:
    """One example's ids: two prompts and the shared response (EOS already appended), and optionally each response
    token's class (:mod:`percausal_jax.evaluation.token_nll`; None: unclassified)."""

    prompt_ids: tuple[int, ...]
    prompt_no_profile_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    response_class: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.prompt_ids or not self.prompt_no_profile_ids:
            raise ValueError("both prompts need at least one token (the first response token is predicted from it)")
        if not self.response_ids:
            raise ValueError("empty response")
        if self.response_class is not None and len(self.response_class) != len(self.response_ids):
            raise ValueError(f"{len(self.response_class)} token classes for {len(self.response_ids)} response ids")

    @property
    def personal_len(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids) - 1

    @property
    def counterfactual_len(self) -> int:
        return len(self.prompt_no_profile_ids) + len(self.response_ids) - 1


@struct.dataclass
class Sequences:
    tokens: np.ndarray  # int32[B, L]
    positions: np.ndarray  # int32[B, L]
    segment_ids: np.ndarray  # int32[B, L]


@struct.dataclass
class Response:
    ids: np.ndarray  # int32[B, R]
    weight: np.ndarray  # float32[B, R]
    seq_weight: np.ndarray  # float32[B, R]
    index_personal: np.ndarray  # int32[B, R]
    index_counterfactual: np.ndarray  # int32[B, R]
    segment_ids: np.ndarray  # int32[B, R]: the packed segment (1, 2, ...) of each response slot, 0 = padding
    token_class: np.ndarray  # int32[B, R]: 2 personal, 1 generic, 0 unclassified / padding (evaluation only)


@struct.dataclass
class PairedBatch:
    """A registered pytree: numpy leaves on the host, ``jax.Array`` leaves on devices, ``jax.ShapeDtypeStruct``
    leaves for AOT planning (:meth:`spec`); the same type all the way into the jitted step."""

    personal: Sequences
    counterfactual: Sequences
    response: Response

    @property
    def num_tokens(self) -> int:
        return int(self.response.weight.sum())

    @classmethod
    def spec(cls, batch: int, personal_len: int, counterfactual_len: int, response_len: int,
             sharding=None) -> PairedBatch:
        """The abstract batch of these shapes (``jax.ShapeDtypeStruct`` leaves, optionally with ``sharding``):
        the one batch schema for AOT compilation and benchmarks."""
        def leaf(length: int, dtype) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((batch, length), dtype, sharding=sharding)

        seq = lambda L: Sequences(*(leaf(L, np.int32) for _ in range(3)))  # noqa: E731
        R = response_len
        return cls(seq(personal_len), seq(counterfactual_len),
                   Response(leaf(R, np.int32), leaf(R, np.float32), leaf(R, np.float32), leaf(R, np.int32),
                            leaf(R, np.int32), leaf(R, np.int32), leaf(R, np.int32)))


def collate(rows: Sequence[Sequence[PairedExample]], personal_len: int, counterfactual_len: int,
            response_len: int) -> PairedBatch:
    """Packs each row's examples (one example per row without packing) into fixed-shape arrays.

    ``rows[b]`` is the list of examples placed in row b, in order, as segments 1, 2, .... Raises ValueError if a row
    does not fit the given lengths (the pipeline chooses lengths that fit).
    """
    B = len(rows)
    P = _empty(B, personal_len)
    C = _empty(B, counterfactual_len)
    ids = np.zeros((B, response_len), np.int32)
    weight = np.zeros((B, response_len), np.float32)
    seq_weight = np.zeros((B, response_len), np.float32)
    idx_p = np.zeros((B, response_len), np.int32)
    idx_c = np.zeros((B, response_len), np.int32)
    seg_r = np.zeros((B, response_len), np.int32)
    cls = np.zeros((B, response_len), np.int32)
    for b, examples in enumerate(rows):
        off_p = off_c = off_r = 0
        for seg, ex in enumerate(examples, start=1):
            n = len(ex.response_ids)
            if (off_p + ex.personal_len > personal_len or off_c + ex.counterfactual_len > counterfactual_len
                    or off_r + n > response_len):
                raise ValueError(f"row {b} does not fit lengths ({personal_len}, {counterfactual_len}, {response_len})")
            _place(P, b, off_p, ex.prompt_ids, ex.response_ids, seg)
            _place(C, b, off_c, ex.prompt_no_profile_ids, ex.response_ids, seg)
            sl = slice(off_r, off_r + n)
            ids[b, sl] = ex.response_ids
            weight[b, sl] = 1.0
            seq_weight[b, sl] = 1.0 / n
            idx_p[b, sl] = off_p + len(ex.prompt_ids) - 1 + np.arange(n)
            idx_c[b, sl] = off_c + len(ex.prompt_no_profile_ids) - 1 + np.arange(n)
            seg_r[b, sl] = seg
            if ex.response_class is not None:
                cls[b, sl] = ex.response_class
            off_p += ex.personal_len
            off_c += ex.counterfactual_len
            off_r += n
    return PairedBatch(P, C, Response(ids, weight, seq_weight, idx_p, idx_c, seg_r, cls))


def collate_examples(examples: Sequence[PairedExample], batch_size: int, multiple: int = 16,
                     fill: PairedExample | None = None) -> PairedBatch:
    """One example per row, in ``batch_size`` rows (``1 ≤ len(examples) ≤ batch_size``), each length the longest
    example's rounded up to a multiple of ``multiple`` (few distinct shapes to compile). The rows past the examples
    hold ``fill`` when given, else nothing: all padding (weight 0), so they add nothing to any sum over the batch."""
    up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    rows = [[ex] for ex in examples] + [[] if fill is None else [fill] for _ in range(batch_size - len(examples))]
    return collate(rows, up(max(e.personal_len for e in examples)), up(max(e.counterfactual_len for e in examples)),
                   up(max(len(e.response_ids) for e in examples)))


def _empty(B: int, L: int) -> Sequences:
    return Sequences(np.zeros((B, L), np.int32), np.zeros((B, L), np.int32), np.zeros((B, L), np.int32))


def _place(s: Sequences, b: int, offset: int, prompt: Sequence[int], response: Sequence[int], seg: int) -> None:
    seq = list(prompt) + list(response[:-1])
    sl = slice(offset, offset + len(seq))
    s.tokens[b, sl] = seq
    s.positions[b, sl] = np.arange(len(seq))
    s.segment_ids[b, sl] = seg


def pad_batch(batch: PairedBatch, personal_len: int, counterfactual_len: int, response_len: int) -> PairedBatch:
    """Pads every array on the right with padding (segment 0, weight 0) to the given lengths — used to give all
    processes of a multi-host run the same shapes (each picks its own bucket)."""
    def seq(s: Sequences, L: int) -> Sequences:
        w = ((0, 0), (0, L - s.tokens.shape[1]))
        return Sequences(np.pad(s.tokens, w), np.pad(s.positions, w), np.pad(s.segment_ids, w))

    w = ((0, 0), (0, response_len - batch.response.ids.shape[1]))
    return PairedBatch(seq(batch.personal, personal_len), seq(batch.counterfactual, counterfactual_len),
                       jax.tree.map(lambda x: np.pad(x, w), batch.response))


def empty_batch(rows: int) -> PairedBatch:
    """An all-padding batch (contributes nothing to any sum): a process whose shard ran out feeds these."""
    return collate([[] for _ in range(rows)], 1, 1, 1)


def shape_of(batch: PairedBatch) -> tuple[int, int, int]:
    return batch.personal.tokens.shape[1], batch.counterfactual.tokens.shape[1], batch.response.ids.shape[1]
