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

import contextlib
import json
import sys
import time

from percausal_jax.data.records import SkipReport

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
    from percausal_jax import storage
    from percausal_jax.commands._args import AT_LEAST_1, NONNEG, check
    from percausal_jax.config import RunConfig, load_config
    from percausal_jax.errors import UserError
    from percausal_jax.lock import WorkdirLock
    from percausal_jax.sweep.spec import check_overrides, criterion, parse_methods, parse_numbers

    methods = parse_methods(args.objectives)  # unknown objectives / knobs are errors before anything trains
    lrs = parse_numbers("--lrs", args.lrs, float)
    seeds = parse_numbers("--seeds", args.seeds, int)
    crit = criterion(args.select)
    check(args, {"eval_limit": NONNEG, "max_new_tokens": AT_LEAST_1})
    check_overrides(args.overrides)
    for flag in ("train", "val", "test"):
        if not storage.path(getattr(args, flag)).exists():
            raise UserError(f"--{flag} {getattr(args, flag)}: no such file")
    if _same_file(args.val, args.test):
        raise UserError(f"--val {args.val} is the --test file: the LR must be chosen on records the test does not "
                        "score (e.g. `percausal synth --val-users N`)")
    configs = [RunConfig.from_config(load_config(args.config, _overrides(args, m, lr, seed)), where=args.config)
               for m in methods for lr in lrs for seed in seeds]  # every cell's config is valid before anything runs
    args.strict = args.strict or any(rc.data.strict for rc in configs)
    inputs = _read_inputs(args)
    if crit.metric in ("span_recall", "nll_personal", "nll_generic"):
        if not any(r.get("personal_spans") for r in inputs["val"][0]):
            raise UserError(f"--select {crit.metric} needs validation records with personal_spans; {args.val} has "
                            "none (choose rougeL or nll)")
    if crit.metric == "meteor":
        from percausal_jax.evaluation.wordnet import available

        if not available():
            raise UserError("--select meteor needs WordNet (bash scripts/install_wordnet.sh); or --select rougeL")
    for flag, (_, report) in inputs.items():  # every input checked: what was kept and skipped, before any run
        report.announce(f"--{flag}={getattr(args, flag)}")
    out = storage.path(args.out)  # local or gs://
    with WorkdirLock(out, command="sweep"):  # one sweep per --out (each run also locks its own workdir)
        return _sweep(args, out, methods, lrs, seeds, crit)


def _read_inputs(args) -> dict[str, tuple[list[dict], SkipReport]]:
    """--train (unless an ArrayRecord file: the runs read it), --val and --test: their records and what was kept
    and skipped (``args.strict``: a skipped record is an error, before anything trains)."""
    flags = ("train", "val", "test") if ".array_record" not in str(args.train) else ("val", "test")
    read = {flag: SkipReport.read(getattr(args, flag), strict=args.strict) for flag in flags}
    return {flag: ([record for _, record in numbered], report) for flag, (numbered, report) in read.items()}


def _same_file(a: str, b: str) -> bool:
    import os

    from percausal_jax import storage

    if storage.is_remote(a) or storage.is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _overrides(args, method, lr: float, seed: int) -> list[str]:
    """The cell's config overrides; the method's own knobs come last, so they win over a --config.* of the same
    key given to the whole sweep."""
    return [f"--config.optimizer.lr={lr}", f"--config.seed={seed}", f"--config.data.train={args.train}",
            f"--config.data.eval={args.val}", *args.overrides, *method.overrides()]


def _sweep(args, out, methods, lrs, seeds, crit) -> int:
    from percausal_jax.atomic import write_text
    from percausal_jax.sweep import report
    from percausal_jax.sweep.results import select, summarize_methods

    t0 = time.perf_counter()
    with persistent_compilation_cache():
        cells = [_train_cell(args, out, m, lr, seed, crit) for m in methods for lr in lrs for seed in seeds]
        choices = select(cells, crit)  # on validation only: no test metric exists yet
        cells = [_test_cell(args, c) if c.lr == choices[c.method].lr else c for c in cells]
    summaries = summarize_methods(cells, choices)
    plots = _plots(out, cells, choices, summaries)
    ctx = report.Context(crit.describe(tuple(seeds)), crit.metric, tuple(seeds), tuple(lrs), str(args.config),
                         str(args.train), str(args.val), str(args.test))
    result = {"criterion": {"metric": crit.metric, "higher_is_better": crit.higher_is_better, "rule": ctx.rule},
              "config": ctx.config, "train": ctx.train, "val": ctx.val, "test": ctx.test, "lrs": lrs, "seeds": seeds,
              "methods": [m.label for m in methods], "best": {s.method: s.to_json() for s in summaries},
              "validation": {m: {f"{lr:g}": s.to_json() for lr, s in ch.by_lr.items()} for m, ch in choices.items()},
              "cells": [c.to_json() for c in cells], "plots": [p.path.name for p in plots],
              "sweep_s": time.perf_counter() - t0}
    write_text(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    md = report.markdown(ctx, summaries, choices, plots)
    write_text(out / "sweep.md", md)
    write_text(out / "sweep.html", report.page(ctx, summaries, choices, plots))
    print(md)
    return 0


@contextlib.contextmanager
def persistent_compilation_cache(min_compile_s: float = 1.0):
    """Cells share their compiled programs: every cell of one method and LR the train step (the LR is a constant of
    the optimizer), every cell the eval and decode programs. Inside the block XLA's executables that took at least
    ``min_compile_s`` to compile are kept on local disk (``$PERCAUSAL_CACHE/jax-compilation``, keyed by the program
    and the compiler), so a later cell, or a later sweep, loads them instead of compiling. A cache the caller
    configured (``JAX_COMPILATION_CACHE_DIR``) is used as it is; otherwise the settings are restored afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from percausal_jax import storage

    if jax.config.jax_compilation_cache_dir is not None:
        yield
        return
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(storage.cache_root() / "jax-compilation"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    compilation_cache.reset_cache()  # JAX decides once per process whether the cache is on: decide again
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
        compilation_cache.reset_cache()


def _call(argv: list, what: str) -> float:
    from percausal_jax import cli
    from percausal_jax.errors import UserError

    t = time.perf_counter()
    rc = cli.main([str(a) for a in argv])
    if rc:
        raise UserError(f"{what}: `percausal {argv[0]}` failed (exit {rc})")
    return time.perf_counter() - t


def _eval_argv(args, work, data: str, name: str) -> list:
    from percausal_jax.evaluation.wordnet import available

    return ["eval", "--workdir", work, "--data", data, "--out", work / f"{name}.jsonl", "--no-progress",
            "--limit", args.eval_limit, "--max-new-tokens", args.max_new_tokens,
            *([] if available() else ["--no-meteor"]), *(["--strict"] if args.strict else [])]


def _train(args, work, overrides: list[str], what: str) -> float:
    """Trains the cell in this process; a preempted training stops the sweep (:class:`~percausal_jax.sweep.training.
    Preempted`) before anything reads or records its partly trained model."""
    from percausal_jax.sweep.training import train_to_end

    return train_to_end(args.config, work, overrides, what)


def _train_cell(args, out, method, lr: float, seed: int, crit):
    """Trains the cell (its periodic eval on --val) and, for a generation criterion, generates on --val; or reads
    the cell back when a previous run of the same sweep finished it."""
    from percausal_jax.atomic import write_text
    from percausal_jax.errors import UserError
    from percausal_jax.evaluation.report import read_jsonl
    from percausal_jax.sweep.results import Cell, final_eval, numeric

    work = out / f"{method.slug}-lr{lr:g}-s{seed}"
    what = f"{method.label} lr={lr:g} seed={seed}"
    spec = {"config": str(args.config), "overrides": _overrides(args, method, lr, seed),
            "val_eval": crit.needs_generation, "eval_limit": args.eval_limit, "max_new_tokens": args.max_new_tokens}
    record = work / "cell.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("spec") != spec:
            raise UserError(f"{work}: holds a cell of another sweep (other config, data or flags); use a fresh --out")
        print(f"== {what}: done before, not rerun", file=sys.stderr, flush=True)
        return Cell.from_json(saved["cell"])
    print(f"== {what}", file=sys.stderr, flush=True)
    train_s = _train(args, work, _overrides(args, method, lr, seed), what)  # its whole budget, or Preempted
    val = final_eval(read_jsonl(work / "metrics.jsonl"))
    val_s = None
    if crit.needs_generation:
        val_s = _call(_eval_argv(args, work, args.val, "val_preds"), what)
        val.update(numeric(json.loads((work / "val_preds.metrics.json").read_text())))
    val.pop("n", None)
    val.pop("skipped", None)
    cell = Cell(method.label, lr, seed, str(work), val, None, train_s, val_s)
    write_text(record, json.dumps({"spec": spec, "cell": cell.to_json()}, indent=2) + "\n")
    return cell


def _test_cell(args, cell):
    """Evaluates a cell at its method's chosen LR on --test (once: the result is kept in its cell.json)."""
    import dataclasses

    from percausal_jax import storage
    from percausal_jax.atomic import write_text
    from percausal_jax.sweep.results import numeric

    if cell.test is not None:
        return cell
    work = storage.path(cell.workdir)
    print(f"== test: {cell.method} lr={cell.lr:g} seed={cell.seed}", file=sys.stderr, flush=True)
    test_s = _call(_eval_argv(args, work, args.test, "test_preds"), f"{cell.method} lr={cell.lr:g} seed={cell.seed}")
    test = numeric(json.loads((work / "test_preds.metrics.json").read_text()))
    cell = dataclasses.replace(cell, test=test, test_eval_s=test_s)
    record = work / "cell.json"
    write_text(record, json.dumps({**json.loads(record.read_text()), "cell": cell.to_json()}, indent=2) + "\n")
    return cell


def _plots(out, cells, choices, summaries) -> list:
    from percausal_jax import storage
    from percausal_jax.evaluation import plots
    from percausal_jax.evaluation.report import read_jsonl
    from percausal_jax.sweep.results import TEST_METRICS

    runs = {m: [read_jsonl(storage.path(c.workdir) / "metrics.jsonl") for c in cells
                if c.method == m and c.lr == ch.lr] for m, ch in choices.items()}
    drawn = [plots.nll_curves(runs, out / "nll_curves.png",
                              "validation users, each method at its chosen LR; band: ± std over seeds"),
             plots.metric_bars({s.method: s.test for s in summaries}, TEST_METRICS, out / "test_metrics.png",
                               "test split, each method at its chosen LR; error bars: ± std over seeds"),
             plots.tradeoff({s.method: s.test for s in summaries}, out / "tradeoff.png")]
    return [p for p in drawn if p is not None]
