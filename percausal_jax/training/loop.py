"""The training loop behind ``percausal train``: the run (:func:`setup.build`) → Grain iterator → jitted step →
metrics (JSONL, TensorBoard, progress bar) → periodic eval → Orbax checkpoints. Re-running the same command resumes.

The loop body reads top-down; what surrounds it is small context managers on one :class:`contextlib.ExitStack`,
so there is one close path whatever ends the run: :class:`Log` (metrics and progress; after a storage failure
nothing more is uploaded), :class:`Saver` (checkpoints; waits for the last save unless the storage failed) and
:class:`~percausal_jax.training.distributed.Preemption` (SIGTERM); around them the
:class:`~percausal_jax.training.processes.SharedLock` (left for a takeover after a storage failure).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import jax
import numpy as np

from percausal_jax import storage
from percausal_jax.config import RunConfig
from percausal_jax.data.pairing import empty_batch, shape_of
from percausal_jax.data.rows import RowLayout, block_length, to_global
from percausal_jax.errors import StorageError, UserError
from percausal_jax.evaluation import token_nll
from percausal_jax.objectives.losses import NORMALIZER_EPS
from percausal_jax.hf.checkpoint import resolve_model_dir, weights_fingerprint
from percausal_jax.hf.gguf import resolve_model_arg
from percausal_jax.training import checkpoints, processes, setup
from percausal_jax.training.distributed import Preemption, common_shape
from percausal_jax.training.metrics import MetricsWriter, host_rss_mib, per_token_metrics
from percausal_jax.training.processes import SharedLock


def train(rc: RunConfig, workdir: str | Path, progress: bool = True, base_moved: bool = False) -> dict:
    """Runs (or resumes) a training run, holding the workdir's lock; returns the last step's metrics (``{}`` when it
    had already finished; ``"preempted": True`` when SIGTERM stopped it before ``train.steps``).
    ``base_moved``: a resumed run may name its base model differently (another ``model.path``) as long as it holds
    the same weights (:func:`checkpoints.check_base`); other weights are refused either way."""
    if not rc.data.train:
        raise UserError("data.train is not set (--config.data.train=FILE)")
    with SharedLock(workdir) as lock:
        return _train(rc, storage.path(workdir), progress, lock, base_moved)


def _train(rc: RunConfig, workdir, progress: bool, lock: SharedLock, base_moved: bool) -> dict:
    t = rc.train
    run, records, eval_records, meta = _start(rc, workdir, base_moved)
    rows, iterator = run.row_layout(), run.data_iterator(records)
    mngr = checkpoints.manager(workdir, keep=rc.checkpoint.keep)
    state, start = _resume(mngr, run.init_state(), iterator, meta, base_moved)
    step_fn, eval_step = run.train_step(), run.eval_step() if eval_records else None
    rec: dict = {}
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(Log(workdir, start, t.steps, progress, _applied(state)))
        saver = stack.enter_context(Saver(mngr, workdir, meta, rc.checkpoint.every_steps, lock, log))
        preemption = stack.enter_context(Preemption())
        while _applied(state) < t.steps:  # train.steps counts applied updates: a non-finite step is made up for
            batch = common_shape(next(iterator))
            state, rec = _step(run, step_fn, state, batch, rows)
            n, done = rec["step"], _applied(state) == t.steps
            if eval_step is not None and ((t.eval_every and n % t.eval_every == 0) or done):
                rec.update(evaluate(run, eval_records, state.params, run.reference_params, eval_step))
            if n % t.log_every == 0 or done:
                processes.check_same_rows(n, batch, rows)
                processes.check_same_loss(n, rec["loss"])
                log.write(rec)
            stop = preemption.should_stop(n)
            saver.maybe_save(n, state, iterator, final=done or stop)
            log.advance(rec)
            if stop and not done:
                print(f"preempted: checkpoint saved at step {n}; re-run the same command to resume", file=sys.stderr)
                rec = {**rec, "preempted": True}
                break
        report_drops(iterator, rows, rc.data.max_response_len)
    return rec


def _start(rc: RunConfig, workdir, base_moved: bool):
    """The checks that need no weights, then the run: ``(run, train records, eval records or None, checkpoint
    meta)``. Every process checks that the others hold the same config, base weights, data and mesh."""
    d = rc.data
    processes.check_agree({"the config": rc.source})  # before any process acts on its own copy
    model_config = setup.preflight(rc)
    base = base_identity(rc.model.path)
    processes.check_agree({"the base model's weights": base["model_fingerprint"]})  # every host's copy the same
    checkpoints.check_resumable(workdir, setup.layout(rc, model_config), base, base_moved)  # before data, weights
    records = setup.open_records(d, d.train, "data.train")  # bad data fails before the model loads
    eval_records = setup.open_records(d, d.eval, "data.eval") if d.eval else None
    run = setup.build(rc, contriever=setup.retriever(d, records, eval_records))
    processes.check_agree({"data.train": processes.data_fingerprint(records),
                           "data.eval": processes.data_fingerprint(eval_records or []),
                           "the mesh": processes.mesh_fingerprint(run.mesh)})
    if jax.process_count() > 1 and jax.process_index() == 0:
        print(f"rows: {run.row_layout().describe()}", file=sys.stderr)
    meta = {"config": rc.source, "layout": run.layout(), "model_config": run.model_config.to_hf(), **base}
    return run, records, eval_records, meta


def _resume(mngr, state, iterator, meta: dict, base_moved: bool):
    """``(state, step restored or None)``: the newest readable checkpoint, else the fresh state."""
    restored, start = checkpoints.restore(mngr, state, iterator, meta, base_moved=base_moved)
    if restored is None:
        return state, start
    print(f"resumed from step {start}", file=sys.stderr)
    return restored, start


def _applied(state) -> int:
    """Updates applied so far: steps taken minus those skipped as non-finite."""
    return int(state.step) - int(state.nan_skips)


def _step(run: setup.Run, step_fn, state, batch, rows: RowLayout):
    """One optimizer step on this process's rows of a global batch → ``(state, metrics record)``."""
    t = run.config.train
    step = int(state.step)
    if step - _applied(state) > t.steps:
        raise FloatingPointError(f"step {step}: more non-finite steps ({step - _applied(state)}) than train.steps")
    t0, cpu0 = time.perf_counter(), time.process_time()
    with jax.set_mesh(run.mesh):
        state, m = step_fn(state, run.frozen, run.reference_params, to_global(batch, run.mesh, rows))
    m = jax.device_get(m)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    step = int(state.step)
    if not bool(m.pop("finite")) and t.nan_policy == "fail":
        raise FloatingPointError(f"step {step}: loss or gradient is not finite")
    rec = {"step": step, **per_token_metrics(m), "step_time": dt, "step_cpu_time": cpu,
           "tokens_per_s": float(m["tokens"]) / dt, "nan_skips": int(state.nan_skips), "host_rss_mib": host_rss_mib()}
    if t.peak_tflops > 0:
        flops = run.step_flops(t.global_batch_size, *shape_of(batch))
        rec["mfu"] = flops / dt / (jax.device_count() * t.peak_tflops * 1e12)
    return state, rec


class Log:
    """Metrics lines and the progress bar. Closed after a storage failure, nothing more is uploaded to a storage
    known to be failing."""

    def __init__(self, workdir, resume_step: int | None, total: int, progress: bool, applied: int):
        self.workdir = workdir
        self.writer = MetricsWriter(workdir, resume_step=resume_step)
        self.bar = _progress(applied, total, progress)

    def __enter__(self) -> Log:
        return self

    def write(self, rec: dict) -> None:
        with checkpoints.storage_errors(f"writing the metrics of step {rec['step']}", self.workdir):
            self.writer.write(rec)

    def flush(self) -> None:
        self.writer.flush()

    def advance(self, rec: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.writer.close(upload=not isinstance(exc, StorageError))
        self.bar.close()


class Saver:
    """Checkpoints every ``every`` steps and at the end (``final``), after checking the workdir is still this
    run's; an async save's failure surfaces at the next save or at the final wait, as a storage error. On exit,
    waits for the last save — unless the storage already failed."""

    def __init__(self, mngr, workdir, meta: dict, every: int, lock: SharedLock, log: Log):
        self.mngr, self.workdir, self.meta, self.every, self.lock, self.log = mngr, workdir, meta, every, lock, log

    def __enter__(self) -> Saver:
        return self

    def maybe_save(self, step: int, state, iterator, final: bool) -> None:
        if step % self.every and not final:
            return
        self.lock.check()  # a run whose workdir was taken over (its lease expired) writes no more
        with checkpoints.storage_errors(f"saving checkpoints (at step {step})", self.workdir):
            checkpoints.save(self.mngr, step, state, iterator, self.meta, force=final)
            self.log.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not isinstance(exc, StorageError):
            with checkpoints.storage_errors("finishing the last checkpoint", self.workdir):
                self.mngr.wait_until_finished()


def base_identity(model_path: str) -> dict:
    """The base model ``model_path`` names, as a checkpoint records it (:data:`checkpoints.BASE_KEYS`): the name
    as given, its local directory, hub commit (or None) and content fingerprint."""
    source = resolve_model_dir(resolve_model_arg(model_path))
    return {"model_path": model_path, "model_dir": str(Path(source.local).resolve()),
            "model_revision": source.revision, "model_fingerprint": weights_fingerprint(source.local)}


def device_batch(batch, run: setup.Run, rows: RowLayout):
    """This process's rows (its row blocks) → the global batch, with the same shape on every process."""
    return to_global(common_shape(batch), run.mesh, rows)


def evaluate(run: setup.Run, records, params, ref_params, eval_step) -> dict:
    """Objective loss on ``records`` (``data.eval``; one pass, at most ``train.eval_batches`` batches): Σ loss / Σ normalizer,
    and ``eval_nll`` (Σ gold-token NLL / Σ tokens). When eval records carry ``personal_spans``, also the NLL of
    their personal and generic tokens (:mod:`~percausal_jax.evaluation.token_nll`): ``eval_nll_personal``,
    ``eval_nll_generic`` (Σ nll / Σ tokens of the class over the pass) and ``eval_tokens_personal``,
    ``eval_tokens_generic``. Every process runs the same number of batches: as many as the longest row block
    (block 0) needs; a block that ran out feeds all-padding rows."""
    t = run.config.train
    rows = run.row_layout()
    n_batches = min(t.eval_batches, -(-block_length(len(records), rows.block_rows, 0, rows.num_blocks)
                                      // rows.block_rows))
    it = run.data_iterator(records, num_epochs=1, shuffle=False)
    total_ls = total_n = None
    tokens = nll = 0.0
    by_class = None
    for _ in range(n_batches):
        batch = next(it, None) or empty_batch(rows.local_rows)
        with jax.set_mesh(run.mesh):
            res = eval_step(params, run.frozen, ref_params, device_batch(batch, run, rows))
        ls, n = np.asarray(res.loss_sum, np.float64), np.asarray(res.normalizer, np.float64)
        total_ls = ls if total_ls is None else total_ls + ls
        total_n = n if total_n is None else total_n + n
        tokens += float(res.metrics["tokens"])
        nll += float(res.metrics["nll_sum"])
        by_class = token_nll.add_sums(by_class, res.metrics)
    if total_ls is None or tokens == 0:
        raise UserError(f"{run.config.data.eval}: no evaluation examples")
    # eval_nll (mean gold-token NLL) compares across objectives; eval_loss is each objective's own loss
    return {"eval_loss": float(np.sum(total_ls / np.maximum(total_n, NORMALIZER_EPS))), "eval_nll": nll / tokens,
            "eval_tokens": tokens, **token_nll.class_means(by_class, prefix="eval_")}


def report_drops(iterator, rows: RowLayout, max_response_len: int) -> None:
    """Process 0 prints the run's drops and truncations so far, over every row block once (each block counted
    by its first reader, summed over processes)."""
    from percausal_jax.data.featurize import DROP_REASONS

    stats = iterator.stats(rows.owned)
    counts = processes.sum_counts([stats.dropped.get(k, 0) for k in DROP_REASONS] + [stats.truncated_response])
    dropped, truncated = dict(zip(DROP_REASONS, counts[:-1])), counts[-1]
    if jax.process_index() != 0:
        return
    if sum(dropped.values()):
        print("data.train: dropped while featurizing: " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())
                                                                     if v)
              + " (raise data.max_prompt_len / data.max_response_len, or set data.truncate_response)",
              file=sys.stderr)
    if truncated:
        print(f"data.train: truncated while featurizing: {truncated} responses over "
              f"data.max_response_len={max_response_len} tokens, kept without their end token "
              "(raise data.max_response_len, or data.truncate_response=false to drop them)", file=sys.stderr)


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                disable=not enabled or jax.process_index() != 0)
