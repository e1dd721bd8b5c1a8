"""The accelerator kernels run on CPU: splash in Pallas interpret mode, and the cudnn path's
``jax.nn.dot_product_attention`` call with ``implementation="xla"``, against the blocked and dense ``xla`` kernels,
forward and gradients w.r.t. q, k, v (float32; only real rows are compared and weighted in the loss: nothing reads a
padding row's output).

Splash (``layers.SPLASH_INTERPRET``): interpret mode runs the kernel's own grid, index maps, block-sparse mask
tables and online softmax, forward and backward (dq and dkv kernels), through the production ``_splash_attention``
(and ``shard_map`` under a mesh). It cannot show what only the TPU compiler and hardware do: Mosaic lowering and its
layout/tiling rules (head_dim 16 here is fine in interpret mode; ``tests/training/test_aot.py`` compiles splash for a
TPU topology at head_dim 128), VMEM limits, bf16 MXU numerics and performance.

cudnn (``layers.cudnn_attention``): ``implementation`` is the call's only difference from the model's; cuDNN's own
kernel (and its sliding-window and padding masks) needs a GPU. Packed or left-padded batches go through the blocked
kernel, chosen on the device by ``layers.one_segment_per_row``.

Tolerances: forward 2e-6 and gradients 1e-5 absolute, for float32 values up to ~6: the kernels sum the same terms
in different orders (tiles of 128 vs 64×512 keys, online vs one-pass softmax), i.e. float32 rounding only (seen:
≤ 4e-7 forward, ≤ 2.2e-6 gradients); a wrong mask entry changes values at O(0.1).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percausal_jax.models import layers
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.decoder import CausalLM

L, H, DH, WINDOW = 256, 2, 16, 24  # L: splash tiles by layers.SPLASH_BLOCK = 128
FWD_ATOL, GRAD_ATOL = 2e-6, 1e-5

LAYOUTS = {  # rows of (segment id, length) runs; positions restart at 0 in each run
    "full": [[(1, L)], [(1, L)]],
    "right_padded": [[(1, 200), (0, 56)], [(1, 131), (0, 125)]],
    # several segments per row and padding; row 1 left-padded
    "packed": [[(1, 100), (2, 60), (3, 70), (0, 26)], [(0, 9), (1, 120), (2, 127)]],
}


def _layout(name):
    """seg, pos int32[2, L] of :data:`LAYOUTS`."""
    seg, pos = [], []
    for runs in LAYOUTS[name]:
        assert sum(n for _, n in runs) == L
        seg.append(np.concatenate([np.full(n, s) for s, n in runs]))
        pos.append(np.concatenate([np.arange(n) for _, n in runs]))
    return jnp.asarray(np.stack(seg), jnp.int32), jnp.asarray(np.stack(pos), jnp.int32)


def _cfg(K, window=None):
    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=H, num_key_value_heads=K, head_dim=DH, rms_norm_eps=1e-5,
                       sliding_window=window)


def _inputs(seg, K, seed=0):
    rs = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(rs.randn(seg.shape[0], L, n, DH), jnp.float32) for n in (H, K, K))
    w = jnp.asarray(rs.randn(seg.shape[0], L, H, DH), jnp.float32)
    return q, k, v, w * (seg > 0)[:, :, None, None]  # padding rows are read by nobody


def _out_and_grads(f, q, k, v, w):
    """f(q, k, v) and the gradients of Σ f·w w.r.t. q, k, v."""
    loss = lambda q, k, v: (lambda o: (jnp.sum(o * w), o))(f(q, k, v))  # noqa: E731
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(got, want, seg):
    (out, grads), (ref_out, ref_grads) = got, want
    real = np.asarray(seg > 0)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=FWD_ATOL, rtol=0)
    for name, a, b in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=GRAD_ATOL, rtol=0, err_msg=f"d{name}")


def _reference(impl, q, k, v, w, seg, pos, cfg, sliding):
    """(out, grads) of the ``impl`` kernel through :func:`layers.attention`."""
    return _out_and_grads(lambda q, k, v: layers.attention(impl, q, k, v, seg, pos, cfg, sliding), q, k, v, w)


# ----------------------------------------------------------------------------------------------------- splash

SPLASH_CASES = {  # name: (layout, K, window)
    "causal": ("full", 2, None),
    "packed": ("packed", 2, None),
    "window": ("packed", 2, WINDOW),
    "gqa": ("packed", 1, None),
}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(layers, "SPLASH_INTERPRET", True)


@pytest.mark.parametrize("case", sorted(SPLASH_CASES))
def test_splash_matches_blocked_and_xla(case, interpret):
    layout, K, window = SPLASH_CASES[case]
    seg, pos = _layout(layout)
    cfg = _cfg(K, window)
    q, k, v, w = _inputs(seg, K)
    sliding = window is not None
    got = _out_and_grads(lambda q, k, v: layers.attention("splash", q, k, v, seg, pos, cfg, sliding), q, k, v, w)
    for impl in ("blocked", "xla"):
        _assert_close(got, _reference(impl, q, k, v, w, seg, pos, cfg, sliding), seg)


def test_splash_under_a_mesh_runs_per_shard(interpret):
    """Under a mesh the kernel runs in a shard_map (batch over fsdp, heads over tensor): the same values."""
    seg, pos = _layout("packed")
    cfg = _cfg(2)
    q, k, v, w = _inputs(seg, 2, seed=1)
    f = lambda q, k, v: layers.attention("splash", q, k, v, seg, pos, cfg, False)  # noqa: E731
    mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        got = _out_and_grads(f, q, k, v, w)
    _assert_close(got, _out_and_grads(f, q, k, v, w), seg)


# ------------------------------------------------------------------------------------------------------ cudnn

CUDNN_CASES = {  # name: (layout, K, window); "packed_window": the blocked fallback (packed rows, left padding)
    "causal": ("full", 2, None),
    "right_padded_gqa": ("right_padded", 1, None),
    "right_padded_window": ("right_padded", 2, WINDOW),
    "packed_window": ("packed", 1, WINDOW),
}


@pytest.mark.parametrize("case", sorted(CUDNN_CASES))
def test_cudnn_call_matches_blocked(case):
    layout, K, window = CUDNN_CASES[case]
    seg, pos = _layout(layout)
    cfg = _cfg(K, window)
    q, k, v, w = _inputs(seg, K)
    sliding = window is not None
    got = _out_and_grads(lambda q, k, v: layers.cudnn_attention(q, k, v, seg, pos, cfg, sliding, "xla"), q, k, v, w)
    _assert_close(got, _reference("blocked", q, k, v, w, seg, pos, cfg, sliding), seg)


def test_cudnn_call_with_a_traced_sliding_flag():
    """Scanned Gemma2/3 layers pass the window flag traced: both values select their dense call."""
    cfg = _cfg(2, WINDOW)
    seg, pos = _layout("right_padded")
    q, k, v, w = _inputs(seg, 2, seed=2)
    run = jax.jit(lambda flag: _out_and_grads(
        lambda q, k, v: layers.cudnn_attention(q, k, v, seg, pos, cfg, flag, "xla"), q, k, v, w))
    for flag in (False, True):
        _assert_close(run(jnp.asarray(flag)), _reference("xla", q, k, v, w, seg, pos, cfg, flag), seg)


def test_one_segment_per_row():
    """The batches the dense call's arguments express: one segment from index 0, right padding; positions that
    count up by one when windowed."""
    simple = lambda layout, windowed=False: bool(layers.one_segment_per_row(*_layout(layout), windowed))  # noqa
    assert simple("full") and simple("right_padded") and simple("right_padded", True)
    assert not simple("packed")
    seg, pos = _layout("right_padded")
    assert not layers.one_segment_per_row(seg.at[1, :4].set(0), pos, False)  # left padding
    assert not layers.one_segment_per_row(seg.at[0, 150:200].set(2), pos, False)  # two segments
    assert not layers.one_segment_per_row(seg.at[0, 150:170].set(0), pos, False)  # a hole
    assert layers.one_segment_per_row(seg * 3, pos + 5, True)  # any id, positions from any start
    assert layers.one_segment_per_row(seg, pos.at[0, 20].set(0), False)
    assert not layers.one_segment_per_row(seg, pos.at[0, 20].set(0), True)  # positions that jump
    assert layers.one_segment_per_row(jnp.zeros_like(seg), pos, True)  # padding only


def _recording_dpa(calls, implementation=None):
    """A stand-in for jax.nn.dot_product_attention that records its keyword arguments: the real call with
    ``implementation`` if given, else zeros (no L×L logits in the program)."""
    real = jax.nn.dot_product_attention

    def dpa(q, k, v, bias=None, mask=None, **kw):
        calls.append(dict(kw, bias=bias, mask=mask))
        if implementation is None:
            return jnp.zeros_like(q)
        return real(q, k, v, bias, mask, **{**kw, "implementation": implementation})

    return dpa


def test_no_dense_mask_in_the_cudnn_model(monkeypatch):
    """The cudnn model builds no [B, 1, L, L] mask (nor any [.., L, L] array: the fallback is blocked) and calls
    jax.nn.dot_product_attention with causality, lengths and windows as arguments."""
    cfg = dataclasses.replace(_cfg(1, 5), num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", _recording_dpa(calls))
    ids = jnp.zeros((2, 96), jnp.int32)
    for scan in (False, True):
        model = CausalLM(cfg, scan_layers=scan, attention_impl="cudnn")
        assert "96,96]" not in str(jax.make_jaxpr(lambda m, x: m.hidden_states(x))(model, ids))
    assert calls and all(c["mask"] is None and c["bias"] is None and c["is_causal"] for c in calls)
    assert all(c["implementation"] == "cudnn" and c["query_seq_lengths"].shape == (2,) for c in calls)
    assert {c["local_window_size"] for c in calls} == {None, (4, 0)}


def test_cudnn_model_matches_blocked(monkeypatch):
    """A cudnn model (its call run with implementation="xla") against a blocked one, both scanned with a sliding
    and a global layer: logits and parameter gradients, on the dense call (right padding) and the fallback (packed
    rows, left padding)."""
    from flax import nnx

    cfg = dataclasses.replace(_cfg(1, WINDOW), num_hidden_layers=2,
                              layer_types=("sliding_attention", "full_attention"))
    monkeypatch.setattr(jax.nn, "dot_product_attention", _recording_dpa([], "xla"))

    def logits_and_grads(impl):
        @jax.jit
        def run(state, ids, seg, pos):
            def loss(model):
                logits = model(ids, positions=pos, segment_ids=seg)
                return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * (seg > 0)), logits

            (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(nnx.merge(graphdef, state))
            return logits, nnx.state(grads, nnx.Param)

        graphdef, state = nnx.split(CausalLM(cfg, scan_layers=True, attention_impl=impl))
        return run, state

    (cudnn, s_c), (blocked, s_b) = logits_and_grads("cudnn"), logits_and_grads("blocked")
    for layout in ("right_padded", "packed"):
        seg, pos = _layout(layout)
        ids = jnp.asarray(np.random.RandomState(3).randint(0, 64, seg.shape), jnp.int32)
        (lc, gc), (lb, gb) = cudnn(s_c, ids, seg, pos), blocked(s_b, ids, seg, pos)
        real = np.asarray(seg > 0)
        np.testing.assert_allclose(np.asarray(lc)[real], np.asarray(lb)[real], atol=2e-5, rtol=0, err_msg=layout)
        for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gb)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4, err_msg=layout)
