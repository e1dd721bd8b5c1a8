"""MFU of the ce and perce train steps on one GPU: a ~1B Llama (random init) at sequence 2048, bf16 compute,
cuDNN attention (falls back to XLA attention if cuDNN rejects it), remat chosen per objective as the first policy in
``--remat`` that compiles and runs.

MFU = model FLOPs / step time / peak. Model FLOPs follow ``percausal_jax.training.flops.step_flops`` (from each
objective's ``requirements``): a forward is 2·(layer params)·tokens + dense attention
(4·layers·heads·head_dim·S²) + the LM head at response positions only; CE = 3 × forward(personal); PerCE = CE + 1 × forward(counterfactual) (no
backward through it). Also reported: "6N MFU", which counts 6·(non-embedding params)·tokens of each pass (×3 with
a backward, ×1 without) only (the convention of the spec's anchors). Peak: H100 SXM / H200 bf16 dense 989 TFLOP/s
(``--peak-tflops`` to override). ``--objectives`` takes any registered objectives (objective values from
``percausal_jax.objectives``, their defaults); objectives with a frozen reference get a copy of the initial
parameters.

Runs with only jax, flax, optax, numpy and this repository: the model, train state and step are built here from
the library's parts (``CausalLM``, ``training.step``), not by ``training.setup`` (which needs ml_collections, grain,
safetensors, transformers), and the package ``__init__`` (which imports safetensors for the HF checkpoint helpers)
is bypassed when safetensors is missing. Nothing here imports ml_collections, grain, orbax, transformers or torch.

    python bench/gpu_mfu.py                          # on the GPU machine; writes $OUT/gpu_mfu.{json,md} if $OUT
    .venv/bin/python bench/gpu_mfu.py --dry-run      # CPU, tiny config: proves the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

PEAKS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
TARGET_CE_MFU, TARGET_PERCE_REL = 0.50, 0.05


# ------------------------------------------------------------------------------------------- import bootstrap


def bootstrap_imports() -> list[str]:
    """Bypasses what the benchmark does not need when it is missing; returns what was bypassed."""
    stubbed = []
    try:
        import safetensors  # noqa: F401
    except ImportError:  # skip percausal_jax/__init__.py (it imports the HF checkpoint helpers)
        pkg = types.ModuleType("percausal_jax")
        pkg.__path__ = [str(REPO / "percausal_jax")]
        sys.modules["percausal_jax"] = pkg
        stubbed.append("percausal_jax/__init__ bypassed (no safetensors)")
    return stubbed


# --------------------------------------------------------------------------------------------------- FLOPs


def model_flops(objective, mc, B: int, Lp: int, Lc: int, R: int) -> float:
    from percausal_jax.training.flops import step_flops

    return step_flops(mc, objective.requirements, B, Lp, Lc, R)


def six_n_flops(objective, mc, B: int, Lp: int, Lc: int) -> float:
    """6·N per personalized token; per counterfactual token 6·N with a backward through it, else 2·N; 2·N per
    token of each pass under the frozen reference."""
    req = objective.requirements
    n = mc.num_params() - mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    cf = (6 if req.counterfactual_grad else 2) * n * B * Lc if req.counterfactual else 0.0
    ref = 2 * n * B * (Lp * ("p" in req.reference) + Lc * ("c" in req.reference))
    return 6 * n * B * Lp + cf + ref


def peak_flops(device_kind: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for name, peak in PEAKS.items():
        if name in device_kind:
            return peak
    return None


# ---------------------------------------------------------------------------------------------------- run


def build(mc, remat: str, attention: str, dtype):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from percausal_jax.models.decoder import CausalLM

    make = lambda: CausalLM(mc, dtype=dtype, param_dtype=jnp.float32, scan_layers=True,
                            remat_policy=remat, attention_impl=attention, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1])()  # initialized on the device, never on the host
    model = nnx.merge(graphdef, state)
    return nnx.split(model, nnx.Param, ...)


def measure(objective, mc, batch, args, remat, attention, dtype) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from common import peak_bytes

    from percausal_jax.training.step import init_state, jit_train_step, make_train_step

    graphdef, params, frozen = build(mc, remat, attention, dtype)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.01))
    step = make_train_step(graphdef, tx, optax.constant_schedule(1e-5), objective, chunk_size=args.chunk_size)
    ref = jax.tree.map(jnp.copy, params) if objective.requirements.reference else None
    state = init_state(params, tx)
    del params
    fn = jit_train_step(step, state)
    t0 = time.perf_counter()
    compiled = fn.lower(state, frozen, ref, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, m = compiled(state, frozen, ref, batch)
    jax.block_until_ready((state, m))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, frozen, ref, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"compile_s": compile_s, "step_s": times[len(times) // 2], "min_step_s": times[0],
            "loss": float(m["loss"]), "remat": remat, "attention": attention, "peak_bytes": peak_bytes(compiled)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny config on whatever backend (CPU): proves it runs")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048, help="personal sequence length Lp (prompt + response)")
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--cf-prompt", type=int, default=128, help="counterfactual prompt tokens (Lc = this + R - 1)")
    ap.add_argument("--objectives", default=None,
                    help="comma-separated registered objectives (default: ce,perce, the two the targets concern)")
    ap.add_argument("--remat", default="none,minimal,full", help="policies to try in order (first that fits)")
    ap.add_argument("--attention", default="cudnn", help="cudnn | xla (cudnn falls back to xla on error)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_mfu.json / gpu_mfu.md")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = ap.parse_args()
    if args.dry_run:
        args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab = 64, 2, 4, 2, 128, 512
        args.batch, args.seq, args.response, args.cf_prompt = 2, 128, 32, 16
        args.steps, args.warmup, args.chunk_size = 3, 1, 256
        if "cudnn" in args.attention:
            args.attention = "xla"

    stubbed = bootstrap_imports()
    import jax
    import jax.numpy as jnp
    from common import (
        collate_examples,
        info_block,
        llama_config,
        machine_info,
        md_table,
        objective_names,
        synthetic_examples,
    )

    from percausal_jax.data.pairing import shape_of
    from percausal_jax.objectives import CE, OBJECTIVES, PerCE

    names = objective_names(args.objectives or f"{CE.name},{PerCE.name}")

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    mc = llama_config(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab)
    pp = args.seq - args.response + 1
    examples = synthetic_examples(args.batch, pp, args.cf_prompt, args.response, args.vocab)
    batch = jax.tree.map(jnp.asarray, collate_examples(examples))
    B, (Lp, Lc, R) = len(examples), shape_of(batch)
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind, args.peak_tflops)
    info = machine_info({"device": kind, "stand-ins": ", ".join(stubbed) or "none"})
    print(f"device {kind}, peak {peak and peak / 1e12} TFLOP/s, {mc.num_params() / 1e6:.1f}M params, "
          f"B={B} Lp={Lp} Lc={Lc} R={R}", flush=True)

    results = {}
    for o in names:
        objective = OBJECTIVES[o]()  # the registered defaults
        res = None
        for remat in args.remat.split(","):
            for attention in dict.fromkeys([args.attention, "xla"]):
                try:
                    res = measure(objective, mc, batch, args, remat, attention, dtype)
                    break
                except Exception as e:  # noqa: BLE001 - OOM or an unsupported attention kernel: try the next
                    msg = str(e).splitlines()[0][:200]
                    print(f"[{o}] remat={remat} attention={attention} failed: {type(e).__name__}: {msg}",
                          flush=True)
                    oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
                    if oom:
                        break  # the XLA kernel needs more memory, not less: go to the next remat policy
            if res is not None:
                break
        if res is None:
            print(f"[{o}] no configuration ran", flush=True)
            continue
        mf, six = model_flops(objective, mc, B, Lp, Lc, R), six_n_flops(objective, mc, B, Lp, Lc)
        res.update(model_flops=mf, tflops_per_s=mf / res["step_s"] / 1e12,
                   mfu=(mf / res["step_s"] / peak) if peak else None,
                   mfu_6n=(six / res["step_s"] / peak) if peak else None,
                   tokens_per_s=B * Lp / res["step_s"])
        results[o] = res
        print(f"[{o}] {json.dumps(res)}", flush=True)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    rows = [[o, r["remat"], r["attention"], f"{r['compile_s']:.1f}", f"{r['step_s']:.4f}", f"{r['model_flops']:.3e}",
             f"{r['tflops_per_s']:.1f}", pct(r["mfu"]), pct(r["mfu_6n"]), f"{r['tokens_per_s']:.0f}",
             "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"] for o, r in results.items()]
    headers = ["objective", "remat", "attention", "compile s", "median step s", "model FLOPs/step", "TFLOP/s",
               "MFU", "6N MFU", "personal tok/s", "compiled peak GiB"]
    table = md_table(headers, rows)
    verdict = ""
    if CE.name in results and PerCE.name in results and peak:
        ce, pc = results[CE.name]["mfu"], results[PerCE.name]["mfu"]
        verdict = (f"Targets: CE MFU ≥ {TARGET_CE_MFU:.0%}: {'met' if ce >= TARGET_CE_MFU else 'NOT met'} "
                   f"({pct(ce)}); PerCE MFU within {TARGET_PERCE_REL:.0%} of CE (counting its extra forward): "
                   f"{'met' if pc >= ce * (1 - TARGET_PERCE_REL) else 'NOT met'} ({pct(pc)} vs {pct(ce)}).")
    print(table)
    print(verdict)
    shape = (f"random Llama {mc.num_params() / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, {args.heads} "
             f"heads / {args.kv_heads} KV, ffn {args.ffn}, vocab {args.vocab}), {args.dtype} compute, fp32 params, "
             f"scan_layers=True, AdamW + clip 1.0; B={B}, Lp={Lp}, Lc={Lc}, R={R}; peak "
             f"{'n/a' if not peak else f'{peak / 1e12:.0f} TFLOP/s'}; {args.warmup} warm-up + {args.steps} timed steps")
    if args.dry_run:
        body = "\n".join([
            ("**No GPU machine was lent to this task, so no MFU numbers were measured.** The script is ready for "
            "one (`python bench/gpu_mfu.py` on an H100/H200: ~1.1B Llama, seq 2048, bf16, cuDNN attention; it "
            "needs only jax[cuda], flax, optax, numpy and this repository). Below: a `--dry-run` on this CPU with "
            "a tiny config, only to show the script executes end to end (the numbers mean nothing)."),
            "",
            info_block({**info, "config": shape}),
            "",
            table,
        ])
    else:
        body = "\n".join([info_block({**info, "config": shape}), "", table, "", verdict])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_mfu.json").write_text(json.dumps({"info": info, "results": results}, indent=2))
        (out / "gpu_mfu.md").write_text(body + "\n")
    if not args.no_write:
        from common import write_section

        write_section("GPU MFU (~1B Llama, seq 2048, bf16)", body)
    if not math.isfinite(sum(r["loss"] for r in results.values()) if results else float("nan")):
        sys.exit(1)


if __name__ == "__main__":
    main()
