"""``percausal sweep``: every objective at every learning rate on the same data and budget, each evaluated, one
table with each method's best LR (the fair comparison: every method at its best LR) and all cells."""

from __future__ import annotations

import json
import sys

PAPER_GRID = (2e-6, 5e-6, 8e-6, 2e-5, 5e-5)  # PerCE paper §4


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="objectives × learning rates: train, evaluate, best LR per method")
    p.add_argument("--config", required=True, help="training config (e.g. configs/demo.py)")
    p.add_argument("--out", required=True, help="directory for the runs and sweep.md / sweep.json")
    p.add_argument("--train", required=True, help="training records")
    p.add_argument("--test", required=True, help="evaluation records")
    p.add_argument("--objectives", default=None, help="comma-separated (default: every registered objective)")
    p.add_argument("--lrs", default=",".join(str(x) for x in PAPER_GRID))
    p.add_argument("--metric", default="rougeL", help="metric that picks the best LR (higher is better)")
    p.add_argument("--eval-limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from percausal_jax import storage
    from percausal_jax.errors import UserError
    from percausal_jax.lock import WorkdirLock
    from percausal_jax.objectives import OBJECTIVES, get

    objectives = list(OBJECTIVES) if args.objectives is None else [o.strip() for o in args.objectives.split(",")
                                                                    if o.strip()]
    for name in objectives:
        get(name)  # an unknown name is an error before anything trains
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lrs {args.lrs!r}: expected comma-separated numbers") from None
    from percausal_jax.commands._args import AT_LEAST_1, NONNEG, check
    from percausal_jax.config import RunConfig, load_config

    check(args, {"eval_limit": NONNEG, "max_new_tokens": AT_LEAST_1})
    for obj in objectives:  # every cell's config is valid before anything trains or is written
        for lr in lrs:
            RunConfig.from_config(load_config(args.config, _cell_overrides(args, obj, lr)), where=args.config)
    out = storage.path(args.out)  # local or gs://
    with WorkdirLock(out, command="sweep"):  # one sweep per --out (each run also locks its own workdir)
        return _sweep(args, out, objectives, lrs)


def _sweep(args, out, objectives: list[str], lrs: list[float]) -> int:
    from percausal_jax import cli
    from percausal_jax.atomic import write_text
    from percausal_jax.errors import UserError
    from percausal_jax.evaluation.wordnet import available

    cells: dict[str, dict[str, dict]] = {}
    for obj in objectives:
        for lr in lrs:
            work = out / f"{obj}-lr{lr:g}"
            print(f"== {obj} lr={lr:g}", file=sys.stderr, flush=True)
            train = ["train", "--config", args.config, "--workdir", work, "--no-progress",
                     *_cell_overrides(args, obj, lr)]
            evaluate = ["eval", "--workdir", work, "--data", args.test, "--out", work / "preds.jsonl", "--no-progress",
                        "--limit", args.eval_limit, "--max-new-tokens", args.max_new_tokens]
            if not available():
                evaluate.append("--no-meteor")
            for argv in (train, evaluate):
                rc = cli.main([str(a) for a in argv])
                if rc:
                    raise UserError(f"{obj} lr={lr:g}: `percausal {argv[0]}` failed (exit {rc})")
            cells.setdefault(obj, {})[f"{lr:g}"] = json.loads((work / "preds.metrics.json").read_text())
    best = {obj: max(by_lr.items(), key=lambda kv: kv[1].get(args.metric, float("-inf")))
            for obj, by_lr in cells.items()}
    write_text(out / "sweep.json", json.dumps({"metric": args.metric, "best": {o: {"lr": lr, **m} for o, (lr, m)
                                                                                  in best.items()}, "cells": cells},
                                                 indent=2))
    table = markdown(cells, best, args.metric, lrs)
    write_text(out / "sweep.md", table)
    print(table)
    return 0


def _cell_overrides(args, obj: str, lr: float) -> list[str]:
    return [f"--config.objective.name={obj}", f"--config.optimizer.lr={lr}", f"--config.data.train={args.train}",
            f"--config.data.eval={args.test}", *args.overrides]


def markdown(cells: dict, best: dict, metric: str, lrs: list[float]) -> str:
    keys = [k for k in ("rouge1", "rougeL", "meteor", "span_recall") if any(k in m for c in cells.values()
                                                                            for m in c.values())]
    lines = [f"### Best learning rate per method (by {metric})", "",
             "| method | best LR | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for obj, (lr, m) in best.items():
        lines.append(f"| {obj} | {lr} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys) + " |")
    lines += ["", f"### All cells ({metric})", "", "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
              "|---|" + "---|" * len(lrs)]
    for obj, by_lr in cells.items():
        lines.append(f"| {obj} | " + " | ".join(f"{by_lr[f'{lr:g}'].get(metric, float('nan')):.4f}"
                                                 for lr in lrs) + " |")
    return "\n".join(lines) + "\n"
