"""The attention kernels against the dense ``xla`` one: the blocked (flash-style) kernel alone and inside models,
forward and gradients, with padding, packed rows, sliding windows (static and traced flags), soft-capping and GQA;
the KV-cached decode path of a blocked model; and what ``attention_impl="auto"`` resolves to."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import percausal_jax as pj
from percausal_jax.config import CHOICES
from percausal_jax.evaluation.generate import left_pad
from percausal_jax.models import layers
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.decoder import CausalLM
from tests.helpers import cached_and_full_hidden, tiny_hf_model, torch_logits

B, L, H, K, DH = 3, 77, 4, 2, 16


def _segments_and_positions():
    """Row 0 left-padded, row 1 packed (segments 1, 2, 3, then right padding), row 2 one full segment."""
    seg = np.ones((B, L), np.int32)
    seg[0, :9] = 0
    seg[1, 20:45], seg[1, 45:70], seg[1, 70:] = 2, 3, 0
    pos = np.zeros((B, L), np.int32)
    for b in range(B):
        start = 0
        for i in range(1, L + 1):
            if i == L or seg[b, i] != seg[b, start]:
                pos[b, start:i] = np.arange(i - start)
                start = i
    return jnp.asarray(seg), jnp.asarray(pos)


def _qkv(seed=0, dtype=jnp.float32):
    rs = np.random.RandomState(seed)
    return tuple(jnp.asarray(rs.randn(B, L, n, DH), dtype) for n in (H, K, K))


CASES = {  # name: (softcap, window, sliding)
    "causal": (None, None, False),
    "softcap": (2.0, None, False),
    "window": (None, 6, True),
    "window_off": (None, 6, False),  # a windowed model's global layer
    "window_softcap": (1.5, 5, True),
}
BLOCKS = [(16, 16), (32, 64), (64, 512), (13, 7)]  # ragged tiles too


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_kernel_matches_xla(case, blocks):
    softcap, window, sliding = CASES[case]
    seg, pos = _segments_and_positions()
    q, k, v = _qkv()
    valid = (seg > 0)[:, :, None, None]
    w = jnp.asarray(np.random.RandomState(1).randn(B, L, H, DH), jnp.float32)
    mask = layers.attention_mask(seg, pos, sliding, window)

    def dense(q, k, v):
        return layers._xla_attention(q, k, v, mask, 0.3, softcap)

    def blocked(q, k, v):
        return layers.blocked_attention(q, k, v, seg, pos, scale=0.3, softcap=softcap, window=window,
                                        sliding=sliding, block_q=blocks[0], block_kv=blocks[1])

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w * valid)  # padding rows' outputs are read by nobody

    out = blocked(q, k, v)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.asarray(out * valid), np.asarray(dense(q, k, v) * valid), atol=2e-6, rtol=0)
    g_dense = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    g_blocked = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blocked, g_dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, rtol=0)


def test_blocked_kernel_traced_sliding_flag():
    """The per-layer flag may be a tracer (scanned Gemma2/3 layers): both values, under jit and grad."""
    seg, pos = _segments_and_positions()
    q, k, v = _qkv(2)
    valid = (seg > 0)[:, :, None, None]

    @jax.jit
    def both(q, k, v, flag):
        f = lambda q: jnp.sum(layers.blocked_attention(q, k, v, seg, pos, scale=0.25, window=4, sliding=flag,  # noqa
                                                       block_q=16, block_kv=32) * valid)
        return f(q), jax.grad(f)(q)

    for flag in (True, False):
        mask = layers.attention_mask(seg, pos, flag, 4)
        f = lambda q: jnp.sum(layers._xla_attention(q, k, v, mask, 0.25, None) * valid)  # noqa: E731
        out, grad = both(q, k, v, jnp.asarray(flag))
        np.testing.assert_allclose(float(out), float(f(q)), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(f)(q)), atol=5e-6, rtol=0)


def test_blocked_kernel_bfloat16_close_to_xla():
    seg, pos = _segments_and_positions()
    q, k, v = _qkv(3, jnp.bfloat16)
    valid = (seg > 0)[:, :, None, None]
    mask = layers.attention_mask(seg, pos, False, None)
    out = layers.blocked_attention(q, k, v, seg, pos, scale=0.25, block_q=16, block_kv=32)
    assert out.dtype == jnp.bfloat16
    ref = layers._xla_attention(q, k, v, mask, 0.25, None)
    np.testing.assert_allclose(np.asarray((out * valid).astype(jnp.float32)),
                               np.asarray((ref * valid).astype(jnp.float32)), atol=3e-2, rtol=0)
    g = jax.grad(lambda q: jnp.sum((layers.blocked_attention(q, k, v, seg, pos, scale=0.25, block_q=16,
                                                             block_kv=32) * valid).astype(jnp.float32)))(q)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.parametrize("bq,bkv,L", [(16, 16, 80), (16, 48, 160), (16, 64, 64), (16, 128, 80), (13, 13, 78),
                                      (64, 512, 1088)])
def test_blocked_key_tiles_cover_each_key_range_once(bq, bkv, L):
    """Each query block's static-size key tiles cover keys [k0, qe) exactly once and none reaches past qe (nothing
    above the diagonal is computed), for every start k0 ≤ qe, full tiles plus ragged remainders and bkv ≥ L."""
    from percausal_jax.models.blocked_attention import _causal_tiles

    @jax.jit
    def coverage(k0, qe):
        def tile(carry, ks, size):
            counts, end = carry
            ones = jax.lax.dynamic_slice_in_dim(counts, ks, size) + 1
            return jax.lax.dynamic_update_slice_in_dim(counts, ones, ks, 0), jnp.maximum(end, ks + size)
        return _causal_tiles(tile, (jnp.zeros(L, jnp.int32), k0), k0, qe, bq, bkv, L)

    for qe in range(bq, L + 1, bq):
        for k0 in sorted({0, bq, qe - bq, qe, qe // 2 // bq * bq}):
            counts, end = coverage(k0, qe)
            expect = (np.arange(L) >= k0) & (np.arange(L) < qe)
            np.testing.assert_array_equal(np.asarray(counts), expect.astype(np.int32))
            assert int(end) == qe


def test_first_keys_against_brute_force():
    """A block's first key: the earliest key any of its queries may see in any row, rounded down to the block size
    (a padding-only block gets its own end); segment ids in any order, repeated runs of one id included."""
    from percausal_jax.models.blocked_attention import first_keys

    rs = np.random.RandomState(0)
    for bq in (1, 4, 16):
        for rows in range(1, 4):
            L = 64
            seg = np.zeros((rows, L), np.int32)
            for b in range(rows):
                cuts = np.sort(rs.choice(np.arange(1, L), 5, replace=False))
                for j, (a, e) in enumerate(zip([0, *cuts], [*cuts, L])):
                    seg[b, a:e] = rs.choice([0, 1, 2, 3, 7])  # ids repeat and need not increase
            expect = []
            for blk in range(L // bq):
                firsts = [min(j for j in range(i + 1) if seg[b, j] == seg[b, i])
                          for b in range(rows) for i in range(blk * bq, (blk + 1) * bq) if seg[b, i] != 0]
                expect.append(min(firsts) // bq * bq if firsts else (blk + 1) * bq)
            np.testing.assert_array_equal(np.asarray(first_keys(jnp.asarray(seg), bq)), expect)


def test_blocked_kernel_on_packed_rows_skips_earlier_examples():
    """Packed rows only (no row starting at 0 to hide the skip): the kernel equals the dense one, forward and
    gradients, with ids that repeat out of order (segment 1 again after 2) and a block of padding only; and where
    each block's key tiles begin."""
    from percausal_jax.models.blocked_attention import first_keys

    L2 = 128
    seg = np.zeros((2, L2), np.int32)
    seg[0, :40], seg[0, 40:90], seg[0, 90:110] = 1, 2, 1
    seg[1, :56], seg[1, 56:96] = 3, 4
    pos = np.zeros_like(seg)
    for b in range(2):
        for s_id in np.unique(seg[b]):
            pos[b, seg[b] == s_id] = np.arange(int(np.sum(seg[b] == s_id)))
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    rs = np.random.RandomState(4)
    q, k, v = (jnp.asarray(rs.randn(2, L2, n, DH), jnp.float32) for n in (H, K, K))
    valid = (seg > 0)[:, :, None, None]
    w = jnp.asarray(rs.randn(2, L2, H, DH), jnp.float32)
    mask = layers.attention_mask(seg, pos, False, None)
    dense = lambda q, k, v: layers._xla_attention(q, k, v, mask, 0.3, None)  # noqa: E731
    blocked = lambda q, k, v: layers.blocked_attention(q, k, v, seg, pos, scale=0.3, block_q=16,  # noqa: E731
                                                        block_kv=32)
    out = blocked(q, k, v)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.asarray(out * valid), np.asarray(dense(q, k, v) * valid), atol=2e-6, rtol=0)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w * valid)  # noqa: E731
    for a, b in zip(jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, rtol=0)
    k0 = np.asarray(first_keys(seg, 16))
    # block 4 (queries 64–79): segments 2 (from 40) and 4 (from 56) → 32; blocks 5–6 hold row 0's segment 1 again
    # (first at 0) → 0; block 7 is padding in both rows → its own end, no tile
    np.testing.assert_array_equal(k0, [0, 0, 0, 0, 32, 0, 0, 128])


def test_blocked_kernel_program_size_does_not_grow_with_length():
    """Query blocks and key tiles are loops, not unrolled: the lowered forward + backward program is as long at 4096
    tokens as at 1024 (so compile time and compile memory do not grow with the sequence either)."""
    def program_chars(n):
        q, k = jnp.zeros((1, n, 2, 8)), jnp.zeros((1, n, 1, 8))
        seg, pos = jnp.ones((1, n), jnp.int32), jnp.arange(n, dtype=jnp.int32)[None]
        loss = lambda q, k, v, seg, pos: jnp.sum(layers.blocked_attention(  # noqa: E731
            q, k, v, seg, pos, scale=0.3, softcap=2.0, window=16, sliding=True))
        return len(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, seg, pos).as_text())

    assert program_chars(4096) < 1.3 * program_chars(1024)


def test_no_dense_mask_in_the_blocked_model():
    """With ``blocked`` no [B, 1, L, L] mask (nor any [.., L, L] array) is built; the xla model has them."""
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5)
    ids = jnp.zeros((2, 96), jnp.int32)

    def square_arrays(impl):
        model = CausalLM(cfg, scan_layers=True, attention_impl=impl)
        text = str(jax.make_jaxpr(lambda m, x: m.hidden_states(x))(model, ids))
        return "96,96]" in text

    assert square_arrays("xla")
    assert not square_arrays("blocked")


# ------------------------------------------------------------------------------------------------- models

FAMILIES = {
    "llama_gqa": ("llama", {}),
    "mistral_window": ("mistral", {"sliding_window": 5}),
    "qwen3": ("qwen3", {"head_dim": 24}),
    "gemma2_softcap_window": ("gemma2", {"sliding_window": 5, "attn_logit_softcapping": 1.0,
                                         "final_logit_softcapping": 2.0}),
    "gemma3_mixed_layers": ("gemma3_text", {"sliding_window": 5,
                                            "layer_types": ["sliding_attention", "full_attention"]}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    model_type, overrides = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    return d, tiny_hf_model(model_type, d, **overrides)


def _padded_and_packed(vocab: int = 256, n: int = 100):
    """Row 0 left-padded (3), row 1 two packed sequences (40 + 50) then right padding (10); over one query block."""
    rs = np.random.RandomState(4)
    ids = rs.randint(3, vocab, (2, n))
    seg = np.ones((2, n), np.int32)
    seg[0, :3] = 0
    seg[1, 40:90], seg[1, 90:] = 2, 0
    pos = np.zeros_like(seg)
    pos[0, 3:] = np.arange(n - 3)
    pos[1, :40], pos[1, 40:90] = np.arange(40), np.arange(50)
    return ids, seg, pos


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_blocked_model_matches_transformers(family, scan):
    d, torch_model = family
    ids = np.random.RandomState(1).randint(0, 256, (2, 100))  # more than one query block (layers.BLOCK_Q)
    ours = np.asarray(pj.load_pretrained(d, scan_layers=scan, attention_impl="blocked")(ids))
    np.testing.assert_allclose(ours, torch_logits(torch_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_blocked_model_logits_and_grads_match_xla(family, scan):
    """Padding and packing; the loss reads real rows only (as every objective does)."""
    d, _ = family
    ids, seg, pos = _padded_and_packed()
    real = jnp.asarray(seg > 0)

    def logits_and_grads(impl):
        model = pj.load_pretrained(d, scan_layers=scan, attention_impl=impl)

        def loss(model):
            logits = model(ids, positions=pos, segment_ids=seg)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * real), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return np.asarray(logits)[seg > 0], jax.tree.leaves(nnx.state(grads, nnx.Param))

    lx, gx = logits_and_grads("xla")
    lb, gb = logits_and_grads("blocked")
    np.testing.assert_allclose(lb, lx, atol=2e-5, rtol=0)
    for a, b in zip(gb, gx):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_blocked_model_cached_decode_equals_full_forward(family, scan):
    """The KV-cached path (Attention.decode with chunk_attention_mask) of a blocked model gives its full forward."""
    d, _ = family
    model = pj.load_pretrained(d, scan_layers=scan, attention_impl="blocked")
    prompts = [np.random.RandomState(s).randint(3, 256, n).tolist() for s, n in ((0, 9), (1, 3), (2, 6))]
    tokens, seg, positions, P = left_pad(prompts, 9 + 4)
    tokens[:, P:] = np.random.RandomState(5).randint(3, 256, (3, 4))

    cached, full = cached_and_full_hidden(model, tokens, seg, positions, P)
    np.testing.assert_allclose(np.asarray(cached)[seg == 1], np.asarray(full)[seg == 1], atol=1e-5, rtol=0)


def test_remat_policies_with_blocked(tiny_llama_dir):
    """The custom VJP under jax.checkpoint: every policy gives the logits and gradients of no rematerialization."""
    ids = np.random.RandomState(0).randint(0, 256, (2, 100))
    loss = lambda m: (m(ids) ** 2).mean()  # noqa: E731

    def run(policy):
        model = pj.load_pretrained(tiny_llama_dir, scan_layers=True, remat_policy=policy, attention_impl="blocked")
        return np.asarray(model(ids)), jax.tree.leaves(nnx.state(nnx.grad(loss)(model), nnx.Param))

    base, ref_grads = run("none")
    for policy in ("full", "minimal"):
        logits, grads = run(policy)
        np.testing.assert_allclose(logits, base, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6)


# ----------------------------------------------------------------------------------------------- "auto"

def _cfg(**changes):
    base = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("backend, dtype, softcap, expected", [
    ("cpu", jnp.float32, None, "blocked"),
    ("cpu", jnp.bfloat16, 50.0, "blocked"),
    ("tpu", jnp.bfloat16, None, "splash"),
    ("tpu", jnp.float32, 50.0, "blocked"),
    ("gpu", jnp.bfloat16, None, "cudnn"),
    ("gpu", jnp.float32, None, "blocked"),
    ("gpu", jnp.bfloat16, 50.0, "blocked"),
])
def test_auto_resolution(backend, dtype, softcap, expected):
    cfg = _cfg(attn_logit_softcap=softcap)
    assert layers.resolve_attention_impl("auto", cfg, dtype, backend) == expected
    assert layers.resolve_attention_impl("xla", cfg, dtype, backend) == "xla"


def test_auto_on_tpu_avoids_splash_only_for_mixed_windows_under_scan():
    mixed = _cfg(model_type="gemma3_text", sliding_window=4, layer_types=("sliding_attention", "full_attention"))
    assert len(set(mixed.sliding_layers)) == 2
    assert layers.resolve_attention_impl("auto", mixed, jnp.bfloat16, "tpu", scan_layers=True) == "blocked"
    assert layers.resolve_attention_impl("auto", mixed, jnp.bfloat16, "tpu", scan_layers=False) == "splash"
    assert layers.resolve_attention_impl("auto", _cfg(), jnp.bfloat16, "tpu", scan_layers=True) == "splash"
    assert CausalLM(_cfg(), attention_impl="auto", backend="tpu").model.attention_impl == "splash"


def test_auto_on_this_host_is_blocked_and_unknown_names_fail():
    model = CausalLM(_cfg(), attention_impl="auto")
    assert model.model.attention_impl == "blocked"
    with pytest.raises(ValueError, match="attention_impl"):
        CausalLM(_cfg(), attention_impl="flash")
    assert set(CHOICES["model.attention_impl"]) == set(layers.ATTENTION_IMPLEMENTATIONS)


# ------------------------------------------------------------------------- blocked kernel vs an independent mask

def _rows_by_hand():
    """Three rows of 77 tokens, segment ids and positions written out: row 0 left-padded (9) then one sequence;
    row 1 packed (ids 1, 2, 3 of 20, 25, 25 tokens) then right padding (7); row 2 ids 5, 2, then 5 again (a
    sequence continued after another one: its positions go on from 25), then padding (17)."""
    seg = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    seg[0, 9:], pos[0, 9:] = 1, np.arange(68)
    seg[1, :20], pos[1, :20] = 1, np.arange(20)
    seg[1, 20:45], pos[1, 20:45] = 2, np.arange(25)
    seg[1, 45:70], pos[1, 45:70] = 3, np.arange(25)
    seg[2, :25], pos[2, :25] = 5, np.arange(25)
    seg[2, 25:45], pos[2, 25:45] = 2, np.arange(20)
    seg[2, 45:60], pos[2, 45:60] = 5, np.arange(25, 40)
    return seg, pos


def _mask_by_the_rule(seg, pos, window):
    """bool[B, L, L], one (query i, key j) pair at a time, from the rule the model documents: i sees j iff both
    are in the same non-zero segment, j is not after i (by index), and, with a window, pos_i − pos_j < window."""
    n_rows, n = seg.shape
    mask = np.zeros((n_rows, n, n), bool)
    for b in range(n_rows):
        for i in range(n):
            for j in range(n):
                mask[b, i, j] = (seg[b, i] != 0 and seg[b, j] == seg[b, i] and j <= i
                                 and (window is None or pos[b, i] - pos[b, j] < window))
    return mask


def _softmax_attention_np(q, k, v, mask, scale, softcap):
    """float64 numpy, one row, head and query at a time; query head h reads key/value head h // (H / K)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    group = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            s = q[b, :, h] @ k[b, :, h // group].T * scale
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            for i in range(q.shape[1]):
                seen = mask[b, i]
                if seen.any():
                    p = np.exp(s[i, seen] - s[i, seen].max())
                    out[b, i, h] = (p / p.sum()) @ v[b, seen, h // group]
    return out


def _softmax_attention_jnp(q, k, v, mask, scale, softcap):
    """The same in jnp (differentiable), with K/V repeated per query head."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(jnp.asarray(mask)[:, None], s, -1e30)
    return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(s, axis=-1), v)


INDEPENDENT_CASES = {  # name: (softcap, window, sliding, (block_q, block_kv))
    "causal_13x7": (None, None, False, (13, 7)),
    "window_16x16": (None, 6, True, (16, 16)),
    "window_off_64x512": (None, 6, False, (64, 512)),
    "window_softcap_16x32": (1.5, 5, True, (16, 32)),
}


@pytest.mark.parametrize("case", sorted(INDEPENDENT_CASES))
def test_blocked_kernel_against_a_mask_written_from_segments_and_positions(case):
    """The blocked kernel (forward and gradients) against plain softmax attention under a mask written pair by
    pair from segment ids and positions (not from ``tile_mask``, which the dense kernel shares): left padding,
    packed rows, a sequence continued after another (window by position, not by index), soft-capping, GQA."""
    softcap, window, sliding, blocks = INDEPENDENT_CASES[case]
    seg, pos = _rows_by_hand()
    mask = _mask_by_the_rule(seg, pos, window if sliding else None)
    # the rule's consequences, spelled out: padding sees and is seen by nothing; row 2's second run of id 5
    # (index 45, position 25) sees the first run, with a window of 6 only its positions (= indices) 20–24
    assert not mask[0, :9].any() and not mask[0, :, :9].any() and not mask[1, 70:].any()
    assert mask[2, 45, :25].sum() == (window - 1 if sliding else 25) and not mask[2, 45, 25:45].any()
    np.testing.assert_array_equal(np.asarray(layers.attention_mask(jnp.asarray(seg), jnp.asarray(pos), sliding,
                                                                   window))[:, 0], mask)
    q, k, v = _qkv(5)
    valid = (seg > 0)[:, :, None, None]
    w = jnp.asarray(np.random.RandomState(6).randn(B, L, H, DH), jnp.float32)

    def blocked(q, k, v):
        return layers.blocked_attention(q, k, v, jnp.asarray(seg), jnp.asarray(pos), scale=0.3, softcap=softcap,
                                        window=window, sliding=sliding, block_q=blocks[0], block_kv=blocks[1])

    def reference(q, k, v):
        return _softmax_attention_jnp(q, k, v, mask, 0.3, softcap)

    out = np.asarray(blocked(q, k, v))
    expect = _softmax_attention_np(q, k, v, mask, 0.3, softcap)
    np.testing.assert_allclose(out * valid, expect * valid, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(reference(q, k, v)) * valid, expect * valid, atol=2e-6, rtol=0)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w * valid)  # padding rows' outputs are read by nobody

    for a, b in zip(jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, rtol=0)
