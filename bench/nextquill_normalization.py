"""NextQuill normalization: per sequence (the reference's ``compute_loss``: each sequence by its own Σω and token
count, sequences averaged) vs pooled (Σω over the whole global batch), side by side on the same data and steps.

Both runs: ``configs/demo.py`` (embedded SmolLM2-135M-Instruct, LoRA r16) on the synthetic personalization set, the
same seed and data order, ``objective.name=nextquill``, 20 steps, batch 4 in 4 micro-batches of 1 (as the reference:
batch 1 per device, gradient accumulation). Reported per run: loss and pre-clip gradient norm, mean / min / max over
the steps, and the relative difference of the per-step losses.

How the reference's Trainer scales the loss: ``compute_loss`` returns a per-micro-batch mean, but passes
``num_items_in_batch``, so (transformers ≥ 4.46, a model whose forward takes ``**kwargs``) Trainer does not divide by
``gradient_accumulation_steps``: the 16 micro-batch losses of one optimizer step are *summed* (and multiplied by the
process count when ``average_tokens_across_devices``). The gradient is then 16× ours (per-sequence = the mean); Adam
is invariant to that constant factor except through ε and ``max_grad_norm=1.0``: clipping acts on the 16× norm, so
it engages on every step whose mean-gradient norm exceeds 1/16. The table gives the fraction of steps that would be
clipped at 1.0 under our scaling and under the reference's ×16.

    .venv/bin/python bench/nextquill_normalization.py            # writes its section of bench/RESULTS.md
    .venv/bin/python bench/nextquill_normalization.py --steps 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, info_block, machine_info, md_table, write_section

REFERENCE_ACCUMULATION = 16  # train.py: per_device_train_batch_size 1, gradient_accumulation_steps 16


def run(tmp: Path, per_sequence: bool, steps: int) -> list[dict]:
    from percausal_jax import cli

    work = tmp / ("per_sequence" if per_sequence else "pooled")
    rc = cli.main(["train", "--config", str(REPO / "configs" / "demo.py"), "--workdir", str(work), "--no-progress",
                   f"--config.data.train={tmp / 'data' / 'train.jsonl'}", "--config.data.eval=",
                   "--config.objective.name=nextquill", f"--config.objective.nextquill.per_sequence={per_sequence}",
                   f"--config.train.steps={steps}", "--config.train.global_batch_size=4",
                   "--config.train.grad_accum_steps=4", "--config.checkpoint.every_steps=1000",
                   "--config.mesh.fsdp=1", "--config.mesh.data=1", "--config.mesh.tensor=1"])
    if rc:
        raise SystemExit(f"train failed ({rc})")
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    info = machine_info()
    from percausal_jax import cli

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if cli.main(["synth", "--out-dir", str(tmp / "data"), "--users", "12", "--seed", "0"]):
            raise SystemExit("synth failed")
        logs = {name: run(tmp, name == "per-sequence", args.steps) for name in ("per-sequence", "pooled")}
    rows = []
    for name, log in logs.items():
        loss = np.array([r["loss"] for r in log])
        gn = np.array([r["grad_norm"] for r in log])
        rows.append([name, f"{loss.mean():.4f}", f"{loss.min():.4f} – {loss.max():.4f}", f"{gn.mean():.4f}",
                     f"{gn.min():.4f} – {gn.max():.4f}", f"{np.mean(gn > 1.0):.2f}",
                     f"{np.mean(gn * REFERENCE_ACCUMULATION > 1.0):.2f}"])
    a = np.array([r["loss"] for r in logs["per-sequence"]])
    b = np.array([r["loss"] for r in logs["pooled"]])
    table = md_table(["normalization", "loss mean", "loss range", "grad-norm mean", "grad-norm range",
                      "clipped at 1.0", "clipped at 1.0 if ×16 (reference sum)"], rows)
    body = "\n".join([
        info_block({**info, "wall_s": round(time.perf_counter() - t0, 1)}), "",
        f"{args.steps} steps, configs/demo.py (SmolLM2-135M-Instruct, LoRA r16), NextQuill, batch 4 as 4 "
        "micro-batches of 1; the same data order in both runs. Gradient norms are before clipping.", "", table, "",
        f"Per-step loss, per-sequence vs pooled: mean |relative difference| {np.mean(np.abs(a - b) / np.abs(b)):.3%},"
        f" max {np.max(np.abs(a - b) / np.abs(b)):.3%}. The reference sums its 16 micro-batch means per optimizer "
        "step (Trainer does not divide by the accumulation steps when `num_items_in_batch` is passed), so its "
        "gradient is 16× the per-sequence mean used here; with AdamW that factor only matters through ε and through "
        "`max_grad_norm=1.0`, which then clips every step whose mean-gradient norm exceeds 1/16 (last column).",
    ])
    print(body)
    if not args.no_write:
        write_section("NextQuill normalization: per sequence (reference) vs pooled", body)


if __name__ == "__main__":
    main()
