"""Measured peak memory of a train step, ours vs the PyTorch reference, on a large vocabulary (V = 151,936).

Model: Qwen2.5-0.5B's shape, random init (``common.qwen25_shape_model``: hidden 896, 14 heads / 2 KV heads, ffn
4864, tied embeddings, qwen2 q/k/v bias), all 24 layers by default (``--layers``), fp32 parameters and compute,
AdamW (wd 0.01 on matrices), clipping 1.0. Batch 1: the personalized sequence has exactly Lp tokens (prompt +
response − 1), the counterfactual Lc = Lp / 4, the response R = 256 (``--response``); random ids.

Each case (objective × Lp × side) runs in a fresh subprocess (``--worker``), so nothing of one case stays in the
next one's RSS:

- ours: the run every command builds (``training.setup.build``), its train step lowered and compiled on the concrete
  state and batch (state donated); the compiled peak (``memory_analysis``: arguments + temporaries + outputs −
  aliased, ``common.peak_bytes``) of that executable, then ``--steps`` real steps;
- the reference: ``AutoModelForCausalLM.from_pretrained`` on the same weights and the reference step of
  ``bench/speed_vs_torch.py::make_torch_steps`` (full ``[B, L, V]`` fp32 logits + log-softmax / softmax over every
  position; NextQuill: both passes left-padded to the personalized length, both differentiated), ``--steps`` steps
  (the second one holds AdamW's moments, created lazily in the first).

Measured peak RSS = ``getrusage(RUSAGE_SELF).ru_maxrss`` after the steps, reported total and minus the process's RSS
after its imports, before the model is built (the runtime baseline: Python, jax or torch, the libraries), next to
the peak before the first step (loading, compiling: a step that stays below it does not raise the peak).
Recompute is like for like: ours ``model.remat_policy=--remat`` (default ``full``: with remat ``none`` ours' 24-layer
step alone needs ~15 GiB at Lp 1k with the 'xla' attention, see ``bench/memory.py``), the reference with HF
gradient checkpointing (non-reentrant) exactly when ``--remat`` is not ``none``.

Protecting the machine: a worker's address space is capped (``RLIMIT_AS`` = ``--limit-gib`` + ``--as-headroom-gib``
of virtual memory that is never resident: libraries, thread arenas), the parent kills a worker whose RSS crosses
``--limit-gib`` (polled every 20 ms), and ours is not run when its compiled peak already exceeds the limit. Such a
case is reported as "> limit" instead of crashing the bench.

Longest Lp within 16 GiB (``--fit-gib``) per side: interpolated between the measured points that bracket it, else
extrapolated linearly (least squares over the measured points of that side) — the table says which.

    .venv/bin/python bench/memory_vs_torch.py                  # 24 layers, Lp 1k/2k/4k   (~50 min on 2 cores)
    .venv/bin/python bench/memory_vs_torch.py --layers 1 --lengths 128,256 --response 32 --steps 1 \
        --objectives perce --no-write                                                 # smoke (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    collate_examples,
    gib,
    info_block,
    machine_info,
    md_table,
    peak_bytes,
    peak_rss_bytes,
    qwen25_shape_model,
    rss_bytes,
    run_config,
    synthetic_examples,
    write_section,
)

MARK = "MEMORY_RESULT "


# --------------------------------------------------------------------------------------------------- workers


def case_examples(vocab: int, Lp: int, Lc: int, R: int):
    """One example whose personalized sequence has Lp tokens and counterfactual sequence Lc (both with R)."""
    return synthetic_examples(1, Lp - R + 1, Lc - R + 1, R, vocab)


def worker(spec: dict) -> dict:
    import resource

    cap = int((spec["limit_gib"] + spec["as_headroom_gib"]) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    o, Lp, Lc, R, steps = spec["objective"], spec["Lp"], spec["Lc"], spec["R"], spec["steps"]
    out = dict(spec, status="ok", step_s=[], loss=[])
    import transformers  # noqa: F401 - both sides load it (tokenizer / model): part of the baseline, not the step
    if spec["side"] == "ours":
        import jax

        from percausal_jax.training import setup

        out["baseline_rss"] = rss_bytes()
        try:
            attention = [f"model.attention_impl={spec['attention']}"] if spec["attention"] else []
            run = setup.build(run_config(
                f"model.path={spec['model_dir']}", "model.dtype=float32", "model.compute_dtype=float32",
                "model.scan_layers=True", f"model.remat_policy={spec['remat']}", *attention,
                f"objective.vocab_chunk_size={spec['chunk_size']}", f"objective.name={o}", "optimizer.name=adamw",
                "optimizer.lr=1e-5", "optimizer.schedule=constant", "optimizer.warmup_steps=0",
                "optimizer.warmup_ratio=0.0", "optimizer.weight_decay=0.01", "optimizer.grad_clip_norm=1.0",
                "train.global_batch_size=1", "train.grad_accum_steps=1"))
            from percausal_jax.data.rows import to_global

            batch = to_global(collate_examples(case_examples(run.model_config.vocab_size, Lp, Lc, R)), run.mesh)
            out["attention"] = run.config.model.attention_impl
            state, ref = run.init_state(), run.reference_params
            with jax.set_mesh(run.mesh):
                compiled = run.train_step().lower(state, run.frozen, ref, batch).compile()
            m = compiled.memory_analysis()
            out.update(compiled_peak=peak_bytes(compiled), compiled_temp=int(m.temp_size_in_bytes),
                       compiled_args=int(m.argument_size_in_bytes))
            if out["compiled_peak"] > spec["limit_gib"] * 2**30:
                out["status"] = "> limit (compiled peak)"
                return out
            out["pre_step_peak_rss"] = peak_rss_bytes()
            for _ in range(steps):
                t0 = time.perf_counter()
                with jax.set_mesh(run.mesh):
                    state, metrics = compiled(state, run.frozen, ref, batch)
                jax.block_until_ready((state, metrics))
                out["step_s"].append(time.perf_counter() - t0)
                out["loss"].append(float(metrics["loss"]))
        except Exception as e:  # noqa: BLE001 - an allocation failure under RLIMIT_AS is a result, not a crash
            if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
                raise
            out["status"] = f"> limit ({type(e).__name__})"
    else:
        import torch

        from speed_vs_torch import make_torch_steps, reference_layout, reference_model

        torch.set_num_threads(os.cpu_count())
        out["baseline_rss"] = rss_bytes()
        try:
            model, opt = reference_model(spec["model_dir"], 1e-5, gradient_checkpointing=spec["remat"] != "none")
            step = make_torch_steps(model, opt, 1.0)[o]
            pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
            t, shapes = reference_layout(o, case_examples(model.config.vocab_size, Lp, Lc, R), pad)
            out["shapes"] = shapes
            out["pre_step_peak_rss"] = peak_rss_bytes()
            for _ in range(steps):
                t0 = time.perf_counter()
                out["loss"].append(step(t))
                out["step_s"].append(time.perf_counter() - t0)
        except (RuntimeError, MemoryError) as e:
            if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            out["status"] = f"> limit ({type(e).__name__})"
    out["peak_rss"] = peak_rss_bytes()
    return out


# ---------------------------------------------------------------------------------------------------- parent


def proc_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(spec: dict, timeout: float) -> dict:
    """One case in a fresh subprocess; killed (→ "> limit") when its RSS crosses the limit."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=str(Path(__file__).resolve().parent.parent))
    limit, seen, t0 = spec["limit_gib"] * 2**30, 0, time.time()
    status = None
    while p.poll() is None:
        rss = proc_rss(p.pid)
        seen = max(seen, rss)
        if rss > limit:
            p.kill()
            status = f"> limit (RSS crossed {spec['limit_gib']:g} GiB, killed)"
        elif time.time() - t0 > timeout:
            p.kill()
            status = f"timeout after {timeout:.0f} s"
        time.sleep(0.02)
    stdout, stderr = p.communicate()
    for line in stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    if status is None:
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {p.returncode}"]
        oom = p.returncode in (-9, 137) or "alloc" in stderr.lower() or "RESOURCE_EXHAUSTED" in stderr
        status = f"> limit (exit {p.returncode})" if oom else f"failed: {tail[0][:160]}"
    return dict(spec, status=status, peak_rss=seen or None)


def fit_length(points: list[tuple[int, float | None]], budget: float, limit: float) -> str:
    """Longest Lp within ``budget`` bytes from measured ``(Lp, peak)`` (None = over the ``limit``)."""
    pts = sorted(points)
    if limit < budget and any(b is None for _, b in pts):
        return f"unknown: a case is over the {limit / 2**30:g} GiB limit, below the {budget / 2**30:g} GiB asked"
    ok = [(L, b) for L, b in pts if b is not None and b <= budget]
    for (L0, b0), (L1, b1) in zip(pts, pts[1:]):
        if b0 is not None and b0 <= budget and (b1 is None or b1 > budget):
            if b1 is None:
                return f"≥ {L0}, < {L1} (measured; {L1} is over the limit)"
            return f"{L0 + (budget - b0) * (L1 - L0) / (b1 - b0):.0f} (interpolated between {L0} and {L1})"
    measured = [(L, b) for L, b in pts if b is not None]
    if len(measured) >= 2 and len(ok) == len(measured):
        import numpy as np

        slope, icpt = np.polyfit([L for L, _ in measured], [b for _, b in measured], 1)
        if slope > 0:
            return f"{(budget - icpt) / slope:.0f} (extrapolated linearly from {len(measured)} points)"
    if not ok:
        return f"< {pts[0][0]} (the shortest already exceeds it)"
    return f"≥ {ok[-1][0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers of the Qwen2.5-0.5B shape (of 24)")
    ap.add_argument("--lengths", default="1024,2048,4096", help="personalized sequence lengths Lp")
    ap.add_argument("--cf-fraction", type=float, default=0.25)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--objectives", default="perce,nextquill")
    ap.add_argument("--sides", default="ours,theirs")
    ap.add_argument("--remat", default="full", help="ours' remat policy; the reference checkpoints unless 'none'")
    ap.add_argument("--attention", default=None,
                    help="ours' model.attention_impl (default: configs/base.py's, so new kernels are picked up)")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--limit-gib", type=float, default=None,
                    help="per-case memory limit (default: 85%% of MemTotal, at most 20)")
    ap.add_argument("--as-headroom-gib", type=float, default=8.0)
    ap.add_argument("--fit-gib", type=float, default=16.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    if args.limit_gib is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        args.limit_gib = min(20.0, round(0.85 * total, 1))
    from percausal_jax.objectives import get

    objectives = [get(o.strip()).name for o in args.objectives.split(",") if o.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    info = machine_info()
    t_build = time.time()
    model_dir = qwen25_shape_model(args.layers)
    print(f"model dir {model_dir} ({time.time() - t_build:.0f} s)", flush=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    results = {}
    t_all = time.time()
    for o in objectives:
        for Lp in lengths:
            Lc = max(int(Lp * args.cf_fraction), args.response + 1)
            for side in sides:
                spec = dict(side=side, objective=o, Lp=Lp, Lc=Lc, R=args.response, steps=args.steps,
                            model_dir=str(model_dir), remat=args.remat, attention=args.attention,
                            chunk_size=args.chunk_size, limit_gib=args.limit_gib,
                            as_headroom_gib=args.as_headroom_gib)
                t0 = time.time()
                r = run_case(spec, args.timeout)
                r["wall_s"] = time.time() - t0
                results[(o, Lp, side)] = r
                print(f"[{o} Lp={Lp} Lc={Lc} {side}] {r['status']}: peak RSS "
                      f"{gib(r['peak_rss']) if r.get('peak_rss') else '?'} GiB, baseline "
                      f"{gib(r['baseline_rss']) if r.get('baseline_rss') else '?'} GiB, compiled peak "
                      f"{gib(r['compiled_peak']) if r.get('compiled_peak') else '-'} GiB, steps "
                      f"{', '.join(f'{s:.1f}' for s in r.get('step_s', []))} s ({r['wall_s']:.0f} s)", flush=True)

    def rss_cell(r):
        if r is None:
            return ""
        if r["status"] != "ok":
            return r["status"]
        return (f"{gib(r['peak_rss'])} ({gib(r['peak_rss'] - r['baseline_rss'])}; before the steps "
                f"{gib(r['pre_step_peak_rss'])})")

    from percausal_jax.hf.checkpoint import read_config

    mc = read_config(model_dir)
    n = mc.num_params()
    state_bytes = 16 * n  # fp32 parameters, gradients and two AdamW moments: what both sides must hold
    rows, verdict, fits = [], [], []
    for o in objectives:
        for Lp in lengths:
            ours, theirs = results.get((o, Lp, "ours")), results.get((o, Lp, "theirs"))
            ratio = beyond = ""
            if ours and theirs and ours["status"] == "ok":
                if theirs["status"] == "ok":
                    ratio = f"{ours['peak_rss'] / theirs['peak_rss']:.2f}"
                    extra = [r["peak_rss"] - r["baseline_rss"] - state_bytes for r in (ours, theirs)]
                    beyond = f"{gib(extra[0])} / {gib(extra[1])}"
                else:
                    ratio = f"< {ours['peak_rss'] / (args.limit_gib * 2**30):.2f}"
            rows.append([o, Lp, (ours or theirs)["Lc"], args.response,
                         gib(ours["compiled_peak"]) if ours and ours.get("compiled_peak") else "",
                         gib(ours["compiled_args"]) if ours and ours.get("compiled_args") else "",
                         rss_cell(ours), rss_cell(theirs), ratio, beyond,
                         ", ".join(f"{s:.0f}" for s in (ours or {}).get("step_s", [])),
                         ", ".join(f"{s:.0f}" for s in (theirs or {}).get("step_s", []))])
        top = max(lengths)
        ours, theirs = results.get((o, top, "ours")), results.get((o, top, "theirs"))
        if ours and theirs and ours["status"] == "ok":
            r = (ours["peak_rss"] / theirs["peak_rss"] if theirs["status"] == "ok"
                 else ours["peak_rss"] / (args.limit_gib * 2**30))
            bound = "" if theirs["status"] == "ok" else "< "
            met = ("met" if r <= 1 / 3 else "NOT met" if not bound
                   else "not shown: the reference is over the limit and the bound is not tight enough")
            verdict.append(f"{o} at Lp {top}: ours / reference = {bound}{r:.2f} (target ≤ 0.33: {met})")
        for side in sides:
            pts = [(Lp, results[(o, Lp, side)]["peak_rss"] if results[(o, Lp, side)]["status"] == "ok" else None)
                   for Lp in lengths if (o, Lp, side) in results]
            fit = fit_length(pts, args.fit_gib * 2**30, args.limit_gib * 2**30)
            fits.append(f"- {o}, {'ours' if side == 'ours' else 'reference'}: longest Lp within "
                        f"{args.fit_gib:g} GiB (measured peak RSS, total): {fit}")
    headers = ["objective", "Lp", "Lc", "R", "ours compiled peak GiB", "ours state (arguments) GiB",
               "ours peak RSS GiB (− baseline; before the steps)",
               "reference peak RSS GiB (− baseline; before the steps)", "ours / reference (RSS)",
               "beyond the 16 B/param state, GiB: ours / reference",
               "ours step s", "reference step s"]
    table = md_table(headers, rows)
    print(table)
    print("\n".join(verdict))
    print("\n".join(fits))
    attention_used = ", ".join(sorted({str(r.get("attention")) for r in results.values()
                                       if r["side"] == "ours" and r.get("attention")})) or args.attention or "?"
    logits = {Lp: (Lp + 1) * mc.vocab_size * 4 for Lp in lengths}
    body = "\n".join([
        info_block({**info, "model": f"random init, Qwen2.5-0.5B's shape, {mc.num_hidden_layers} of 24 layers, "
                    f"{n / 1e6:.1f}M params, vocab {mc.vocab_size}, tied, fp32 params and compute; AdamW",
                    "ours": f"scan_layers=True, remat {args.remat}, attention {attention_used}, vocab chunk "
                    f"{args.chunk_size}, state donated",
                    "reference": "speed_vs_torch.make_torch_steps (full [B, L, V] fp32 logits), HF gradient "
                    f"checkpointing {'on' if args.remat != 'none' else 'off'}, torch default attention (sdpa)",
                    "cases": f"batch 1, Lc = {args.cf_fraction:g}·Lp, R = {args.response}, {args.steps} step(s) per "
                    f"case, each case in a fresh subprocess; limit {args.limit_gib:g} GiB per case (RLIMIT_AS "
                    f"{args.limit_gib + args.as_headroom_gib:g} GiB + RSS watchdog); total "
                    f"{time.time() - t_all:.0f} s"}),
        "",
        table,
        "",
        "Peak RSS = `getrusage(RUSAGE_SELF).ru_maxrss` of the case's process after its steps; in parentheses minus "
        "the RSS after its imports, before the model is built, and the peak before the first step (loading the "
        "weights, ours' compilation: when it equals the peak, the step itself stayed below it). Compiled peak = "
        "arguments + temporaries + outputs − aliased of ours' executable (`memory_analysis`); 'state' = its "
        "arguments (parameters + AdamW moments + batch).",
        "",
        f"For scale: the fp32 model state both sides hold is {gib(state_bytes)} GiB (parameters, gradients, two "
        "AdamW moments: 16 bytes per parameter; the 'beyond the state' column subtracts it and the baseline from "
        "each side's peak: activations, logits, temporaries); one "
        f"[1, Lp + 1, {mc.vocab_size}] fp32 logits tensor of the reference is "
        + ", ".join(f"{gib(b)} GiB at Lp {Lp}" for Lp, b in logits.items())
        + " — PerCE's reference keeps about 3 of them (logits, log-softmax, their gradient), NextQuill's about 8 "
        "(two passes, softmax, the difference z_h − z_0, two cross-entropies and their gradients).",
        "",
        "Target: " + ("; ".join(verdict) if verdict else "no complete pair at the longest Lp") + ".",
        "",
        *fits,
    ])
    if not args.no_write:
        write_section("Memory vs the PyTorch reference (measured RSS, CPU, V = 151,936)", body)


if __name__ == "__main__":
    main()
