"""``percausal sweep``: methods × learning rates × seeds on the same data and budget. Each method's LR is chosen on
the validation split by a criterion fixed up front (``--select``); the test split is evaluated only at that LR, and
the report gives mean ± std over seeds there (personal / generic-token NLL, ROUGE-1/L, METEOR, span recall, wall
time), with plots. Writes OUT/sweep.json (every cell, per seed), OUT/sweep.md, OUT/sweep.html and the PNGs.

A method is an objective, optionally with knobs of its config block: ``perce[clip_max=2]`` trains with
``--config.objective.perce.clip_max=2``. A cell already finished (its ``cell.json``, written after its training ran
its whole budget and the validation evaluation, and its test evaluation) is not run again when the same command is
repeated. A cell whose training is preempted (SIGTERM: it saves a checkpoint) stops the sweep, exit 75 and one line;
re-running the same command resumes that cell from its checkpoint.

``--train``, ``--val`` and ``--test`` are read once up front and their kept/skipped tables printed (each run and
evaluation prints its own again); with ``--strict`` (or ``--config.data.strict=true``) a record with an empty required
field is an error (exit 2) before anything trains, and the evaluations are strict too."""

from __future__ import annotations

from percausal_jax.data.skips import SkipReport

PAPER_GRID = (2e-6, 5e-6, 8e-6, 2e-5, 5e-5)  # PerCE paper §4


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="methods × learning rates × seeds: LR chosen on validation, test mean ± "
                                            "std over seeds, plots")
    p.add_argument("--config", required=True, help="training config (e.g. configs/demo.py)")
    p.add_argument("--out", required=True, help="directory for the runs, sweep.json / sweep.md / sweep.html, PNGs")
    p.add_argument("--train", required=True, help="training records")
    p.add_argument("--val", required=True, help="validation records (users in neither --train nor --test): "
                                                "choose each method's LR; the runs' periodic eval uses them too")
    p.add_argument("--test", required=True, help="test records: reported, never used to choose")
    p.add_argument("--objectives", default=None,
                   help="methods, comma-separated: NAME or NAME[knob=value,...], e.g. "
                        "ce,perce,perce[clip_max=2],nextquill (default: every registered objective)")
    p.add_argument("--lrs", default=",".join(str(x) for x in PAPER_GRID),
                   help="comma-separated learning rates (default: the PerCE paper's grid, for full fine-tuning)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; each sets the config's seed (default 0,1,2)")
    p.add_argument("--select", default="rougeL",
                   help="validation metric that picks each method's LR, by its mean over seeds: rougeL (default), "
                        "rouge1, meteor, span_recall (higher is better; from generating on --val) or nll, "
                        "nll_personal, nll_generic (lower is better; the run's last periodic eval on --val)")
    p.add_argument("--eval-limit", type=int, default=16, help="records generated for per evaluation (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--strict", action="store_true", help=SkipReport.STRICT_HELP)
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    """Flags → :class:`~percausal_jax.sweep.runner.Sweep` (methods, grids and criterion parsed, flags range-checked,
    before anything is read) → :func:`~percausal_jax.sweep.runner.run_sweep`; prints sweep.md."""
    from percausal_jax.commands._args import AT_LEAST_1, NONNEG, check
    from percausal_jax.sweep.runner import Sweep, run_sweep
    from percausal_jax.sweep.spec import check_overrides, criterion, parse_methods, parse_numbers

    methods = parse_methods(args.objectives)  # unknown objectives / knobs are errors before anything trains
    lrs = parse_numbers("--lrs", args.lrs, float)
    seeds = parse_numbers("--seeds", args.seeds, int)
    crit = criterion(args.select)
    check(args, {"eval_limit": NONNEG, "max_new_tokens": AT_LEAST_1})
    check_overrides(args.overrides)
    print(run_sweep(Sweep(args.config, args.out, args.train, args.val, args.test, tuple(methods), tuple(lrs),
                          tuple(seeds), crit, args.eval_limit, args.max_new_tokens, args.strict,
                          tuple(args.overrides))))
    return 0
