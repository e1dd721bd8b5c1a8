"""Speed of our jitted train step against a PyTorch two-pass reference step: same CPU, same model, same batch,
measured alternately in one process (ours, theirs, ours, theirs, ...) so machine load hits both sides alike.

The reference does what the papers' code does (shared/specs/perce.md §3, nextquill.md §3/§8):
- both passes are full HF forwards returning full ``[B, L, V]`` logits, log-softmax / softmax in fp32 over every
  position, gold tokens gathered with -100 labels on prompt and padding;
- PerCE: personalized pass with grad, counterfactual pass under ``torch.no_grad`` (weights detached), each pass
  right-padded to its own max length; loss = Σ clip(PIR, 0.8, 5)·nll / n;
- NextQuill: both passes left-padded to ONE length (the longer, personalized one) so positions line up, gradient
  through both; ω = 0.9 if p_h − p_0 > 0.05 else 0.1, normalized by Σω; L_p = mean CE(z_h − z_0, y); loss = L_n +
  0.1·L_p;
- backward, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` step (HF Trainer defaults: clipping 1.0, no weight
  decay on norms and biases; wd 0.01 here).
The hyper-parameters of both references are the library objectives' defaults (``PerCE()``, ``NextQuill()``).
Ours: the run every command builds (``training.setup.build`` from ``configs/base.py`` with overrides: scan_layers=True,
remat none, fp32, vocab-chunked gold log-probs for PerCE, full logits at response positions only for NextQuill;
AdamW at a constant lr with weight decay 0.01 on matrices, global-norm clipping 1.0), its jitted train step with the
state donated.

    .venv/bin/python bench/speed_vs_torch.py                   # SmolLM2-135M-Instruct, B=4, ~256/~64/~64
    .venv/bin/python bench/speed_vs_torch.py --batch 1 --personal-prompt 48 --cf-prompt 16 --response 16 \
        --jitter 0 --rounds 1 --warmup 0 --objectives perce --no-write          # quick
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np
from common import collate_examples, info_block, machine_info, md_table, run_config, write_section

TARGET = 1.5

WHY = (
    "Why the target is missed, and what would meet it. (1) Work: the PerCE reference already runs its "
    "counterfactual pass under no_grad, so its only extra work is the LM head plus fp32 log-softmax at every "
    "prompt position; for SmolLM2 the head is 2·D·V = 0.27× the per-token trunk FLOPs, so even with L ≫ R a "
    "perfect implementation is at most ~1.27× faster at equal FLOP/s (1.16× at this shape, and less for bigger "
    "models: Qwen3-4B's head is ~0.11× its trunk). ≥ 1.5× for PerCE is therefore not reachable on speed per step; "
    "what the reference loses at the paper's scale is memory (full [B, 5000, 151936] fp32 logits plus their "
    "log-softmax, ~5.7 GiB per sequence), i.e. micro-batch size on an accelerator, which a CPU run cannot show. "
    "NextQuill's reference pads the counterfactual pass to the personalized length and differentiates both "
    "passes at every position: ceiling 1.65× here, far more at its real setting (batch 1 left-padded to 4097 "
    "tokens). (2) Efficiency: XLA:CPU reaches 0.82–0.94× PyTorch's FLOP/s on these 2 cores; scan_layers=False is "
    "~10% faster than the scanned layer loop on CPU (compare the two sections), which alone takes NextQuill "
    "from 1.35× to 1.54×. Next steps: use scan_layers=False for CPU runs; restate the PerCE target against its "
    "FLOP ceiling (ours reaches 0.84–0.92× of it) or measure at paper shapes on an accelerator, where the "
    "reference must shrink its micro-batch; run `bench/gpu_mfu.py` when a GPU is lent."
)


# --------------------------------------------------------------------------------------------------- the batch


def make_examples(B, personal_prompt, cf_prompt, response, jitter, vocab, seed=0):
    """Random-id PairedExamples with lengths drawn in ±jitter around the given sizes (realistic padding)."""
    from percausal_jax.data.pairing import PairedExample

    rs = np.random.RandomState(seed)
    out = []
    for _ in range(B):
        lp = personal_prompt + rs.randint(-jitter, jitter + 1)
        lc = cf_prompt + rs.randint(-jitter // 4, jitter // 4 + 1)
        lr = response + rs.randint(-jitter // 4, 1)
        q = rs.randint(3, vocab, lc - 1).tolist()
        profile = rs.randint(3, vocab, lp - lc).tolist()
        out.append(PairedExample(tuple([1] + profile + q), tuple([1] + q),
                                 tuple(rs.randint(3, vocab, lr - 1).tolist() + [2])))
    return out


def torch_batches(examples, pad_id: int):
    """Reference tensors: PerCE (each pass right-padded to its own max) and NextQuill (both left-padded to one
    length). Sequences are prompt + full response (EOS included), labels −100 outside the response, HF shift."""
    import torch

    def pad(seqs, labels, L, left):
        ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
        lab = torch.full((len(seqs), L), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, (s, y) in enumerate(zip(seqs, labels)):
            sl = slice(L - len(s), L) if left else slice(0, len(s))
            ids[b, sl] = torch.tensor(s)
            lab[b, sl] = torch.tensor(y)
            mask[b, sl] = 1
        return ids, mask, lab

    def seqs(prompt_of):
        s = [list(prompt_of(e)) + list(e.response_ids) for e in examples]
        y = [[-100] * len(prompt_of(e)) + list(e.response_ids) for e in examples]
        return s, y

    sp, yp = seqs(lambda e: e.prompt_ids)
    sc, yc = seqs(lambda e: e.prompt_no_profile_ids)
    perce = {"p": pad(sp, yp, max(map(len, sp)), False), "c": pad(sc, yc, max(map(len, sc)), False)}
    L = max(max(map(len, sp)), max(map(len, sc)))
    nq = {"p": pad(sp, yp, L, True), "c": pad(sc, yc, L, True)}
    return perce, nq


# ------------------------------------------------------------------------------------------- reference steps


def make_torch_steps(model, opt, clip: float) -> dict:
    """Objective name → reference step, with the library objectives' default hyper-parameters."""
    import torch
    import torch.nn.functional as F

    from percausal_jax.objectives import NextQuill, PerCE

    perce, nq = PerCE(), NextQuill()
    if nq.weighted_lp or nq.fixed_theta_d:  # pragma: no cover - the defaults; the reference implements only these
        raise ValueError("the NextQuill reference implements weighted_lp=False, fixed_theta_d=False")

    def gold_logp(logits, labels):
        """full [B, L, V] log-softmax in fp32, gold gathered at shifted labels → (flat logp of valid, valid mask)."""
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        y = labels[:, 1:]
        valid = y != -100
        g = lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return g[valid]

    def finish(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def perce_step(t):
        (ip, mp, yp), (ic, mc, yc) = t["p"], t["c"]
        lp_p = gold_logp(model(input_ids=ip, attention_mask=mp).logits, yp)
        with torch.no_grad():
            lp_c = gold_logp(model(input_ids=ic, attention_mask=mc).logits, yc)
            w = torch.clamp(lp_p.detach() - lp_c, perce.clip_min, perce.clip_max)
        return finish(torch.sum(w * -lp_p) / lp_p.numel())

    def nextquill_step(t):
        (ip, mp, y), (ic, mc, _) = t["p"], t["c"]
        z_h = model(input_ids=ip, attention_mask=mp).logits[:, :-1].float()
        z_0 = model(input_ids=ic, attention_mask=mc).logits[:, :-1].float()
        V = z_h.shape[-1]
        sl, sl1, yy = z_h.reshape(-1, V), z_0.reshape(-1, V), y[:, 1:].reshape(-1)
        valid = yy != -100
        ysafe = yy.clamp(min=0)
        p1 = torch.softmax(sl, -1).gather(-1, ysafe[:, None])[:, 0]
        p2 = torch.softmax(sl1, -1).gather(-1, ysafe[:, None])[:, 0]
        w = torch.where(p1 - p2 > nq.delta, nq.high, nq.low) * valid
        w = w / w.sum()
        l_p = F.cross_entropy(sl - sl1, yy, ignore_index=-100)
        l_n = (w * F.cross_entropy(sl, yy, ignore_index=-100, reduction="none")).sum()
        return finish(l_n + nq.alpha * l_p)

    return {perce.name: perce_step, nq.name: nextquill_step}


# ------------------------------------------------------------------------------------------------- FLOP model


def analytic_flops(mc, objective, B: int, ours_shapes: tuple, theirs_shapes: tuple) -> tuple[float, float]:
    """Matmul + attention FLOPs of one step (``training.flops``; backward = 2× forward): ours runs the head at the R
    response positions only (``step_flops`` of the objective's requirements), the reference at every position of
    its padded sequences (full logits)."""
    from percausal_jax.training.flops import forward_flops, step_flops

    Lp, Lc, R = ours_shapes
    (_, Lpt), (_, Lct) = theirs_shapes
    req = objective.requirements
    ours = step_flops(mc, req, B, Lp, Lc, R)
    theirs = 3 * forward_flops(mc, B, Lpt, Lpt)
    if req.counterfactual:
        theirs += (3 if req.counterfactual_grad else 1) * forward_flops(mc, B, Lct, Lct)
    return ours, theirs


def analysis_text(mc, objectives: dict, B, ours_shapes, theirs_shapes, measured: dict) -> str:
    lines = []
    for o, objective in objectives.items():
        fo, ft = analytic_flops(mc, objective, B, ours_shapes, theirs_shapes[o])
        m = measured.get(o)
        lines.append(f"- {o}: analytic step FLOPs ours {fo:.3e}, reference {ft:.3e} → the speed-up a perfect "
                     f"implementation gets from doing less work at equal FLOP/s is {ft / fo:.2f}×"
                     + (f"; measured {m:.2f}× → ours runs at {m / (ft / fo):.2f}× the reference's FLOP/s "
                        "(XLA:CPU vs PyTorch/oneDNN)" if m else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="HF dir, or 'embedded' (SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--personal-prompt", type=int, default=256)
    ap.add_argument("--cf-prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--jitter", type=int, default=16, help="± spread of the personal prompt length")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--objectives", default=None,
                    help="comma-separated objectives with a PyTorch reference (default: all of them: perce,nextquill)")
    ap.add_argument("--no-scan", action="store_true", help="ours with scan_layers=False")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from percausal_jax.data.pairing import shape_of
    from percausal_jax.data.pipeline import to_global
    from percausal_jax.hf.checkpoint import read_config, resolve_model_dir
    from percausal_jax.hf.gguf import resolve_model_arg
    from percausal_jax.objectives import NextQuill, PerCE, get
    from percausal_jax.training import setup

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    model_dir = resolve_model_dir(resolve_model_arg(args.model)).local  # as setup.build resolves model.path
    info = machine_info({"torch": torch.__version__, "torch threads": threads})
    mc = read_config(model_dir)
    references = (PerCE.name, NextQuill.name)  # the objectives make_torch_steps has a reference step for
    objectives = [get(n.strip()).name for n in args.objectives.split(",")] if args.objectives else list(references)
    missing = [o for o in objectives if o not in references]
    if missing:
        raise SystemExit(f"--objectives: no PyTorch reference for {', '.join(missing)} "
                         f"(have {', '.join(references)})")

    # ours: the run every command builds, one objective at a time
    overrides = [f"model.path={model_dir}", "model.dtype=float32", "model.compute_dtype=float32",
                 f"model.scan_layers={not args.no_scan}", "model.remat_policy=none", "model.attention_impl=xla",
                 f"objective.vocab_chunk_size={args.chunk_size}", "optimizer.name=adamw", f"optimizer.lr={args.lr}",
                 "optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.warmup_ratio=0.0",
                 "optimizer.weight_decay=0.01", "optimizer.grad_clip_norm=1.0", f"train.global_batch_size={args.batch}"]
    examples = make_examples(args.batch, args.personal_prompt, args.cf_prompt, args.response, args.jitter,
                             mc.vocab_size)
    host_batch = collate_examples(examples)
    Lp, Lc, R = shape_of(host_batch)
    resp_tokens = sum(len(e.response_ids) for e in examples)
    real_tokens = {o: sum(e.personal_len + e.counterfactual_len for e in examples) for o in objectives}

    ours, states, runs, refs, batches = {}, {}, {}, {}, {}

    def setup_ours(o):  # one objective's state at a time: two live JAX states + torch OOM'd a 24 GiB machine
        run = setup.build(run_config(*overrides, f"objective.name={o}"))
        runs[o], states[o], ours[o], refs[o] = run, run.init_state(), run.train_step(), run.reference_params()
        batches[o] = to_global(host_batch, run.mesh)

    # theirs
    tsteps = {}

    def setup_theirs(o):  # a fresh model + optimizer per objective, as ours: the loss trajectories must agree
        tsteps.clear()
        tmodel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tmodel.train()
        params = [p for p in tmodel.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},  # as HF Trainer and ours:
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # no decay on norms/biases
        topt = torch.optim.AdamW(groups, lr=args.lr)
        tsteps.update(make_torch_steps(tmodel, topt, 1.0))
    pad_id = mc.pad_token_id if mc.pad_token_id is not None else 0
    t_perce, t_nq = torch_batches(examples, pad_id)
    tbatch = {PerCE.name: t_perce, NextQuill.name: t_nq}
    shapes_t = {o: (tuple(tbatch[o]["p"][0].shape), tuple(tbatch[o]["c"][0].shape)) for o in objectives}

    def run_ours(o):
        t0 = time.perf_counter()
        run = runs[o]
        with jax.set_mesh(run.mesh):
            states[o], m = ours[o](states[o], run.frozen, refs[o], batches[o])
        jax.block_until_ready((states[o], m))
        return time.perf_counter() - t0, float(m["loss"])

    def run_theirs(o):
        t0 = time.perf_counter()
        loss = tsteps[o](tbatch[o])
        return time.perf_counter() - t0, loss

    times = {(o, s): [] for o in objectives for s in ("ours", "theirs")}
    losses = {(o, s): [] for o in objectives for s in ("ours", "theirs")}
    first = {}
    for o in objectives:  # objective by objective; within one, strictly alternating ours / theirs
        setup_ours(o)
        setup_theirs(o)
        t, loss = run_ours(o)  # includes compile
        first[o] = t
        tt, lt = run_theirs(o)  # the same number of steps on both sides
        print(f"[{o}] ours compile + first step {t:.1f} s (loss {loss:.4f}); theirs first step {tt:.1f} s "
              f"(loss {lt:.4f})", flush=True)
        for _ in range(args.warmup):
            print(f"[{o}] warm-up ours {run_ours(o)[0]:.2f} s, theirs {run_theirs(o)[0]:.2f} s", flush=True)
        for r in range(args.rounds):
            (to, lo), (tt, lt) = run_ours(o), run_theirs(o)
            times[(o, "ours")].append(to)
            times[(o, "theirs")].append(tt)
            losses[(o, "ours")].append(lo)
            losses[(o, "theirs")].append(lt)
            print(f"round {r} [{o}] ours {to:.2f} s (loss {lo:.4f}), theirs {tt:.2f} s (loss {lt:.4f})", flush=True)
        del states[o], ours[o], runs[o], refs[o], batches[o]
        gc.collect()

    rows = []
    verdict = []
    for o in objectives:
        mo, mt = statistics.median(times[(o, "ours")]), statistics.median(times[(o, "theirs")])
        for side, med, shp in (("ours (JAX)", mo, f"p {args.batch}×{Lp}, c {args.batch}×{Lc}, R {R}"),
                               ("reference (PyTorch)", mt, (f"p {shapes_t[o][0][0]}×{shapes_t[o][0][1]}, "
                                f"c {shapes_t[o][1][0]}×{shapes_t[o][1][1]}"))):
            rows.append([o, side, shp, med, min(times[(o, "ours" if side.startswith("ours") else "theirs")]),
                         resp_tokens / med, real_tokens[o] / med, "" if side.startswith("ours") else f"{mt / mo:.2f}×"])
        verdict.append(f"{o}: {mt / mo:.2f}× ({'met' if mt / mo >= TARGET else 'NOT met'})")
    headers = ["objective", "side", "padded shapes", "median step s", "min step s", "response tok/s",
               "total tok/s", "ours / theirs (tok/s)"]
    table = md_table(headers, rows)
    print(table)
    analysis = analysis_text(mc, {o: get(o)() for o in objectives}, args.batch, (Lp, Lc, R), shapes_t,
                             {o: statistics.median(times[(o, "theirs")]) / statistics.median(times[(o, "ours")])
                              for o in objectives})
    print(analysis)
    loss_check = "; ".join(
        f"{o}: max |Δ| {max(abs(a - b) for a, b in zip(losses[(o, 'ours')], losses[(o, 'theirs')])):.2e} over "
        f"{args.rounds} steps (ours {losses[(o, 'ours')][0]:.4f} → {losses[(o, 'ours')][-1]:.4f})" for o in objectives)
    print("loss cross-check:", loss_check)
    all_times = "; ".join(f"{o} {s}: " + ", ".join(f"{x:.2f}" for x in v) for (o, s), v in times.items())
    body = "\n".join([
        info_block({**info, "model": f"{os.path.basename(str(model_dir).rstrip('/'))} (real weights, fp32, "
                    f"{mc.num_params() / 1e6:.1f}M params, vocab {mc.vocab_size}); ours: scan_layers="
                    f"{not args.no_scan}, remat none, vocab chunk {args.chunk_size}; torch: "
                    f"AutoModelForCausalLM default attention (sdpa)",
                    "batch": f"B={args.batch}, personal prompt {args.personal_prompt}±{args.jitter}, counterfactual "
                    f"prompt ~{args.cf_prompt}, response ~{args.response} tokens (random ids); "
                    f"{resp_tokens} response tokens, {real_tokens[objectives[0]]} real tokens over both passes",
                    "protocol": f"per objective: compile + {args.warmup} warm-up step(s) per side, then "
                    f"{args.rounds} rounds alternating ours/theirs, all in one process; tokens/s = real (unpadded) tokens / "
                    "median step time, the same token counts for both sides",
                    "ours compile + first step (s)": ", ".join(f"{o} {first[o]:.1f}" for o in objectives)}),
        "",
        table,
        "",
        f"All step times (s): {all_times}",
        "",
        (f"Loss cross-check, ours vs reference at the same step (same init, batch, AdamW): {loss_check}. The "
        "reference is a faithful re-implementation, not a strawman."),
        "",
        "Work done per step (where the target can come from):",
        analysis,
        "",
        f"Target ≥ {TARGET}× tokens/s: " + "; ".join(verdict) + ". The machine is a shared 2-core VM that other "
        "jobs were loading (see load average above); both sides were measured alternately so the load affects "
        "both alike.",
    ])
    if not args.no_write:
        write_section("Speed vs the PyTorch reference (CPU" + (", ours with scan_layers=False" if args.no_scan
                                                               else "") + ")", body)


if __name__ == "__main__":
    main()
