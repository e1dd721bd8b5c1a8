"""Where a CPU train step's time goes, and our FLOP/s against PyTorch's, per personalized prompt length.

Two modes (both at SmolLM2-135M shape by default, ``--model embedded``; synthetic batches of one example per row,
counterfactual prompt = the last quarter of the personalized prompt, a fixed-length response):

- ``profile``: builds the run every command builds (``setup.build`` from ``configs/base.py`` + overrides), traces
  a few jitted train steps with ``jax.profiler`` and sums the XLA:CPU thunks' times by component. Components come
  from the HLO ops' metadata: the model's ``jax.named_scope``s (``attn_core``, ``attn_qkv``, ``attn_o_proj``,
  ``mlp``, ``norm``, ``masks_rope``, ``embed``; backward ops carry ``transpose(...)``), the vocabulary-chunked head
  (a rematerialized scan), the layer scan's slicing/stacking, and the top-level update (grad norm, AdamW, the
  skip-if-not-finite select).
- ``sweep``: ours vs the same model in PyTorch (transformers, sdpa), strictly alternating in one process so
  machine load hits both alike; FLOP/s from :mod:`percausal_jax.training.flops` (backward = 2× forward, attention
  counted densely on both sides; ours runs the head at response positions, the reference at every position).

    .venv/bin/python bench/cpu_profile.py profile --lengths 256,512,1024 --objectives ce,perce
    .venv/bin/python bench/cpu_profile.py sweep --lengths 256,512,1024 --objectives perce --attention blocked
    .venv/bin/python bench/cpu_profile.py attention --lengths 256,512,1024     # the attention kernels alone
"""

from __future__ import annotations

import argparse
import collections
import gc
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import collate_examples, machine_info, md_table, run_config, synthetic_examples  # noqa: E402

COMPONENTS = ("attn_core", "attn_qkv", "attn_o_proj", "mlp", "norm", "masks_rope", "embed", "head", "scan",
              "optimizer", "other")
_SCOPE = re.compile(r"\b(attn_core|attn_qkv|attn_o_proj|mlp|norm|masks_rope|embed)\b")
_CONTAINERS = ("while", "conditional", "call")


# ------------------------------------------------------------------------------------------------- the runs


def model_dir_of(arg: str):
    from percausal_jax.hf.checkpoint import resolve_model_dir
    from percausal_jax.hf.gguf import resolve_model_arg

    return resolve_model_dir(resolve_model_arg(arg)).local


def overrides(args, model_dir, objective: str, batch: int, attention: str | None = None,
              scan: bool | None = None) -> list[str]:
    return [f"model.path={model_dir}", f"model.dtype={args.dtype}", f"model.compute_dtype={args.dtype}",
            f"model.scan_layers={args.scan if scan is None else scan}", "model.remat_policy=none",
            f"model.attention_impl={attention or args.attention}", f"objective.name={objective}",
            f"objective.vocab_chunk_size={args.chunk_size}", "optimizer.name=adamw", "optimizer.lr=1e-5",
            "optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.warmup_ratio=0.0",
            "optimizer.weight_decay=0.01", "optimizer.grad_clip_norm=1.0", f"train.global_batch_size={batch}"]


def examples_for(args, length: int, vocab: int):
    return synthetic_examples(args.batch, length, max(length // 4, 8), args.response, vocab)


class Ours:
    """One objective's run, state and jitted step on one batch."""

    def __init__(self, ovr: list[str], examples):
        import jax

        from percausal_jax.data.pairing import shape_of
        from percausal_jax.data.rows import to_global
        from percausal_jax.training import setup

        self.run = setup.build(run_config(*ovr))
        self.state = self.run.init_state()
        self.step = self.run.train_step()
        self.ref = self.run.reference_params
        host = collate_examples(examples)
        self.shapes = shape_of(host)
        self.batch = to_global(host, self.run.mesh)
        self.jax = jax

    def compiled_text(self) -> str:
        with self.jax.set_mesh(self.run.mesh):
            return self.step.lower(self.state, self.run.frozen, self.ref, self.batch).compile().as_text()

    def __call__(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        with self.jax.set_mesh(self.run.mesh):
            self.state, m = self.step(self.state, self.run.frozen, self.ref, self.batch)
        self.jax.block_until_ready((self.state, m))
        return time.perf_counter() - t0, float(m["loss"])

    def flops(self) -> float:
        from percausal_jax.training.flops import step_flops

        return step_flops(self.run.model_config, self.run.objective.requirements, self.batch.response.ids.shape[0],
                          *self.shapes)


# --------------------------------------------------------------------------------------------- profile mode


def hlo_metadata(text: str) -> dict[str, tuple[str, str]]:
    """instruction name → (opcode, op_name) from a compiled module's text."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = ", line)
        if not m:
            continue
        rest = line[m.end():]
        if rest.startswith("("):  # tuple type: skip to its closing parenthesis
            depth = 0
            for i, ch in enumerate(rest):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    rest = rest[i + 1:]
                    break
        op = re.match(r"\s*[^\s(]*\s*([a-z][\w\-]*)\(", rest) or re.match(r"\s*([a-z][\w\-]*)\(", rest)
        name = re.search(r'op_name="([^"]*)"', line)
        out[m.group(1)] = (op.group(1) if op else "?", name.group(1) if name else "")
    return out


def component_of(op_name: str, opcode: str = "") -> str:
    """A thunk's component from its HLO op name (the JAX name stack)."""
    m = _SCOPE.findall(op_name)
    if m:
        return m[-1]  # innermost model scope
    if re.search(r"checkpoint|brd|brv|take_along_axis|logsumexp", op_name):
        return "head"  # the vocabulary-chunked log-probs (a rematerialized scan) and the gather of response rows
    if "while/body" in op_name and re.search(r"dynamic_slice|dynamic_update_slice", op_name):
        return "scan"  # the layer scan: slicing stacked parameters, stacking residuals / per-layer gradients
    if op_name and "while" not in op_name:
        return "optimizer"  # top level, outside the passes: grad norm, AdamW, the skip-if-not-finite select
    return "other"  # buffer initialisation (broadcast zeros), layout copies without a name


def trace_thunks(fn, steps: int) -> tuple[dict[str, float], float]:
    """hlo op name → summed µs of its thunks over ``steps`` traced calls of ``fn``; and the wall time (s)."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0
        t0 = time.perf_counter()
        with jax.profiler.trace(d, profiler_options=options):
            for _ in range(steps):
                fn()
        wall = time.perf_counter() - t0
        path = glob.glob(os.path.join(d, "plugins", "profile", "*", "*.trace.json.gz"))[0]
        events = json.load(gzip.open(path))["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op and not e.get("name", "").startswith("end:"):
            per_op[op] += float(e.get("dur", 0.0))
    return per_op, wall


def profile(args) -> str:
    model_dir = model_dir_of(args.model)
    from percausal_jax.hf.checkpoint import read_config

    mc = read_config(model_dir)
    rows, detail = [], []
    for objective in args.objectives.split(","):
        for length in [int(x) for x in args.lengths.split(",")]:
            ours = Ours(overrides(args, model_dir, objective, args.batch), examples_for(args, length, mc.vocab_size))
            first, _ = ours()
            untraced = statistics.median([ours()[0] for _ in range(max(args.warmup, 1))])
            meta = hlo_metadata(ours.compiled_text())
            per_op, wall = trace_thunks(ours, args.steps)
            comp = collections.Counter()
            fwd_bwd = collections.Counter()
            unknown = 0.0
            for op, us in per_op.items():
                opcode, op_name = meta.get(op, ("?", ""))
                if opcode in _CONTAINERS:
                    continue
                if opcode == "?":
                    unknown += us
                c = component_of(op_name, opcode)
                comp[c] += us
                fwd_bwd[(c, "bwd" if "transpose(" in op_name else "fwd")] += us
            total = sum(comp.values())
            step_s = wall / args.steps
            Lp, Lc, R = ours.shapes
            rows.append([objective, length, f"{args.batch}×{Lp} / {args.batch}×{Lc} / R {R}", untraced, step_s,
                         100 * total / 1e6 / wall] + [100 * comp[c] / total for c in COMPONENTS])
            top = sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]
            detail.append(f"- {objective} {length}: compile+first step {first:.1f} s; thunk time {total / 1e6:.2f} s "
                          f"over {args.steps} steps (unattributed thunks {100 * unknown / max(total, 1):.1f}%); "
                          "fwd/bwd: " + ", ".join(
                              f"{c} {100 * fwd_bwd[(c, 'fwd')] / total:.1f}/{100 * fwd_bwd[(c, 'bwd')] / total:.1f}"
                              for c in COMPONENTS if comp[c]) + "; top ops: " + ", ".join(
                              f"{op} ({component_of(meta.get(op, ('', ''))[1])}) {100 * us / total:.1f}%"
                              for op, us in top))
            print(md_table(["objective", "prompt", "shapes", "step s", "traced step s", "thunks % wall"]
                           + list(COMPONENTS), rows[-1:]), "\n", detail[-1], flush=True)
            del ours
            gc.collect()
    headers = ["objective", "prompt", "padded shapes (p / c / R)", "step s", "traced step s",
               "Σ thunks / traced wall %"] + [f"{c} %" for c in COMPONENTS]
    return md_table(headers, rows) + "\n\n" + "\n".join(detail)


# ----------------------------------------------------------------------------------------------- sweep mode


def torch_step(objective: str, model, opt):
    """Reference steps: PerCE / NextQuill from ``speed_vs_torch``; CE = mean NLL of the personalized pass."""
    import torch

    from speed_vs_torch import make_torch_steps

    steps = make_torch_steps(model, opt, 1.0)
    if objective in steps:
        return steps[objective]

    def ce_step(t):
        ip, mp, yp = t["p"]
        lp = torch.log_softmax(model(input_ids=ip, attention_mask=mp).logits[:, :-1].float(), dim=-1)
        y = yp[:, 1:]
        valid = y != -100
        g = lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid]
        loss = -g.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return ce_step


def torch_flops(mc, objective: str, shapes) -> float:
    from percausal_jax.objectives import get
    from percausal_jax.training.flops import forward_flops

    (B, Lp), (_, Lc) = shapes
    req = get(objective)().requirements
    total = 3 * forward_flops(mc, B, Lp, Lp)
    if req.counterfactual:
        total += (3 if req.counterfactual_grad else 1) * forward_flops(mc, B, Lc, Lc)
    return total


class TorchSide:
    """The PyTorch reference step on one batch: built in this process, or (``separate``) in a spawned worker that
    sleeps on a pipe while ours runs. One process holding both runtimes slowed PyTorch 4–6× at 512 tokens on this
    2-core machine (its OpenMP workers and XLA's thread pool fight for the cores), so the default is separate."""

    def __init__(self, model_dir, objective: str, examples, pad_id: int, separate: bool):
        self.separate = separate
        if separate:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_torch_worker, args=(child, str(model_dir), objective, examples, pad_id),
                                    daemon=True)
            self.proc.start()
            self.shapes = self.conn.recv()
        else:
            self.step, self.batch, self.shapes = _torch_setup(str(model_dir), objective, examples, pad_id)

    def __call__(self) -> tuple[float, float]:
        if self.separate:
            self.conn.send("step")
            return self.conn.recv()
        t0 = time.perf_counter()
        loss = self.step(self.batch)
        return time.perf_counter() - t0, loss

    def close(self):
        if self.separate:
            self.conn.send("stop")
            self.proc.join(timeout=60)


def _torch_setup(model_dir: str, objective: str, examples, pad_id: int):
    import torch
    from transformers import AutoModelForCausalLM

    from speed_vs_torch import torch_batches

    torch.set_num_threads(os.cpu_count())
    t_perce, t_nq = torch_batches(examples, pad_id)
    batch = t_nq if objective == "nextquill" else t_perce
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-5)
    return torch_step(objective, model, opt), batch, (tuple(batch["p"][0].shape), tuple(batch["c"][0].shape))


def _torch_worker(conn, model_dir, objective, examples, pad_id):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    step, batch, shapes = _torch_setup(model_dir, objective, examples, pad_id)
    conn.send(shapes)
    while conn.recv() == "step":
        t0 = time.perf_counter()
        loss = step(batch)
        conn.send((time.perf_counter() - t0, loss))


def sweep(args) -> str:
    from percausal_jax.hf.checkpoint import read_config

    model_dir = model_dir_of(args.model)
    mc = read_config(model_dir)
    pad_id = mc.pad_token_id if mc.pad_token_id is not None else 0
    variants = [v.split(":") for v in args.attention.split(",")]  # impl[:scan] e.g. blocked,xla:False
    rows, raw = [], []
    for objective in args.objectives.split(","):
        for length in [int(x) for x in args.lengths.split(",")]:
            examples = examples_for(args, length, mc.vocab_size)
            theirs = TorchSide(model_dir, objective, examples, pad_id, separate=args.torch_process == "separate")
            tshapes = theirs.shapes
            sides = {}
            for v in variants:
                impl, scan = v[0], (v[1] == "True" if len(v) > 1 else args.scan)
                sides[f"{impl}{'' if scan else ' (loop)'}"] = Ours(
                    overrides(args, model_dir, objective, args.batch, impl, scan), examples)
            times = {k: [] for k in [*sides, "torch"]}
            losses = {k: [] for k in times}
            for k, o in sides.items():
                o()  # compile
            theirs()
            for _ in range(args.warmup):
                for o in sides.values():
                    o()
                theirs()
            load = []
            for r in range(args.rounds):
                load.append(os.getloadavg()[0])
                for k, o in [*sides.items(), ("torch", theirs)]:
                    t, loss = o()
                    times[k].append(t)
                    losses[k].append(loss)
                print(f"[{objective} {length}] round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                      flush=True)
            theirs.close()
            ft = torch_flops(mc, objective, tshapes)
            tt = statistics.median(times["torch"])
            for k, o in sides.items():
                fo, to = o.flops(), statistics.median(times[k])
                Lp, Lc, R = o.shapes
                rows.append([objective, length, k, f"{args.batch}×{Lp} / {args.batch}×{Lc} / R {R}", to,
                             fo / to / 1e9, f"{tshapes[0][0]}×{tshapes[0][1]} / {tshapes[1][0]}×{tshapes[1][1]}", tt,
                             ft / tt / 1e9, f"{(fo / to) / (ft / tt):.2f}×", f"{tt / to:.2f}×",
                             f"{max(abs(a - b) for a, b in zip(losses[k], losses['torch'])):.1e}"])
            raw.append(f"- {objective} {length} (1-min load avg per round: {', '.join(f'{x:.1f}' for x in load)}): "
                       + "; ".join(f"{k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in times.items()))
            print(md_table(HEADERS, rows[-len(sides):]), flush=True)
            del sides, theirs
            gc.collect()
    return md_table(HEADERS, rows) + "\n\nAll step times (s):\n" + "\n".join(raw)


HEADERS = ["objective", "prompt", "ours", "ours shapes (p / c / R)", "ours median s", "ours GFLOP/s",
           "torch shapes (p / c)", "torch median s", "torch GFLOP/s", "FLOP/s ours / torch", "speed ours / torch",
           "max |Δloss|"]


# ------------------------------------------------------------------------------------------- attention mode


def attention(args) -> str:
    """The attention kernels alone at the model's head layout: fwd and fwd+bwd (grads of q, k, v), per length."""
    import jax
    import jax.numpy as jnp

    from percausal_jax.hf.checkpoint import read_config
    from percausal_jax.models import layers

    mc = read_config(model_dir_of(args.model))
    H, K, Dh = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        L = length + args.response
        rs = np.random.RandomState(0)
        q, k, v = (jnp.asarray(rs.randn(args.batch, L, n, Dh).astype(np.float32)) for n in (H, K, K))
        seg = jnp.ones((args.batch, L), jnp.int32).at[:, L - L // 8:].set(0)  # right padding
        pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (args.batch, L))
        for impl in args.attention.split(","):
            def f(q, k, v, impl=impl):
                return jnp.sum(layers.attention(impl, q, k, v, seg, pos, mc, False) ** 2)

            fwd, grad = jax.jit(f), jax.jit(jax.grad(f, argnums=(0, 1, 2)))
            res = []
            for g in (fwd, grad):
                jax.block_until_ready(g(q, k, v))
                ts = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    jax.block_until_ready(g(q, k, v))
                    ts.append(time.perf_counter() - t0)
                res.append(statistics.median(ts))
            dense = 4 * args.batch * H * Dh * L * L
            rows.append([L, impl, res[0] * 1e3, res[1] * 1e3, dense / res[0] / 1e9, 3 * dense / res[1] / 1e9])
            print(md_table(["L", "impl", "fwd ms", "fwd+bwd ms", "fwd GFLOP/s (dense)", "fwd+bwd GFLOP/s (dense)"],
                           rows[-1:]), flush=True)
    return md_table(["L", "impl", "fwd ms", "fwd+bwd ms", "fwd GFLOP/s (dense)", "fwd+bwd GFLOP/s (dense)"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("profile", "sweep", "attention"))
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--lengths", default="256,512,1024", help="personalized prompt lengths")
    ap.add_argument("--objectives", default="ce,perce")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--attention", default="auto",
                    help="model.attention_impl (sweep: comma-separated variants impl[:scan], e.g. blocked,xla:True)")
    ap.add_argument("--scan", type=lambda s: s == "True", default=True, help="model.scan_layers (True | False)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2, help="profile: traced steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=6, help="profile: the most expensive ops to list")
    ap.add_argument("--torch-process", choices=("separate", "same"), default="separate",
                    help="sweep: the PyTorch reference in a spawned worker (default) or in this process")
    ap.add_argument("--out", default="", help="append the markdown table to this file")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = machine_info({"mode": args.mode, "batch": args.batch, "response": args.response,
                         "attention": args.attention, "scan_layers": args.scan, "dtype": args.dtype,
                         "torch process": args.torch_process})
    text = {"profile": profile, "sweep": sweep, "attention": attention}[args.mode](args)
    out = "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n- command: `" + " ".join(sys.argv) + "`\n\n" + text
    print(out)
    if args.out:
        with open(args.out, "a") as f:
            f.write(out + "\n\n")


if __name__ == "__main__":
    main()
