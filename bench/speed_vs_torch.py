"""Speed of our jitted train step against a PyTorch two-pass reference step: same CPU, same model weights, same
examples, measured alternately in one process (ours, theirs, ours, theirs, ...) so machine load hits both sides alike.

The reference does what the papers' code does (shared/specs/perce.md §3, nextquill.md §3/§8):
- both passes are full HF forwards returning full ``[B, L, V]`` logits, log-softmax / softmax in fp32 over every
  position, gold tokens gathered with -100 labels on prompt and padding;
- PerCE: personalized pass with grad, counterfactual pass under ``torch.no_grad`` (weights detached), each pass
  right-padded to its own max length; loss = Σ clip(PIR, 0.8, 5)·nll / n;
- NextQuill: both passes left-padded to ONE length (the longer, personalized one) so positions line up, gradient
  through both; ω = 0.9 if p_h − p_0 > 0.05 else 0.1, normalized by Σω; L_p = mean CE(z_h − z_0, y); loss = L_n +
  0.1·L_p (the reference code pads to a fixed 4097 instead: padding to the micro-batch maximum favours it);
- a logical batch of ``--batch`` examples runs as micro-batches of ``--ref-micro-batch`` rows, each padded to its own
  maximum (a plain PyTorch collator), gradients accumulated (loss / number of micro-batches), then
  ``clip_grad_norm_(1.0)`` and one ``torch.optim.AdamW`` step (HF Trainer defaults: clipping 1.0, no weight decay on
  norms and biases; wd 0.01 here).
The hyper-parameters of both references are the library objectives' defaults (``PerCE()``, ``NextQuill()``).

Ours: the run every command builds (``training.setup.build`` from ``configs/base.py`` with overrides: fp32,
vocab-chunked gold log-probs, AdamW at a constant lr with weight decay 0.01 on matrices, global-norm clipping 1.0),
fed by the run's own input pipeline (``Run.data_iterator``: featurizer, length buckets of ``data.bucket_multiple``,
``data.packing``) over prompt records whose texts tokenize to the drawn lengths (``bench/lengths.py``); every
distinct batch shape is compiled ahead of the timed steps (``train_step().lower(...).compile()``, state donated)
and counted. Variants (``--variants``): ``bucketed`` (one example per row) and ``packed`` (``data.packing=True``).

Settings (``--lengths``; every default below is the setting's, each can be overridden on the command line):

- none (``default``): SmolLM2-135M-Instruct (real weights), batch 4, P 256±16 / Q ~64 / R ~64 tokens, bucket
  multiple 16, ours bucketed, 5 rounds over one batch (the original setting).
- ``longlamp``: LongLaMP-like lengths (``bench/lengths.py``: P ~ log-normal median 1000 / p90 2000 clipped to
  [256, 2048], Q median 120 / p90 250 in [16, 512], R median 250 / p90 500 in [16, 512]) on a random-init model
  of Qwen2.5-0.5B's shape (hidden 896, 14 heads / 2 KV heads, head_dim 64, ffn 4864, V = 151,936, tied, qwen2 with
  q/k/v bias) with 4 of its 24 layers (2-core budget; the FLOP analysis also projects to 24), logical batch 8, the
  reference in micro-batches of 1 row (its NextQuill step keeps ~8 fp32 [rows, L, V] tensors: ~12 GiB per row of
  2560 tokens, so 2 rows would not fit 23 GiB) and ours with train.grad_accum_steps 8 (1 row per micro-batch as
  well), bucket multiple 64, ours bucketed and packed (``--pack`` row capacities, default derived from the length
  limits; ``bench/packing.py`` measures which capacities pad ≤ 10%), 16 timed examples. Padding statistics on 512
  examples.
- ``smollm-why``: SmolLM2-135M-Instruct (real weights), full fine-tuning, AdamW, batch 4, P ~ uniform[360, 445],
  Q ~ uniform[48, 96], R ~ uniform[32, 128], bucket multiple 128, 16 timed examples; ours bucketed by default
  (packed needs row capacities above the derived 640 = 445 + 128 − 1 rounded up to 128, which holds one example:
  ``--variants bucketed,packed --pack 2048,640,512``).

Reported: real (unpadded) tokens/s per side (Σ personal + counterfactual sequence lengths / Σ step time; ours
bucketed and the reference run exactly the same examples, ours packed the pipeline batches that cover them), padding overhead (padded slots / real tokens − 1) of ours and of the reference, the number
of distinct compiled shapes, and the analytic work (``training.flops``) behind the measured ratio.

    .venv/bin/python bench/speed_vs_torch.py                         # SmolLM2, B=4          (~5 min on 2 cores)
    .venv/bin/python bench/speed_vs_torch.py --lengths smollm-why    #                       (~15 min)
    .venv/bin/python bench/speed_vs_torch.py --lengths longlamp      # Qwen2.5-0.5B shape    (~60 min, ≤ 20 GiB)
    .venv/bin/python bench/speed_vs_torch.py --lengths longlamp --layers 1 --scale 0.05 --batch 2 --examples 2 \
        --stats-examples 32 --objectives perce --warmup 0 --no-write                     # smoke (~2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import time

import numpy as np
from common import (
    info_block,
    machine_info,
    md_table,
    peak_bytes,
    qwen25_shape_model,
    real_tokens,
    run_config,
    unpack,
    write_section,
)
from lengths import SETTINGS as LENGTHS
from lengths import jittered, prompt_records

TARGETS = {"perce": 1.5, "nextquill": 2.0}  # real tokens/s, ours / reference
PAD_TARGET = 0.10  # ours' padded slots / real tokens − 1
QWEN_SHAPE = "qwen2.5-0.5b-shape"

# per --lengths: defaults of the options left unset on the command line
SETTINGS = {
    "default": dict(model="embedded", batch=4, ref_micro_batch=None, bucket_multiple=16, variants="bucketed",
                    examples=None, rounds=5, warmup=1, stats_examples=64, stats_multiples="16", layers=None,
                    title="Speed vs the PyTorch reference (CPU)"),
    "longlamp": dict(model=QWEN_SHAPE, batch=8, ref_micro_batch=1, bucket_multiple=64, variants="bucketed,packed",
                     examples=16, rounds=1, warmup=1, stats_examples=512, stats_multiples="64,128,256,512", layers=4,
                     title="Speed vs the PyTorch reference (CPU, LongLaMP-like lengths, Qwen2.5-0.5B shape)"),
    "smollm-why": dict(model="embedded", batch=4, ref_micro_batch=4, bucket_multiple=128,
                       variants="bucketed", examples=16, rounds=2, warmup=1, stats_examples=256,
                       stats_multiples="128,64,32,16", layers=None,
                       title="Speed vs the PyTorch reference (CPU, SmolLM2, prompts 360–445 tokens, bucket 128)"),
}

WHY_DEFAULT = (
    "Why the target is missed, and what would meet it. (1) Work: the PerCE reference already runs its "
    "counterfactual pass under no_grad, so its only extra work is the LM head plus fp32 log-softmax at every "
    "prompt position; for SmolLM2 the head is 2·D·V = 0.27× the per-token trunk FLOPs, so even with L ≫ R a "
    "perfect implementation is at most ~1.27× faster at equal FLOP/s, and less for bigger models (Qwen3-4B's head "
    "is ~0.11× its trunk). What the reference loses at the paper's scale is memory (full [B, 5000, 151936] fp32 "
    "logits plus their log-softmax, ~5.7 GiB per sequence, see the memory-vs-reference section), i.e. micro-batch "
    "size. NextQuill's reference pads the counterfactual pass to the personalized length and differentiates both "
    "passes at every position, far more work at its real setting (batch 1 left-padded to 4097 tokens). "
    "(2) Efficiency: the ratio of FLOP/s (below) is XLA:CPU vs PyTorch/oneDNN on these cores; scan_layers=False is "
    "~10% faster than the scanned layer loop on CPU (compare the --no-scan section)."
)


# --------------------------------------------------------------------------------------------- the reference


def torch_batches(examples, pad_id: int):
    """Reference tensors of one micro-batch: PerCE (each pass right-padded to its own max) and NextQuill (both
    left-padded to one length). Sequences are prompt + full response (EOS included), labels −100 outside the
    response, HF shift."""
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


def make_torch_steps(model, opt, clip: float) -> dict:
    """Objective name → reference step over a list of micro-batches (``torch_batches`` layouts of that objective):
    each micro-batch's loss / their number is backpropagated (gradient accumulation), then one clipped AdamW step;
    returns the mean micro-batch loss. The library objectives' default hyper-parameters."""
    import torch
    import torch.nn.functional as F

    from percausal_jax.objectives import NextQuill, PerCE

    perce, nq = PerCE(), NextQuill()
    if nq.weighted_lp or nq.fixed_theta_d:  # pragma: no cover - the defaults; the reference implements only these
        raise ValueError("the NextQuill reference implements weighted_lp=False, fixed_theta_d=False")

    def gold_logp(logits, labels):
        """full [B, L, V] log-softmax in fp32, gold gathered at shifted labels → flat logp of the valid positions."""
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        y = labels[:, 1:]
        valid = y != -100
        g = lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return g[valid]

    def perce_loss(t):
        (ip, mp, yp), (ic, mc, yc) = t["p"], t["c"]
        lp_p = gold_logp(model(input_ids=ip, attention_mask=mp).logits, yp)
        with torch.no_grad():
            lp_c = gold_logp(model(input_ids=ic, attention_mask=mc).logits, yc)
            w = torch.clamp(lp_p.detach() - lp_c, perce.clip_min, perce.clip_max)
        return torch.sum(w * -lp_p) / lp_p.numel()

    def nextquill_loss(t):
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
        return l_n + nq.alpha * l_p

    def stepper(loss_fn):
        def step(micro_batches):
            if isinstance(micro_batches, dict):
                micro_batches = [micro_batches]
            total = 0.0
            for t in micro_batches:
                loss = loss_fn(t) / len(micro_batches)
                loss.backward()
                total += float(loss.detach())
                del loss
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return total
        return step

    return {perce.name: stepper(perce_loss), nq.name: stepper(nextquill_loss)}


def reference_model(model_dir: str, lr: float, gradient_checkpointing: bool = False):
    """The reference's model (``from_pretrained``, fp32, train mode) and AdamW (wd 0.01 on matrices only)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},  # as HF Trainer and ours:
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # no decay on norms/biases
    return model, torch.optim.AdamW(groups, lr=lr)


def reference_layout(objective: str, examples, pad_id: int):
    """The reference tensors of ``objective`` for one micro-batch and their padded shapes ``((B, Lp), (B, Lc))``."""
    perce, nq = torch_batches(examples, pad_id)
    t = perce if objective == "perce" else nq
    return t, (tuple(t["p"][0].shape), tuple(t["c"][0].shape))


# ------------------------------------------------------------------------------------------------- FLOP model


def ours_flops(mc, objective, shapes, attended=None) -> float:
    """Σ over batches ``(B, Lp, Lc, R)`` of ``training.flops.step_flops`` (head at the R response slots); a packed
    batch's attention over its segments (``attended``: per batch, the two arrays' ``flops.attended_sq``)."""
    from percausal_jax.training.flops import step_flops

    attended = attended or [None] * len(shapes)
    return sum(step_flops(mc, objective.requirements, *s, attended_sq=a) for s, a in zip(shapes, attended))


def reference_flops(mc, objective, micro_shapes) -> float:
    """Σ over micro-batches ``((B, Lp), (B, Lc))``: full logits at every position (response = L), backward 2×."""
    from percausal_jax.training.flops import forward_flops

    req = objective.requirements
    total = 0.0
    for (B, Lp), (_, Lc) in micro_shapes:
        total += 3 * forward_flops(mc, B, Lp, Lp)
        if req.counterfactual:
            total += (3 if req.counterfactual_grad else 1) * forward_flops(mc, B, Lc, Lc)
    return total


# ---------------------------------------------------------------------------------------------- pipeline data


def take_batches(it, examples: int, limit: int = 100_000):
    """Host batches from ``it`` until they hold ≥ ``examples`` examples (all of them when ``examples`` is None)."""
    out, n = [], 0
    for batch in it:
        out.append(batch)
        n += len(unpack(batch))
        if (examples is not None and n >= examples) or len(out) >= limit:
            break
    return out


def shape3(batch) -> tuple[int, int, int]:
    return batch.personal.tokens.shape[1], batch.counterfactual.tokens.shape[1], batch.response.ids.shape[1]


def pad_stats(batches) -> dict:
    """Padding of ours' host batches: slots / real per array, distinct shapes."""
    rp = rc = sp = sc = rr = sr = 0
    for b in batches:
        p, c = real_tokens(b)
        B = b.response.ids.shape[0]
        Lp, Lc, R = shape3(b)
        rp, rc, sp, sc = rp + p, rc + c, sp + B * Lp, sc + B * Lc
        rr, sr = rr + int((np.asarray(b.response.weight) > 0).sum()), sr + B * R
    return {"batches": len(batches), "shapes": len({shape3(b) for b in batches}),
            "examples": sum(len(unpack(b)) for b in batches), "real": rp + rc,
            "personal": sp / rp - 1, "counterfactual": sc / rc - 1, "sequences": (sp + sc) / (rp + rc) - 1,
            "response": sr / rr - 1, "slots": sp + sc}


def ref_pad_stats(examples, group: int, objective: str) -> dict:
    """Padding of the reference on ``examples`` in consecutive micro-batches of ``group`` rows, each padded to its
    own maximum (the layouts of ``torch_batches``, sequences = prompt + response)."""
    real = slots = 0
    for i in range(0, len(examples), group):
        g = examples[i:i + group]
        lp = [len(e.prompt_ids) + len(e.response_ids) for e in g]
        lc = [len(e.prompt_no_profile_ids) + len(e.response_ids) for e in g]
        real += sum(e.personal_len + e.counterfactual_len for e in g)
        if objective == "perce":
            slots += len(g) * (max(lp) + max(lc))
        else:
            slots += 2 * len(g) * max(max(lp), max(lc))
    return {"real": real, "slots": slots, "sequences": slots / real - 1}


# ------------------------------------------------------------------------------------------------------ main


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=None, choices=sorted(LENGTHS),
                    help="length distribution and setting (default: the SmolLM2 setting, --personal-prompt etc.)")
    ap.add_argument("--model", default=None,
                    help=f"HF dir, 'embedded' (SmolLM2-135M-Instruct) or '{QWEN_SHAPE}' (random init, --layers)")
    ap.add_argument("--layers", type=int, default=None, help=f"decoder layers of '{QWEN_SHAPE}' (of 24)")
    ap.add_argument("--batch", type=int, default=None, help="logical batch: ours' rows per step, the reference's "
                    "examples per optimizer step")
    ap.add_argument("--ref-micro-batch", type=int, default=None, help="reference rows per micro-batch (default: batch)")
    ap.add_argument("--ours-accum", type=int, default=None,
                    help="ours' train.grad_accum_steps (default: batch / ref-micro-batch)")
    ap.add_argument("--bucket-multiple", type=int, default=None, help="data.bucket_multiple of ours")
    ap.add_argument("--variants", default=None, help="ours' pipeline variants: bucketed,packed")
    ap.add_argument("--pack", default="0,0,0", help="packed variant: data.pack_{personal,counterfactual,response}_len "
                    "(0 = derived from the length limits)")
    ap.add_argument("--examples", type=int, default=None, help="timed examples per side per round (default: batch)")
    ap.add_argument("--stats-examples", type=int, default=None, help="examples of the padding statistics")
    ap.add_argument("--stats-multiples", default=None, help="bucket multiples of the padding statistics")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every length (smoke runs)")
    ap.add_argument("--personal-prompt", type=int, default=256, help="default setting: personalized prompt length")
    ap.add_argument("--cf-prompt", type=int, default=64, help="default setting: counterfactual prompt length")
    ap.add_argument("--response", type=int, default=64, help="default setting: response length")
    ap.add_argument("--jitter", type=int, default=16, help="default setting: ± spread of the personal prompt")
    ap.add_argument("--rounds", type=int, default=None, help="timed passes over the examples")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side (on its first batch)")
    ap.add_argument("--objectives", default=None,
                    help="comma-separated objectives with a PyTorch reference (default: all of them: perce,nextquill)")
    ap.add_argument("--no-scan", action="store_true", help="ours with scan_layers=False")
    ap.add_argument("--remat", default="none", help="ours' model.remat_policy")
    ap.add_argument("--attention", default=None,
                    help="ours' model.attention_impl (default: configs/base.py's, so new kernels are picked up)")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    setting = SETTINGS[args.lengths or "default"]
    for k, v in setting.items():
        if k != "title" and getattr(args, k, None) is None:
            setattr(args, k, v)
    args.ref_micro_batch = args.ref_micro_batch or args.batch
    args.examples = args.examples or args.batch
    if args.ours_accum is None:
        args.ours_accum = max(1, args.batch // args.ref_micro_batch)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in ("bucketed", "packed")]
    if bad or not args.variants:
        raise SystemExit(f"--variants: expected bucketed and/or packed, got {args.variants}")
    if args.model == QWEN_SHAPE and not args.layers:
        args.layers = 4
    args.title = setting["title"] + (", ours with scan_layers=False" if args.no_scan else "")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    import torch

    from percausal_jax.data.rows import to_global
    from percausal_jax.hf.checkpoint import read_config, resolve_model_dir
    from percausal_jax.hf.gguf import resolve_model_arg
    from percausal_jax.objectives import NextQuill, PerCE, get
    from percausal_jax.training import setup
    from percausal_jax.training.flops import attended_sq

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    if args.model == QWEN_SHAPE:
        model_dir = qwen25_shape_model(args.layers, args.seed)
    else:
        model_dir = resolve_model_dir(resolve_model_arg(args.model)).local  # as setup.build resolves model.path
    info = machine_info({"torch": torch.__version__, "torch threads": threads})
    mc = read_config(model_dir)
    references = (PerCE.name, NextQuill.name)  # the objectives make_torch_steps has a reference step for
    objectives = [get(n.strip()).name for n in args.objectives.split(",")] if args.objectives else list(references)
    missing = [o for o in objectives if o not in references]
    if missing:
        raise SystemExit(f"--objectives: no PyTorch reference for {', '.join(missing)} "
                         f"(have {', '.join(references)})")
    if args.batch % args.ours_accum:
        raise SystemExit(f"--batch {args.batch} is not a multiple of --ours-accum {args.ours_accum}")

    lengths = (LENGTHS[args.lengths] if args.lengths else
               jittered(args.personal_prompt, args.cf_prompt, args.response, args.jitter)).scaled(args.scale)
    n_records = max(args.stats_examples, 2 * args.examples + 8 * args.batch)
    draws = lengths.sample(n_records, args.seed)
    base = [f"model.path={model_dir}", "model.dtype=float32", "model.compute_dtype=float32",
            f"model.scan_layers={not args.no_scan}", f"model.remat_policy={args.remat}",
            f"objective.vocab_chunk_size={args.chunk_size}", "optimizer.name=adamw", f"optimizer.lr={args.lr}", "optimizer.schedule=constant",
            "optimizer.warmup_steps=0", "optimizer.warmup_ratio=0.0", "optimizer.weight_decay=0.01",
            "optimizer.grad_clip_norm=1.0", f"train.global_batch_size={args.batch}",
            f"train.grad_accum_steps={args.ours_accum}", f"data.max_prompt_len={lengths.max_prompt_len}",
            f"data.max_response_len={lengths.max_response_len}", "data.shuffle=False",
            f"data.bucket_multiple={args.bucket_multiple}", f"seed={args.seed}"]
    if args.attention:
        base.append(f"model.attention_impl={args.attention}")
    pad_id = mc.pad_token_id if mc.pad_token_id is not None else 0

    def variant(run, packing: bool, multiple: int | None = None):
        """``run`` whose data settings are those of the variant (the same model, state and step)."""
        pack = [f"data.pack_{a}_len={n}" for a, n in zip(("personal", "counterfactual", "response"),
                                                          map(int, args.pack.split(",")))] if packing else []
        rc = run_config(*base, f"objective.name={run.objective.name}", f"data.packing={packing}",
                        f"data.bucket_multiple={multiple or args.bucket_multiple}", *pack)
        return dataclasses.replace(run, config=rc)

    # ------------------------------------------------------------------ padding statistics (no compute)
    def statistics_of(run, records):
        rows, verdict = [], []
        stat_records = records[:args.stats_examples]
        bucketed_examples = None
        multiples = [args.bucket_multiple] + [int(m) for m in args.stats_multiples.split(",") if m.strip()]
        for multiple in dict.fromkeys(multiples):  # the run's own multiple first
            for packing in (False, True):
                t0 = time.perf_counter()
                batches = take_batches(variant(run, packing, multiple).data_iterator(
                    stat_records, num_epochs=1, shuffle=False), None)
                s = pad_stats(batches)
                if not packing and bucketed_examples is None:
                    bucketed_examples = [e for b in batches for e in unpack(b)]
                rows.append([f"ours, {'packed' if packing else 'bucketed'}", multiple, args.batch, s["batches"],
                             s["shapes"], f"{100 * s['personal']:.1f}%", f"{100 * s['counterfactual']:.1f}%",
                             f"{100 * s['sequences']:.1f}%", f"{100 * s['response']:.1f}%"])
                print(f"stats: {rows[-1]} ({time.perf_counter() - t0:.1f} s)", flush=True)
                if multiple == args.bucket_multiple:
                    ok = s["sequences"] <= PAD_TARGET
                    verdict.append(f"ours {'packed' if packing else 'bucketed'} at bucket_multiple {multiple}: "
                                   f"{100 * s['sequences']:.1f}% padding ({'met' if ok else 'NOT met'}) with "
                                   f"{s['shapes']} distinct shapes over {s['batches']} batches")
        for group in sorted({args.batch, args.ref_micro_batch}, reverse=True):
            for o in objectives:
                s = ref_pad_stats(bucketed_examples, group, o)
                rows.append([f"reference {o}, rows padded to the max of {group}", "", group,
                             -(-len(bucketed_examples) // group), "", "", "", f"{100 * s['sequences']:.1f}%", ""])
        table = md_table(["side", "bucket multiple", "rows", "batches", "distinct shapes", "personal pad",
                          "counterfactual pad", "sequences pad", "response slots pad"], rows)
        return table, (f"Padding target ≤ {100 * PAD_TARGET:.0f}% (sequences) without a compile per batch: "
                       + "; ".join(verdict) + ".")

    # ------------------------------------------------------------------ timed streams, one objective at a time
    results, first_compile, stats_table, pad_verdict, peaks = {}, {}, None, "", {}
    losses_check = {}
    for o in objectives:
        run = setup.build(run_config(*base, f"objective.name={o}"))
        records = prompt_records(run.tokenizer, draws, seed=args.seed)
        if stats_table is None:
            stats_table, pad_verdict = statistics_of(run, records)
            print(stats_table, pad_verdict, sep="\n", flush=True)
        ref_params = run.reference_params
        attention = run.config.model.attention_impl
        step_fn = run.train_step()
        streams = {}
        cross_check = "bucketed" in args.variants and args.ref_micro_batch == args.batch
        shared_state = None
        for v in args.variants:
            host = take_batches(variant(run, v == "packed").data_iterator(records, num_epochs=None, shuffle=False),
                                args.examples)
            if cross_check or shared_state is None:  # own state when its losses are compared with the reference's
                state_run = run if not streams else dataclasses.replace(run, params=jax.tree.map(jnp_copy, run.params))
                state = {"s": state_run.init_state()}
                shared_state = state
            else:
                state = shared_state
            devs = [to_global(b, run.mesh) for b in host]
            compiled, t_compile = {}, {}
            for b in devs:
                key = shape3(b)
                if key not in compiled:
                    t0 = time.perf_counter()
                    with jax.set_mesh(run.mesh):
                        compiled[key] = step_fn.lower(state["s"], run.frozen, ref_params, b).compile()
                    t_compile[key] = time.perf_counter() - t0
                    peaks[(o, v, key)] = peak_bytes(compiled[key])
                    print(f"[{o}] ours {v}: compiled {key} in {t_compile[key]:.1f} s, compiled peak "
                          f"{(peaks[(o, v, key)] or 0) / 2**30:.2f} GiB", flush=True)
            stats = pad_stats(host)
            streams[f"ours ({v})"] = dict(kind="ours", host=host, dev=devs, compiled=compiled, state=state,
                                          stats=stats, compile_s=sum(t_compile.values()),
                                          tokens=[sum(real_tokens(b)) for b in host],
                                          shapes=[(b.response.ids.shape[0],) + shape3(b) for b in host],
                                          attended=[(attended_sq(b.personal.segment_ids),
                                                     attended_sq(b.counterfactual.segment_ids)) if v == "packed"
                                                    else None for b in host])
        # the reference: the examples of the first ours stream, in logical batches of --batch, micro-batches of m
        examples = [e for b in next(iter(streams.values()))["host"] for e in unpack(b)][:args.examples]
        if "bucketed" in args.variants:
            examples = [e for b in streams["ours (bucketed)"]["host"] for e in unpack(b)]
        tmodel, topt = reference_model(model_dir, args.lr)
        tstep = make_torch_steps(tmodel, topt, 1.0)[o]
        groups, micro_shapes, ref_tokens = [], [], []
        for i in range(0, len(examples), args.batch):
            g = examples[i:i + args.batch]
            micros = []
            for j in range(0, len(g), args.ref_micro_batch):
                t, shp = reference_layout(o, g[j:j + args.ref_micro_batch], pad_id)
                micros.append(t)
                micro_shapes.append(shp)
            groups.append(micros)
            ref_tokens.append(sum(e.personal_len + e.counterfactual_len for e in g))
        streams["reference (PyTorch)"] = dict(kind="theirs", groups=groups, tokens=ref_tokens,
                                              stats=ref_pad_stats(examples, args.ref_micro_batch, o),
                                              micro_shapes=micro_shapes)

        def run_step(s, i):
            t0 = time.perf_counter()
            if s["kind"] == "ours":
                b = s["dev"][i]
                with jax.set_mesh(run.mesh):
                    s["state"]["s"], m = s["compiled"][shape3(b)](s["state"]["s"], run.frozen, ref_params, b)
                jax.block_until_ready((s["state"]["s"], m))
                loss = float(m["loss"])
            else:
                loss = tstep(s["groups"][i])
            return time.perf_counter() - t0, loss

        n_steps = {k: len(s["tokens"]) for k, s in streams.items()}
        print(f"[{o}] steps per round: " + ", ".join(f"{k} {n}" for k, n in n_steps.items()), flush=True)
        for w in range(args.warmup):  # the same first batch on every side (states stay comparable)
            print(f"[{o}] warm-up " + ", ".join(f"{k} {run_step(s, 0)[0]:.2f} s" for k, s in streams.items()),
                  flush=True)
        times = {k: [] for k in streams}
        losses = {k: [] for k in streams}
        for r in range(args.rounds):
            for i in range(max(n_steps.values())):  # round-robin: ours, theirs, ours, theirs, ...
                line = []
                for k, s in streams.items():
                    if i < n_steps[k]:
                        t, loss = run_step(s, i)
                        times[k].append(t)
                        losses[k].append(loss)
                        line.append(f"{k} {t:.2f} s (loss {loss:.4f})")
                print(f"round {r} step {i} [{o}] " + "; ".join(line), flush=True)
        if cross_check:
            a, b = losses["ours (bucketed)"], losses["reference (PyTorch)"]
            losses_check[o] = (max(abs(x - y) for x, y in zip(a, b)), len(a), a[0], a[-1])
        results[o] = {k: dict(time=sum(times[k]), steps=times[k], tokens=sum(s["tokens"]) * args.rounds,
                              stats=s["stats"], compile_s=s.get("compile_s"),
                              shapes=s.get("shapes"), micro_shapes=s.get("micro_shapes"), attended=s.get("attended"),
                              distinct=len(s["compiled"]) if s["kind"] == "ours" else None)
                      for k, s in streams.items()}
        first_compile[o] = sum(s.get("compile_s") or 0 for s in streams.values())
        del streams, run, step_fn, ref_params, tmodel, topt, tstep, shared_state, state, state_run, devs, host
        gc.collect()

    # ------------------------------------------------------------------------------------------ report
    rows, verdict, analysis = [], [], []
    full_mc = (dataclasses.replace(mc, num_hidden_layers=24, layer_types=("full_attention",) * 24)
               if args.model == QWEN_SHAPE and mc.num_hidden_layers != 24 else None)
    for o in objectives:
        res = results[o]
        ref = res["reference (PyTorch)"]
        ref_tps = ref["tokens"] / ref["time"]
        obj = get(o)()
        f_ref = reference_flops(mc, obj, ref["micro_shapes"])
        for k, r in res.items():
            tps = r["tokens"] / r["time"]
            if k.startswith("ours"):
                shapes = sorted({s[1:] for s in r["shapes"]})
                shp = "; ".join(f"{args.batch}×({a}, {b}, {c})" for a, b, c in shapes[:3]) + (
                    f"; … ({len(shapes)})" if len(shapes) > 3 else "")
            else:
                ms = r["micro_shapes"]
                shp = (f"{len(ms)} micro-batches of ≤{args.ref_micro_batch} rows, p ≤ {max(s[0][1] for s in ms)}, "
                       f"c ≤ {max(s[1][1] for s in ms)}")
            rows.append([o, k, shp, len(r["steps"]), r["distinct"] if r["distinct"] is not None else "",
                         f"{100 * r['stats']['sequences']:.1f}%", r["tokens"], r["time"],
                         statistics.median(r["steps"]), tps,
                         f"{tps / ref_tps:.2f}×" if k.startswith("ours") else ""])
        for k, r in res.items():
            if not k.startswith("ours"):
                continue
            f_ours = ours_flops(mc, obj, r["shapes"], r.get("attended"))
            work = (f_ref / ref["tokens"] * args.rounds) / (f_ours / r["tokens"] * args.rounds)
            measured = (r["tokens"] / r["time"]) / ref_tps
            line = (f"- {o}, {k}: analytic FLOPs per real token ours {f_ours / (r['tokens'] / args.rounds):.3e}, "
                    f"reference {f_ref / (ref['tokens'] / args.rounds):.3e} → work ratio {work:.2f}× (the speed-up "
                    f"of a perfect implementation at equal FLOP/s); measured {measured:.2f}× → ours runs at "
                    f"{measured / work:.2f}× the reference's FLOP/s")
            if full_mc is not None:
                w24 = ((reference_flops(full_mc, obj, ref["micro_shapes"]) / ref["tokens"])
                       / (ours_flops(full_mc, obj, r["shapes"], r.get("attended")) / r["tokens"]))
                line += (f"; with all 24 layers the same batches give a work ratio of {w24:.2f}×, i.e. "
                         f"~{w24 * measured / work:.2f}× at the measured FLOP/s ratio")
            target = TARGETS[o]
            if measured < target:
                line += (f". Target {target}× missed: " + (
                    f"the work ratio itself is below it ({work:.2f}×)" if work < target else
                    f"the work ratio ({work:.2f}×) allows it, ours' FLOP/s ({measured / work:.2f}× the reference's) "
                    "does not"))
            analysis.append(line)
            verdict.append(f"{o} {k}: {measured:.2f}× (target {target}×: "
                           f"{'met' if measured >= target else 'NOT met'})")
    headers = ["objective", "side", "padded shapes (B×(Lp, Lc, R))", "steps", "distinct compiled shapes",
               "padding (slots / real − 1)", "real tokens", "total s", "median step s", "real tok/s",
               "ours / reference"]
    table = md_table(headers, rows)
    print(table)
    print("\n".join(analysis))
    check = "; ".join(f"{o}: max |Δ| {d:.2e} over {n} steps (ours {a:.4f} → {b:.4f})"
                      for o, (d, n, a, b) in losses_check.items())
    if check:
        print("loss cross-check:", check)
    max_peak = max((p or 0) for p in peaks.values()) if peaks else 0
    all_times = "; ".join(f"{o} {k}: " + ", ".join(f"{x:.2f}" for x in r["steps"])
                          for o, res in results.items() for k, r in res.items())
    model_desc = (f"random init, Qwen2.5-0.5B's shape with {mc.num_hidden_layers} of its 24 layers"
                  if args.model == QWEN_SHAPE else "real weights")
    body = "\n".join([
        info_block({**info, "model": f"{os.path.basename(str(model_dir).rstrip('/'))} ({model_desc}, fp32, "
                    f"{mc.num_params() / 1e6:.1f}M params, vocab {mc.vocab_size}, {mc.num_hidden_layers} layers); "
                    f"ours: scan_layers={not args.no_scan}, remat {args.remat}, attention {attention}, vocab "
                    f"chunk {args.chunk_size}, grad_accum_steps {args.ours_accum}, max compiled peak "
                    f"{max_peak / 2**30:.2f} GiB; torch: AutoModelForCausalLM default attention (sdpa)",
                    "lengths": lengths.describe() + f"; data.max_prompt_len {lengths.max_prompt_len}, "
                    f"data.max_response_len {lengths.max_response_len}, data.bucket_multiple {args.bucket_multiple}",
                    "batch": f"logical batch {args.batch} (ours: rows per step; reference: examples per optimizer "
                    f"step in micro-batches of {args.ref_micro_batch}); {args.examples} timed examples per side and "
                    f"round (ours packed: the batches that cover them)",
                    "protocol": f"per objective: every distinct shape compiled ahead (not timed: "
                    + ", ".join(f"{o} {first_compile[o]:.0f} s" for o in objectives)
                    + f"), {args.warmup} untimed warm-up step(s) per side on its first batch, then {args.rounds} "
                    "round(s) stepping the sides round-robin (ours, theirs, ours, ...) in one process; real tok/s = "
                    "Σ real (unpadded) personal + counterfactual tokens / Σ step time, the same examples on every "
                    "side"}),
        "",
        f"Padding of the input pipeline ({args.stats_examples} examples, rows of {args.batch}; overhead = padded "
        "slots / real tokens − 1; 'sequences' = personal + counterfactual, the tokens the trunk runs; the reference "
        "pads each micro-batch to its own maximum (PerCE: each pass to its max; NextQuill: both passes to the "
        "longer):",
        "",
        stats_table,
        "",
        pad_verdict,
        "",
        "Timed steps:",
        "",
        table,
        "",
        f"All step times (s): {all_times}",
        "",
        (f"Loss cross-check, ours (bucketed) vs reference at the same step (same init, examples, AdamW): {check}."
         if check else "No loss cross-check: the reference's micro-batches or ours' packing group the examples "
         "differently from ours' steps (losses are per-step means over different sets)."),
        "",
        "Work done per step (where the ratio comes from):",
        "\n".join(analysis),
        "",
        "Targets (real tok/s, ours / reference): " + "; ".join(verdict) + ".",
    ] + (["", WHY_DEFAULT] if not args.lengths else []))
    if not args.no_write:
        write_section(args.title, body)


def jnp_copy(x):
    import jax.numpy as jnp

    return jnp.copy(x)


if __name__ == "__main__":
    main()
