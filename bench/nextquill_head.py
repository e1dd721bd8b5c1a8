"""NextQuill without ``[B, R, V]``, measured: (1) the head alone, the full-logit computation NextQuill used before
against today's one-scan chunked pair (both passes' gold log-probs and log softmax(z_p − z_c), forward + backward),
compiled temporaries and time at Qwen2.5's vocabulary; (2) the three gradient-accumulation paths of the train step
(pooled: forward-only pre-pass of gold-token probabilities for Σω; ``weighted_lp``: one shared Σω, unnormalized
gradients divided once; ``per_sequence``: normalizers from the data) against one un-accumulated step of the same
global batch, time per step alternated in one process.

(1) hidden ``[B, R, D]`` of both passes and the head ``[D, V]`` are random fp32 inputs (D = 896, V = 151,936);
(2) a random 2-layer Llama (D = 256, V = 32,768) from ``CausalLM``, SGD, ``make_train_step`` (the library's step).

    .venv/bin/python bench/nextquill_head.py                    # writes its section of bench/RESULTS.md
    .venv/bin/python bench/nextquill_head.py --rounds 1 --response 64 --no-write      # quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import collate_examples, gib, info_block, llama_config, machine_info, md_table, synthetic_examples, write_section


def head_section(args) -> tuple[str, list]:
    import jax
    import jax.numpy as jnp

    from percausal_jax.objectives.logprobs import chunked_pair_outputs

    B, R, D, V = args.batch, args.response, 896, 151_936
    rng = np.random.RandomState(0)
    h_p, h_c = (jnp.asarray(rng.normal(size=(B, R, D)).astype(np.float32)) for _ in range(2))
    head = jnp.asarray((rng.normal(size=(D, V)) * 0.05).astype(np.float32))
    ids = jnp.asarray(rng.randint(0, V, size=(B, R)).astype(np.int32))

    def full(hp, hc, w):  # what NextQuill computed before: full f32 logits of both passes, their difference
        zp = jnp.einsum("brd,dv->brv", hp, w, preferred_element_type=jnp.float32)
        zc = jnp.einsum("brd,dv->brv", hc, w, preferred_element_type=jnp.float32)
        gold = lambda z: jnp.take_along_axis(jax.nn.log_softmax(z, -1), ids[..., None], -1)[..., 0]  # noqa: E731
        return gold(zp), gold(zc), gold(zp - zc)

    def chunked(hp, hc, w):
        p, c, contrast = chunked_pair_outputs(hp, hc, w, ids, chunk_size=args.chunk)
        return p.logp, c.logp, contrast

    def step(fn):
        loss = lambda hp, hc, w: sum(jnp.sum(o) for o in fn(hp, hc, w))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(h_p, h_c, head).compile()

    compiled = {"full [B, R, V] logits (before)": step(full), f"chunked pair, chunk {args.chunk} (now)": step(chunked)}
    times = {k: [] for k in compiled}
    for _ in range(args.rounds):
        for k, fn in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(h_p, h_c, head))
            times[k].append(time.perf_counter() - t0)
    (v_full, g_full), (v_ch, g_ch) = (c(h_p, h_c, head) for c in compiled.values())
    err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
              for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_ch)))
    rows = [[k, gib(c.memory_analysis().temp_size_in_bytes), f"{statistics.median(times[k]):.3f}"]
            for k, c in compiled.items()]
    text = (f"Head alone: B={B}, R={R}, D={D}, V={V:,}, fp32, forward + backward w.r.t. both hidden states and the "
            f"head; median of {args.rounds} alternated rounds. One f32 [B, R, V] buffer is "
            f"{gib(B * R * V * 4)} GiB. Largest relative gradient difference between the two: {err:.1e}.\n\n"
            + md_table(["head", "compiled temporaries GiB", "s / step"], rows))
    return text, rows


def accumulation_section(args) -> str:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from percausal_jax.models.decoder import CausalLM
    from percausal_jax.objectives import NextQuill
    from percausal_jax.training.step import init_state, jit_train_step, make_train_step

    mc = llama_config(hidden=256, layers=2, heads=4, kv_heads=2, ffn=1024, vocab=32_768)
    model = CausalLM(mc, scan_layers=True, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(1e-3)
    examples = synthetic_examples(args.accum_batch, args.personal, args.personal // 4, args.response, mc.vocab_size)
    batch = jax.tree.map(jnp.asarray, collate_examples(examples))
    cases = {
        "pooled, k=1 (no accumulation)": (NextQuill(), 1),
        "pooled, k=4 (pre-pass for Σω)": (NextQuill(), 4),
        "weighted_lp, k=4 (shared Σω, divided once)": (NextQuill(weighted_lp=True), 4),
        "per_sequence, k=4 (data normalizers)": (NextQuill(per_sequence=True), 4),
    }
    steps, state = {}, init_state(params, tx)
    for name, (obj, k) in cases.items():
        fn = make_train_step(graphdef, tx, optax.constant_schedule(1e-3), obj, grad_accum_steps=k, chunk_size=8192)
        steps[name] = jit_train_step(fn, state)
    times = {k: [] for k in cases}
    for r in range(args.rounds + 1):  # round 0 compiles
        for name, fn in steps.items():
            s = jax.tree.map(jnp.copy, state)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(s, frozen, None, batch))
            if r:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["pooled, k=1 (no accumulation)"])
    rows = [[name, f"{statistics.median(t):.3f}", f"{statistics.median(t) / base:.2f}"] for name, t in times.items()]
    return (f"Train step, random 2-layer Llama (D=256, V=32,768, scan), global batch {args.accum_batch} × "
            f"(Lp {args.personal}, Lc {args.personal // 4}, R {args.response}), SGD; median of {args.rounds} "
            "alternated rounds.\n\n" + md_table(["NextQuill variant", "s / step", "× pooled k=1"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--personal", type=int, default=512)
    ap.add_argument("--accum-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    info = machine_info()
    t0 = time.perf_counter()
    head_text, _ = head_section(args)
    print(head_text, flush=True)
    accum_text = accumulation_section(args)
    print(accum_text, flush=True)
    body = (info_block({**info, "wall_s": f"{time.perf_counter() - t0:.0f}"}) + "\n\n" + head_text + "\n\n"
            + accum_text + "\n\nReading: the chunked pair needs the same two head matmuls per chunk as the two "
            "passes (the contrast is their difference, taken per chunk in f32), recomputed once in the backward "
            "(remat), so it trades some time for never holding [B, R, V]; the hidden-state-difference form "
            "(h_p − h_c)·W would add a third matmul (log p_h and log p_0 each still need their own normalizer) and "
            "is not exact under a soft-capped head. The pre-pass of the pooled variant costs one forward of both "
            "passes without the contrast; weighted_lp and per_sequence need none.")
    if not args.no_write:
        write_section("NextQuill head and accumulation (no [B, R, V], no Σω pre-pass where exact)", body)


if __name__ == "__main__":
    main()
