"""Decoding: :func:`generate` (KV cache, one compiled program, greedy or sampled) and :func:`greedy_generate`, the
simple full-recomputation reference.

Both left-pad prompts of different lengths into one ``[B, P + N]`` buffer (:func:`left_pad`): padding gets segment
id 0 and positions restart at each row's first real token, so every row computes exactly what it would compute alone.

:func:`generate` runs inside one ``nnx.jit``: the cache (:mod:`percausal_jax.models.kv_cache`) is filled by a single
prefill of the ``[B, P]`` prompts, the first token is picked from the last prompt column, and a ``jax.lax.while_loop``
then feeds one token per step at buffer slot ``P + t - 1`` and picks token ``t``, until every row has emitted an EOS
or ``N`` tokens exist. Rows that are done emit ``pad_id``. Token choice follows Hugging Face's logits processors, in
HF's order: repetition penalty, then (sampling only) temperature, top-k, top-p.

Profile-contrastive decoding (``contrast`` β > 0, :mod:`percausal_jax.evaluation.contrast`) is the same program with
``2B`` rows: the ``B`` personalized prompts stacked on the ``B`` profile-free ones in one left-padded buffer (each row
at its own length, positions from 0), so the two KV caches are one ``[N, 2B, S, K, Dh]`` cache and every step is one
forward. The token picked from the contrasted logits of row ``i`` is fed to both its contexts (rows ``i`` and
``B + i``); EOS, stopping and the repetition penalty's "seen" tokens (personalized prompt + continuation) are per
row ``i`` as in plain decoding. With β = 0 (the default) the second context is never built: plain decoding.
"""

from __future__ import annotations

import functools
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from percausal_jax.evaluation.contrast import contrast_logits
from percausal_jax.evaluation.contrast_flags import validate
from percausal_jax.models.decoder import CausalLM
from percausal_jax.models.kv_cache import KVCache


def left_pad(prompts: Sequence[Sequence[int]], total_len: int, pad_id: int = 0):
    """→ tokens, segment_ids, positions int32[B, total_len] and the common prompt length P."""
    P = max(len(p) for p in prompts)
    B = len(prompts)
    tokens = np.full((B, total_len), pad_id, np.int32)
    seg = np.zeros((B, total_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):P] = p
        seg[i, P - len(p):] = 1
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, seg, positions, P


def stop_ids(featurizer, templates: Iterable[str]) -> tuple[int, ...]:
    """The ids decoding stops at, sorted: the tokenizer's EOS and the last id of the end that training appends to
    every response of prompts rendered with each of ``templates`` (``Featurizer.response_end``: the chat template's
    end of turn, e.g. ``<end_of_turn>``, or EOS)."""
    ends = {featurizer.response_end(t)[-1] for t in templates}
    return tuple(sorted(ends | ({featurizer.tokenizer.eos_token_id} - {None})))


def padding_id(tokenizer) -> int:
    """The id written into padding slots (left padding, rows already done): the tokenizer's pad token, else its EOS,
    else 0. Padding is never attended to, counted as seen, nor returned, so no output depends on it."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def generate(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             eos_ids: Sequence[int] = (), pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, repetition_penalty: float = 1.0, seed: int = 0,
             prompts_no_profile: Sequence[Sequence[int]] | None = None, contrast: float = 0.0,
             plausibility: float = 0.1) -> list[list[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens with a KV cache; a row stops after any of ``eos_ids``
    (the EOS is included). ``temperature`` 0 is greedy; otherwise tokens are sampled with ``jax.random.key(seed)``
    after top-k (0: off) and top-p (1: off) filtering. ``repetition_penalty`` applies to every token of the row's
    prompt and continuation (HF: logit / penalty if logit > 0 else logit · penalty).

    ``contrast`` β > 0 decodes profile-contrastively (module doc): ``prompts_no_profile`` (one per prompt, required
    then) are the profile-free prompts, ``plausibility`` α the plausibility threshold.

    Recompiles per prompt length, batch size, ``max_new_tokens``, ``top_k``, greedy vs sampling, ``eos_ids``,
    ``pad_id`` and contrastive vs plain; ``temperature``, ``top_p``, ``repetition_penalty``, ``seed``, ``contrast``
    (when > 0) and ``plausibility`` are traced.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
        raise ValueError(f"invalid sampling settings: temperature={temperature} (≥ 0), top_p={top_p} (in (0, 1]), "
                         f"top_k={top_k} (≥ 0), repetition_penalty={repetition_penalty} (> 0)")
    validate(contrast, plausibility)
    contrastive = contrast > 0
    rows = list(prompts)  # [B] prompts, or [2B] when contrastive: the personalized ones, then the profile-free ones
    if contrastive:
        if prompts_no_profile is None or len(prompts_no_profile) != len(prompts) \
                or any(len(p) == 0 for p in prompts_no_profile):
            raise ValueError("contrastive decoding needs one non-empty profile-free prompt per prompt "
                             "(prompts_no_profile)")
        rows += list(prompts_no_profile)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    P = max(len(p) for p in rows)
    tokens, seg, positions, _ = left_pad(rows, P + max_new_tokens, pad_id)
    new, lengths = _generate(model, tokens, seg, positions, jax.random.key(seed), jnp.float32(temperature),
                             jnp.float32(top_p), jnp.float32(repetition_penalty), jnp.float32(contrast),
                             jnp.float32(plausibility), prompt_len=P, top_k=int(top_k), greedy=temperature == 0,
                             eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id), contrastive=contrastive)
    new, lengths = np.asarray(new), np.asarray(lengths)
    return [row[:n].tolist() for row, n in zip(new, lengths)]


def process_logits(logits: jax.Array, seen: jax.Array, *, temperature: jax.Array | float, top_k: int,
                   top_p: jax.Array | float, repetition_penalty: jax.Array | float) -> jax.Array:
    """HF's sampling processors in HF's order: logits f32[B, V], seen bool[B, V] (tokens already in the row)
    → f32[B, V] with filtered tokens at -inf. A boundary tie of top-p keeps all tied tokens."""
    logits = penalize_repetitions(logits, seen, repetition_penalty) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    # HF removes the ascending prefix whose mass is ≤ 1 - top_p, always keeping the most likely token.
    n_removed = jnp.minimum(jnp.sum(cumulative <= 1 - top_p, axis=-1, keepdims=True), logits.shape[-1] - 1)
    cutoff = jnp.take_along_axis(ascending, n_removed, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def penalize_repetitions(logits: jax.Array, seen: jax.Array, penalty: jax.Array | float) -> jax.Array:
    """logits f32[B, V], seen bool[B, V] → seen logits divided by ``penalty`` if positive, else multiplied."""
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


class _Decoding(NamedTuple):
    """The while-loop carry: t (tokens picked so far), cache (of all R = B or 2B context rows), new int32[B, N],
    lengths int32[B], done bool[B], seen bool[B, V] (tokens in the row so far, for the repetition penalty), key."""

    t: jax.Array
    cache: KVCache
    new: jax.Array
    lengths: jax.Array
    done: jax.Array
    seen: jax.Array
    key: jax.Array


@functools.partial(nnx.jit, static_argnames=("prompt_len", "top_k", "greedy", "eos_ids", "pad_id", "contrastive"))
def _generate(model: CausalLM, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array, key: jax.Array,
              temperature: jax.Array, top_p: jax.Array, repetition_penalty: jax.Array, contrast: jax.Array,
              plausibility: jax.Array, *, prompt_len: int, top_k: int, greedy: bool, eos_ids: tuple[int, ...],
              pad_id: int, contrastive: bool) -> tuple[jax.Array, jax.Array]:
    """tokens, segment_ids, positions int32[R, P + N] from :func:`left_pad` (R = B rows, or R = 2B when
    ``contrastive``: B personalized then B profile-free) → new int32[B, N] (pad after a row is done) and lengths
    int32[B] (tokens up to and including the row's EOS)."""
    R, total = tokens.shape
    B = R // 2 if contrastive else R
    P, N = prompt_len, total - prompt_len
    eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    rows = jnp.arange(B)

    def pick(logits: jax.Array, seen: jax.Array, key: jax.Array) -> jax.Array:
        """float32[B, V] → int32[B]."""
        if greedy:
            return jnp.argmax(penalize_repetitions(logits, seen, repetition_penalty), axis=-1).astype(jnp.int32)
        logits = process_logits(logits, seen, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    def choice_logits(logits: jax.Array) -> jax.Array:
        """f32[R, V] → the logits tokens are chosen from, f32[B, V]."""
        return contrast_logits(logits[:B], logits[B:], contrast, plausibility) if contrastive else logits

    def both(col: jax.Array) -> jax.Array:
        """int32[B, 1] → int32[R, 1]: row i's token, fed to each of its contexts."""
        return jnp.concatenate([col, col]) if contrastive else col

    def emit(s: _Decoding, logits: jax.Array) -> _Decoding:
        """Picks token t from logits f32[R, V] and records it (pad for rows already done)."""
        logits = choice_logits(logits)
        key, sub = jax.random.split(s.key)
        tok = jnp.where(s.done, pad_id, pick(logits, s.seen, sub))
        return s._replace(t=s.t + 1, new=s.new.at[:, s.t].set(tok), lengths=s.lengths + (~s.done).astype(jnp.int32),
                          done=s.done | (tok[:, None] == eos[None, :]).any(axis=-1),
                          seen=s.seen.at[rows, tok].set(True), key=key)

    def step(s: _Decoding) -> _Decoding:
        """Feeds token t - 1 at buffer slot P + t - 1 and picks token t."""
        hidden, cache = model.decode(both(jax.lax.dynamic_slice_in_dim(s.new, s.t - 1, 1, axis=1)), s.cache,
                                     P + s.t - 1)
        return emit(s._replace(cache=cache), model.logits(hidden[:, 0]))

    prompt = tokens[:, :P]
    hidden, cache = model.decode(prompt, model.init_cache(segment_ids, positions), 0)
    seen = jnp.zeros((B, model.config.vocab_size), bool).at[rows[:, None], prompt[:B]].max(segment_ids[:B, :P] != 0)
    state = _Decoding(t=jnp.int32(0), cache=cache, new=jnp.full((B, N), pad_id, jnp.int32),
                      lengths=jnp.zeros(B, jnp.int32), done=jnp.zeros(B, bool), seen=seen, key=key)
    state = emit(state, model.logits(hidden[:, -1]))
    state = jax.lax.while_loop(lambda s: (s.t < N) & ~s.done.all(), step, state)
    return state.new, state.lengths


@nnx.jit
def _next_token(model: CausalLM, tokens, positions, segment_ids, col):
    hidden = model.hidden_states(tokens, positions, segment_ids)
    last = jax.lax.dynamic_index_in_dim(hidden, col, axis=1, keepdims=False)
    return jnp.argmax(model.logits(last), axis=-1).astype(jnp.int32)


def greedy_generate(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation by full recomputation (no cache, one model call per token over the whole ``[B, P + N]``
    buffer): the reference for :func:`generate`. Stops a row at any of ``eos_ids`` (the EOS is included)."""
    tokens, seg, positions, P = left_pad(prompts, max(len(p) for p in prompts) + max_new_tokens, pad_id)
    done = np.zeros(len(prompts), bool)
    out: list[list[int]] = [[] for _ in prompts]
    for t in range(max_new_tokens):
        nxt = np.asarray(_next_token(model, tokens, positions, seg, P + t - 1))
        for i, tok in enumerate(nxt):
            if not done[i]:
                out[i].append(int(tok))
                done[i] = int(tok) in eos_ids
        tokens[:, P + t] = nxt
        if done.all():
            break
    return out
