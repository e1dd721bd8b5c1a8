"""Runs a sweep (``percausal sweep``): every cell (method × LR × seed) trained and, for a generation criterion,
evaluated on the validation split; each method's LR chosen there; the cells at that LR evaluated on the test split;
then OUT/sweep.json, sweep.md, sweep.html and the plots.

Everything is checked before anything trains (the inputs exist, validation is not the test file, every cell's config
loads, the records read, the criterion can be computed), so a mistake costs seconds, not a cell. A cell is cached in
its ``cell.json`` only once its training ran its whole budget (:func:`~percausal_jax.sweep.training.train_to_end`
raises :class:`~percausal_jax.sweep.training.Preempted` otherwise, which stops the sweep), so re-running the same
sweep resumes where it stopped and never reads a partly trained model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time

from percausal_jax.data.skips import SkipReport
from percausal_jax.sweep import training
from percausal_jax.sweep.spec import Criterion, Method


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to compare, on which data, and how to evaluate (``percausal sweep``'s flags, parsed)."""

    config: str  # the training config every cell starts from
    out: str  # local directory or gs:// URL
    train: str
    val: str  # chooses each method's LR; the runs' periodic eval (data.eval) too
    test: str  # reported, never used to choose
    methods: tuple[Method, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    criterion: Criterion
    eval_limit: int = 16
    max_new_tokens: int = 64
    strict: bool = False  # or data.strict of a cell's config
    overrides: tuple[str, ...] = ()  # --config.a.b=v for every cell

    def cell_overrides(self, method: Method, lr: float, seed: int) -> list[str]:
        """The cell's config overrides; the method's own knobs come last, so they win over a --config.* of the same
        key given to the whole sweep."""
        return [f"--config.optimizer.lr={lr}", f"--config.seed={seed}", f"--config.data.train={self.train}",
                f"--config.data.eval={self.val}", *self.overrides, *method.overrides()]

    @property
    def decoding(self) -> training.Decoding:
        return training.Decoding(self.eval_limit, self.max_new_tokens, strict=self.strict, progress=False)


def run_sweep(sweep: Sweep) -> str:
    """Checks everything, then runs the sweep under a lock on ``sweep.out``; returns sweep.md's text."""
    from percausal_jax import storage
    from percausal_jax.config import RunConfig, load_config
    from percausal_jax.errors import UserError
    from percausal_jax.lock import WorkdirLock

    for flag in ("train", "val", "test"):
        if not storage.path(getattr(sweep, flag)).exists():
            raise UserError(f"--{flag} {getattr(sweep, flag)}: no such file")
    if _same_file(sweep.val, sweep.test):
        raise UserError(f"--val {sweep.val} is the --test file: the LR must be chosen on records the test does not "
                        "score (e.g. `percausal synth --val-users N`)")
    configs = [RunConfig.from_config(load_config(sweep.config, sweep.cell_overrides(m, lr, seed)), where=sweep.config)
               for m in sweep.methods for lr in sweep.lrs for seed in sweep.seeds]  # all valid before any runs
    sweep = dataclasses.replace(sweep, strict=sweep.strict or any(rc.data.strict for rc in configs))
    inputs = _read_inputs(sweep)
    _check_criterion(sweep, inputs["val"][0])
    for flag, (_, report) in inputs.items():  # every input checked: what was kept and skipped, before any run
        report.announce(f"--{flag}={getattr(sweep, flag)}")
    out = storage.path(sweep.out)  # local or gs://
    with WorkdirLock(out, command="sweep"):  # one sweep per --out (each run also locks its own workdir)
        return _run(sweep, out)


def _read_inputs(sweep: Sweep) -> dict[str, tuple[list[dict], SkipReport]]:
    """--train (unless an ArrayRecord file: the runs read it), --val and --test: their records and what was kept
    and skipped (``sweep.strict``: a skipped record is an error, before anything trains)."""
    flags = ("train", "val", "test") if ".array_record" not in str(sweep.train) else ("val", "test")
    read = {flag: SkipReport.read(getattr(sweep, flag), strict=sweep.strict) for flag in flags}
    return {flag: ([record for _, record in numbered], report) for flag, (numbered, report) in read.items()}


def _check_criterion(sweep: Sweep, val_records: list[dict]) -> None:
    """The validation metric can be computed at all: personal spans, WordNet."""
    from percausal_jax.errors import UserError

    metric = sweep.criterion.metric
    if metric in ("span_recall", "nll_personal", "nll_generic"):
        if not any(r.get("personal_spans") for r in val_records):
            raise UserError(f"--select {metric} needs validation records with personal_spans; {sweep.val} has "
                            "none (choose rougeL or nll)")
    if metric == "meteor":
        from percausal_jax.evaluation.wordnet import available

        if not available():
            raise UserError("--select meteor needs WordNet (bash scripts/install_wordnet.sh); or --select rougeL")


def _same_file(a: str, b: str) -> bool:
    import os

    from percausal_jax import storage

    if storage.is_remote(a) or storage.is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _run(sweep: Sweep, out) -> str:
    from percausal_jax.atomic import write_text
    from percausal_jax.sweep import report
    from percausal_jax.sweep.results import select, summarize_methods

    t0 = time.perf_counter()
    crit, lrs, seeds = sweep.criterion, list(sweep.lrs), list(sweep.seeds)
    with persistent_compilation_cache():
        cells = [_train_cell(sweep, out, m, lr, seed) for m in sweep.methods for lr in lrs for seed in seeds]
        choices = select(cells, crit)  # on validation only: no test metric exists yet
        cells = [_test_cell(sweep, c) if c.lr == choices[c.method].lr else c for c in cells]
    summaries = summarize_methods(cells, choices)
    plots = _plots(out, cells, choices, summaries)
    ctx = report.Context(crit.describe(tuple(seeds)), crit.metric, tuple(seeds), tuple(lrs), str(sweep.config),
                         str(sweep.train), str(sweep.val), str(sweep.test))
    result = {"criterion": {"metric": crit.metric, "higher_is_better": crit.higher_is_better, "rule": ctx.rule},
              "config": ctx.config, "train": ctx.train, "val": ctx.val, "test": ctx.test, "lrs": lrs, "seeds": seeds,
              "methods": [m.label for m in sweep.methods], "best": {s.method: s.to_json() for s in summaries},
              "validation": {m: {f"{lr:g}": s.to_json() for lr, s in ch.by_lr.items()} for m, ch in choices.items()},
              "cells": [c.to_json() for c in cells], "plots": [p.path.name for p in plots],
              "sweep_s": time.perf_counter() - t0}
    write_text(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    md = report.markdown(ctx, summaries, choices, plots)
    write_text(out / "sweep.md", md)
    write_text(out / "sweep.html", report.page(ctx, summaries, choices, plots))
    return md


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


def _train_cell(sweep: Sweep, out, method: Method, lr: float, seed: int):
    """Trains the cell (its periodic eval on --val) and, for a generation criterion, generates on --val; or reads
    the cell back when a previous run of the same sweep finished it."""
    from percausal_jax.atomic import write_text
    from percausal_jax.errors import UserError
    from percausal_jax.evaluation.report import read_jsonl
    from percausal_jax.sweep.results import Cell, final_eval, numeric

    work = out / f"{method.slug}-lr{lr:g}-s{seed}"
    what = f"{method.label} lr={lr:g} seed={seed}"
    overrides = sweep.cell_overrides(method, lr, seed)
    spec = {"config": str(sweep.config), "overrides": overrides, "val_eval": sweep.criterion.needs_generation,
            "eval_limit": sweep.eval_limit, "max_new_tokens": sweep.max_new_tokens}
    record = work / "cell.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("spec") != spec:
            raise UserError(f"{work}: holds a cell of another sweep (other config, data or flags); use a fresh --out")
        print(f"== {what}: done before, not rerun", file=sys.stderr, flush=True)
        return Cell.from_json(saved["cell"])
    print(f"== {what}", file=sys.stderr, flush=True)
    # its whole budget, or Preempted: the sweep stops before anything reads or records a partly trained model
    train_s = training.train_to_end(sweep.config, work, overrides, what)
    val = final_eval(read_jsonl(work / "metrics.jsonl"))
    val_s = None
    if sweep.criterion.needs_generation:
        metrics, val_s = training.evaluate(work, sweep.val, work / "val_preds.jsonl", sweep.decoding, what)
        val.update(numeric(metrics))
    val.pop("n", None)
    val.pop("skipped", None)
    cell = Cell(method.label, lr, seed, str(work), val, None, train_s, val_s)
    write_text(record, json.dumps({"spec": spec, "cell": cell.to_json()}, indent=2) + "\n")
    return cell


def _test_cell(sweep: Sweep, cell):
    """Evaluates a cell at its method's chosen LR on --test (once: the result is kept in its cell.json)."""
    from percausal_jax import storage
    from percausal_jax.atomic import write_text
    from percausal_jax.sweep.results import numeric

    if cell.test is not None:
        return cell
    work = storage.path(cell.workdir)
    what = f"{cell.method} lr={cell.lr:g} seed={cell.seed}"
    print(f"== test: {what}", file=sys.stderr, flush=True)
    metrics, test_s = training.evaluate(work, sweep.test, work / "test_preds.jsonl", sweep.decoding, what)
    cell = dataclasses.replace(cell, test=numeric(metrics), test_eval_s=test_s)
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
    return plots.comparison(out, runs, {s.method: s.test for s in summaries}, TEST_METRICS,
                            "validation users, each method at its chosen LR; band: ± std over seeds",
                            "test split, each method at its chosen LR; error bars: ± std over seeds")
