"""Learning-effect benchmark: does training on the causal objectives personalize, and at what cost to generic text?

One command per probe level: ``percausal synth --difficulty LEVEL`` (train users, validation users, unseen test
users), then ``percausal sweep`` over every method × an LR grid × seeds on the embedded SmolLM2-135M-Instruct with
LoRA (``configs/demo.py``). Each method's LR is chosen on the validation users by the criterion fixed below (mean
teacher-forced NLL of the gold responses over seeds, lower is better: it favours neither personal nor generic
tokens); the test users are scored only at that LR. Reported per method, mean ± std over seeds on the test users:
personal-token and generic-token NLL (teacher-forced, tokens split by the records' ``personal_spans``), ROUGE-1/L,
METEOR, span recall (greedy generations), and wall time; plots of personal / generic NLL vs step and of the final
metrics (the sweep's ``sweep.html`` embeds them).

Methods: ce, perce (clip 0.8–5, the paper's), perce[clip_max=2] (the personal-vs-generic knob), nextquill, lossce,
entce; ``--full`` adds perce[clip_min=0] (no floor on generic tokens' weight).

    .venv/bin/python bench/learning_effect.py                   # default size, level hard: ~45 min on 2 cores
    .venv/bin/python bench/learning_effect.py --level medium
    .venv/bin/python bench/learning_effect.py --full --level medium,hard   # 4 LRs × 5 seeds × 24 steps: hours

Both sizes share the compiled programs through XLA's persistent cache (``$PERCAUSAL_CACHE/jax-compilation``), so
a second level or a re-run compiles little. ``--write`` replaces this script's section of ``bench/RESULTS.md``
(one subsection per level) and copies the plots to ``bench/figures/``; by default the tables are only printed.
A re-run with the same ``--out`` reuses finished cells.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import REPO, info_block, machine_info, write_section

TITLE = "Learning effect: personal vs generic tokens, every method at its best LR (synthetic users, SmolLM2, LoRA)"
FIGURES = REPO / "bench" / "figures"
SIZES = {
    # users: train + test users of `synth` (test = 20%), val: further users for choosing the LR
    "default": dict(users=12, val_users=3, seeds="0,1,2", lrs="5e-4,2e-3", steps=6, eval_every=2, eval_limit=0,
                    methods="ce,perce,perce[clip_max=2],nextquill,lossce,entce"),
    "full": dict(users=20, val_users=4, seeds="0,1,2,3,4", lrs="2.5e-4,5e-4,1e-3,2e-3", steps=24, eval_every=4,
                 eval_limit=16, methods="ce,perce,perce[clip_max=2],perce[clip_min=0],nextquill,lossce,entce"),
}
SELECT = "nll"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--level", default="hard", help="synth difficulty, or several comma-separated (default hard)")
    p.add_argument("--full", action="store_true", help="the larger study (see the module doc)")
    p.add_argument("--out", default="/tmp/learning_effect", help="working folder (finished cells are reused)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 40, with --full 64")
    p.add_argument("--write", action="store_true", help="write the tables to bench/RESULTS.md, plots to bench/figures")
    args = p.parse_args()
    size = SIZES["full" if args.full else "default"]
    args.max_new_tokens = args.max_new_tokens or (64 if args.full else 40)
    levels = [x for x in args.level.split(",") if x]

    from percausal_jax import cli

    info = machine_info({"model": "SmolLM2-135M-Instruct (embedded) + LoRA r16 (configs/demo.py)",
                         "size": "full" if args.full else "default", **{k: v for k, v in size.items()},
                         "max_new_tokens": args.max_new_tokens, "LR chosen by": f"validation {SELECT}"})
    sections = []
    for level in levels:
        out = Path(args.out).resolve() / ("full" if args.full else "default") / level
        data = out / "data"
        t0 = time.perf_counter()
        _call(cli, ["synth", "--out-dir", data, "--difficulty", level, "--users", size["users"],
                    "--val-users", size["val_users"], "--seed", 0])
        _call(cli, ["sweep", "--config", REPO / "configs" / "demo.py", "--out", out / "sweep",
                    "--train", data / "train.jsonl", "--val", data / "val.jsonl", "--test", data / "test.jsonl",
                    "--objectives", size["methods"], "--lrs", size["lrs"], "--seeds", size["seeds"],
                    "--select", SELECT, "--eval-limit", size["eval_limit"], "--max-new-tokens", args.max_new_tokens,
                    f"--config.train.steps={size['steps']}", f"--config.train.eval_every={size['eval_every']}",
                    "--config.train.eval_batches=1",
                    "--config.optimizer.warmup_steps=1"])
        wall = time.perf_counter() - t0
        sections.append(_section(level, out, data, wall, args.write))
    body = info_block(info) + "\n\n" + "\n\n".join(sections)
    print(body)
    if args.write:
        write_section(TITLE, body)
    return 0


def _call(cli, argv: list) -> None:
    rc = cli.main([str(a) for a in argv])
    if rc:
        raise SystemExit(f"`percausal {argv[0]}` failed with exit code {rc}")


def _personal_fraction(path: Path) -> str:
    """Share of the gold responses' characters inside personal_spans (the tokens' share is in the eval output)."""
    chars = spans = 0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        chars += len(r["output"])
        spans += sum(e - s for s, e in r.get("personal_spans") or [])
    return f"{spans / max(chars, 1):.3f}"


def _section(level: str, out: Path, data: Path, wall: float, write: bool) -> str:
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    spent = sum(t for c in sweep["cells"] for t in (c["train_s"], c["val_eval_s"], c["test_eval_s"]) if t)
    n = {split: sum(1 for _ in (data / f"{split}.jsonl").open()) for split in ("train", "val", "test")}
    md = (out / "sweep" / "sweep.md").read_text()
    table = md.split("## Test split, at the LR chosen on validation\n\n", 1)[1].split("\n## Plots", 1)[0]
    lines = [f"### Level `{level}`", "",
             f"- records: train {n['train']}, validation {n['val']}, test {n['test']} (users disjoint); personal "
             f"share of the test responses' characters {_personal_fraction(data / 'test.jsonl')}",
             f"- time: {len(sweep['cells'])} cells, {spent / 60:.1f} min of training and evaluation in all (sum over "
             f"cells; this invocation's wall time {wall / 60:.1f} min, cells finished before are reused)",
             "", "#### Test split, at the LR chosen on "
             "validation (mean ± std over seeds)", "", table.strip().replace("\n## ", "\n#### ")]
    if write:
        FIGURES.mkdir(exist_ok=True)
        shown = []
        for name in sweep["plots"]:
            target = FIGURES / f"learning_effect_{level}_{name}"
            shutil.copyfile(out / "sweep" / name, target)
            shown.append(f"![{level} {Path(name).stem}](figures/{target.name})")
        lines += ["", *shown]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
