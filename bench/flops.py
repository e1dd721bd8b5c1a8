"""FLOP floor of the two-pass objectives: compiled XLA FLOPs of the train step for ce, perce and nextquill on the
same batch, against the physical floor.

Floor (what a perfect implementation costs relative to CE):
- PerCE: CE step + one forward of the counterfactual pass (no backward: the weights are stop-gradient)
  → floor = 1 + F_fwd(cf) / F_fwd+bwd(p).
- NextQuill: its alignment term differentiates through the counterfactual pass
  → floor = 1 + F_fwd+bwd(cf) / F_fwd+bwd(p).
Two versions of each floor are reported:
- "analytic": ``percausal_jax.training.aot.forward_flops`` (matmuls + dense attention + LM head at response
  positions), backward = 2× forward;
- "xla": the same pieces compiled and counted by XLA (F_fwd(cf) = a jitted forward of the counterfactual pass with
  the chunked gold log-prob head, as PerCE runs it; F_fwd+bwd(cf) = value_and_grad of CE on the counterfactual pass
  with full logits at response positions, as NextQuill runs it; denominator = the compiled CE train step). Same counting conventions as the measured numbers, so ratio ÷ floor_xla isolates waste.

``scan_layers=False`` so XLA's cost analysis counts every layer (with scan it counts the loop body once), and the
vocabulary-chunked gold log-prob head runs as ONE chunk (``--chunk-size 0`` = V) for the same reason: it is a
``lax.scan`` over chunks whose body XLA counts once. The FLOPs of the head do not depend on the chunk size (up to the
padding of the last chunk); only its memory does. Nothing is
allocated: model, optimizer state and batch are abstract (ShapeDtypeStruct), only lower+compile runs.

    .venv/bin/python bench/flops.py                   # ~100M Llama, B=4, R=128, short and long profile
    .venv/bin/python bench/flops.py --layers 2        # quick
"""

from __future__ import annotations

import argparse
import time

from common import (
    abstract_batch,
    abstract_model,
    collate_examples,
    compile_train_step,
    flops_of,
    info_block,
    llama_config,
    machine_info,
    md_table,
    synthetic_examples,
    write_section,
)

OBJECTIVES = ("ce", "perce", "nextquill")
TARGET = 1.02


def component_flops(graphdef, params, frozen, batch_abs, chunk_size: int) -> tuple[float, float]:
    """XLA-counted pieces of the floors: (F_fwd(cf) with the chunked gold head, as PerCE runs it; F_fwd+bwd(cf) of
    a CE loss on the counterfactual pass with full logits at response positions, as NextQuill runs it)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from percausal_jax.objectives.registry import Requirements, pass_outputs

    def cf_nll(req):
        def f(params, frozen, batch):
            model = nnx.merge(graphdef, params, frozen)
            r = batch["response"]
            out = pass_outputs(model, batch["counterfactual"], r["index_counterfactual"], r["ids"], req, chunk_size)
            return -jnp.sum(out.logp * r["weight"]) / jnp.maximum(jnp.sum(r["weight"]), 1.0)
        return f

    fwd = jax.jit(cf_nll(Requirements())).lower(params, frozen, batch_abs).compile()
    fwd_bwd = jax.jit(jax.value_and_grad(cf_nll(Requirements(full_logits=True)))).lower(
        params, frozen, batch_abs).compile()
    return flops_of(fwd), flops_of(fwd_bwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--cf-prompt", type=int, default=64, help="counterfactual prompt tokens (the query)")
    ap.add_argument("--short-ratio", type=float, default=2.0, help="personal prompt / cf prompt, short profile")
    ap.add_argument("--long-ratio", type=float, default=10.0, help="personal prompt / cf prompt, long profile")
    ap.add_argument("--remat", default="none", help="remat policy (none: backward = 2x forward, as the floor)")
    ap.add_argument("--chunk-size", type=int, default=0,
                    help="vocabulary chunk of the gold log-prob head (0: the whole vocabulary in one chunk; XLA's "
                         "cost analysis counts a lax.scan body once, so with several chunks it undercounts the head)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch bench/RESULTS.md")
    args = ap.parse_args()

    import optax

    from percausal_jax.objectives.losses import default_config
    from percausal_jax.training.aot import forward_flops

    info = machine_info()
    chunk = args.chunk_size or args.vocab
    mc = llama_config(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab)
    graphdef, params, frozen = abstract_model(mc, scan_layers=False, remat=args.remat)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    obj_cfg = default_config()

    rows, notes = [], []
    t_all = time.time()
    for case, ratio in (("short profile", args.short_ratio), ("long profile", args.long_ratio)):
        pp = round(args.cf_prompt * ratio)
        examples = synthetic_examples(args.batch, pp, args.cf_prompt, args.response, args.vocab, seed=0)
        batch = collate_examples(examples)
        babs = abstract_batch(batch)
        B, Lp = batch["personal"]["tokens"].shape
        Lc, R = batch["counterfactual"]["tokens"].shape[1], batch["response"]["ids"].shape[1]
        t0 = time.time()
        fl = {o: flops_of(compile_train_step(graphdef, params, frozen, babs, o, obj_cfg, tx,
                                             chunk_size=chunk)) for o in OBJECTIVES}
        f_cf_fwd, f_cf_fwdbwd = component_flops(graphdef, params, frozen, babs, chunk)
        fp_a, fc_a = forward_flops(mc, B, Lp, R), forward_flops(mc, B, Lc, R)
        floors_analytic = {"perce": 1 + fc_a / (3 * fp_a), "nextquill": 1 + 3 * fc_a / (3 * fp_a)}
        floors_xla = {"perce": 1 + f_cf_fwd / fl["ce"], "nextquill": 1 + f_cf_fwdbwd / fl["ce"]}
        print(f"[{case}] B={B} Lp={Lp} Lc={Lc} R={R}: compiled in {time.time() - t0:.0f} s; "
              + ", ".join(f"{o}={fl[o]:.4e}" for o in OBJECTIVES)
              + f"; cf fwd {f_cf_fwd:.4e}, cf fwd+bwd {f_cf_fwdbwd:.4e}", flush=True)
        rows.append([case, f"{B}×{Lp} / {B}×{Lc} / {R}", "ce", fl["ce"], "1", "–", "–", "–", "–"])
        for o in ("perce", "nextquill"):
            meas = fl[o] / fl["ce"]
            rows.append([case, f"{B}×{Lp} / {B}×{Lc} / {R}", o, fl[o]] + [f"{x:.4f}" for x in (
                meas, floors_analytic[o], floors_xla[o], meas / floors_analytic[o], meas / floors_xla[o])])
        # where FLOPs beyond the floors go, in units of one LM-head forward at response positions
        head_fwd = 2 * B * R * mc.hidden_size * mc.vocab_size
        notes.append(f"- {case}: one LM-head forward at response positions (2·B·R·D·V) = {head_fwd:.3e} FLOPs = "
                     f"{head_fwd / fl['ce']:.3f} of the CE step; NextQuill − xla floor = "
                     f"{(fl['nextquill'] - fl['ce'] * floors_xla['nextquill']) / head_fwd:+.2f} head forwards; "
                     f"PerCE − xla floor = {(fl['perce'] - fl['ce'] * floors_xla['perce']) / head_fwd:+.2f}.")

    headers = ["case", "B×Lp / B×Lc / R", "objective", "compiled FLOPs", "ratio vs ce", "floor (analytic)",
               "floor (xla)", "ratio ÷ floor (analytic)", "ratio ÷ floor (xla)"]
    table = md_table(headers, rows)
    print(table)
    print("\n".join(notes))
    print(f"total {time.time() - t_all:.0f} s")
    met = all(float(r[8]) <= TARGET for r in rows if r[2] != "ce")
    body = "\n".join([
        info_block({**info, "model": f"random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
                    f"/ {args.kv_heads} KV heads, ffn {args.ffn}, vocab {args.vocab}, untied head, "
                    f"{mc.num_params() / 1e6:.1f}M params, fp32, scan_layers=False, remat={args.remat!r}, "
                    f"vocab chunk {chunk} (one chunk: see below), AdamW",
                    "batch": f"B={args.batch}, response {args.response} tokens, counterfactual prompt "
                    f"{args.cf_prompt} tokens, personal prompt {args.short_ratio:g}× (short) / "
                    f"{args.long_ratio:g}× (long) that; random ids; each pass padded to a multiple of 16"}),
        "",
        table,
        "",
        *notes,
        "",
        (f"Target ratio ÷ floor ≤ {TARGET}: **{'met' if met else 'NOT met'}** (judged on the xla floor, which uses "
        "XLA's own counting on both sides; the analytic floor counts matmuls and attention only, no norms, RoPE, "
        "softmax or optimizer, hence ratio ÷ analytic floor slightly below 1). PerCE costs exactly CE + one "
        "forward of the counterfactual pass (no backward through it, no extra head work); NextQuill costs "
        "exactly CE + forward and backward of the counterfactual pass: its full logits exist only at the B·R "
        "response positions (never [B, L, V]), and its alignment term (logsumexp of z_h − z_0 over V) adds "
        "only elementwise work (< 0.1% here)."),
        "",
        ("Caveats: the head runs as one vocabulary chunk here because XLA counts a `lax.scan` body once (with the "
        "default chunk 8192 and V = 32000 the counted FLOPs of the head drop ~4×, an accounting artifact, not a "
        "saving). The chunk body is wrapped in `jax.checkpoint`; with one chunk XLA's count shows no extra head "
        "matmul for the recompute (CE with the chunked head = CE with full logits, checked separately), with "
        "several chunks the recompute is one extra head forward per differentiated pass (≈ "
        f"{2 * args.batch * args.response * args.hidden * args.vocab:.2e} FLOPs, "
        "1.4–4.4% of the CE step above) — the price of never materializing [B, R, V]. Shapes: 'personal prompt "
        "≈ 10×' is on the prompt; with the shared 128-token response the long-profile sequences are 768 vs 192."),
    ])
    if not args.no_write:
        write_section("FLOP floor (compiled cost analysis)", body)


if __name__ == "__main__":
    main()
