"""The training loop behind ``percausal train``: the run (:func:`setup.build`) → Grain iterator → jitted step →
metrics (JSONL, TensorBoard, progress bar) → periodic eval → Orbax checkpoints. Re-running the same command resumes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from percausal_jax import atomic, storage
from percausal_jax.lock import WorkdirLock
from percausal_jax.config import RunConfig
from percausal_jax.data.pairing import empty_batch, shape_of
from percausal_jax.data.pipeline import to_global
from percausal_jax.data.rows import RowLayout, block_length
from percausal_jax.errors import StorageError, UserError
from percausal_jax.evaluation import token_nll
from percausal_jax.hf.checkpoint import resolve_model_dir, weights_fingerprint
from percausal_jax.hf.gguf import resolve_model_arg
from percausal_jax.training import checkpoints, processes, setup
from percausal_jax.training.distributed import Preemption, common_shape


def host_rss_mib() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def per_token_metrics(m: dict) -> dict:
    """Sums → means over response tokens (``*_sum`` → ``*_mean``, ``*_count`` → ``frac_*``)."""
    n = max(float(m.get("tokens", 0.0)), 1.0)
    out = {}
    for k, v in m.items():
        v = float(v)
        if k.endswith("_sum"):
            out[k[:-4] + "_mean"] = v / n
        elif k.endswith("_count"):
            out["frac_" + k[:-6]] = v / n
        else:
            out[k] = v
    return out


class MetricsWriter:
    """``WORKDIR/metrics.jsonl`` (one line per logged step) and TensorBoard events under ``WORKDIR/tensorboard``,
    written by process 0 only. Both are appended to local files (:class:`atomic.Mirror`: the workdir itself, or
    for a ``gs://`` workdir a staging copy uploaded whole at :meth:`flush`: at every checkpoint, at the end, and
    at most every 30 s while logging). ``resume_step``: lines of later steps (logged after the checkpoint a resumed
    run restarts from) are dropped, so every step appears once."""

    def __init__(self, workdir, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        self.mirror = atomic.Mirror(workdir, pull=("metrics.jsonl",))
        self.path = self.mirror.local / "metrics.jsonl"
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            keep = [line for line in lines
                    if line.strip() and (resume_step is not None and json.loads(line).get("step", 0) <= resume_step)]
            if keep != lines:  # rewritten whole (a temporary file renamed over it): never seen half-rewritten
                atomic.write_text(self.path, "".join(keep))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.mirror.local / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        if not self.enabled:
            return
        if self.tb is not None and (force or self.mirror.remote):
            self.tb.flush()
        self.mirror.sync(force=force)

    def close(self, upload: bool = True) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        self.mirror.close(upload)


def device_batch(batch, run: setup.Run, rows: RowLayout):
    """This process's rows (its row blocks) → the global batch, with the same shape on every process."""
    return to_global(common_shape(batch), run.mesh, rows)


def evaluate(run: setup.Run, params, ref_params, eval_step) -> dict:
    """Objective loss on ``data.eval`` (one pass, at most ``train.eval_batches`` batches): Σ loss / Σ normalizer,
    and ``eval_nll`` (Σ gold-token NLL / Σ tokens). When eval records carry ``personal_spans``, also the NLL of
    their personal and generic tokens (:mod:`~percausal_jax.evaluation.token_nll`): ``eval_nll_personal``,
    ``eval_nll_generic`` (Σ nll / Σ tokens of the class over the pass) and ``eval_tokens_personal``,
    ``eval_tokens_generic``. Every process runs the same number of batches: as many as the longest row block
    (block 0) needs; a block that ran out feeds all-padding rows."""
    t = run.config.train
    rows = run.row_layout()
    records = run.eval_records
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
    return {"eval_loss": float(np.sum(total_ls / np.maximum(total_n, 1e-12))), "eval_nll": nll / tokens,
            "eval_tokens": tokens, **token_nll.class_means(by_class, prefix="eval_")}


class SharedLock:
    """``WORKDIR/.lock`` (:mod:`percausal_jax.lock`), held by process 0 for the whole job; every outcome (taken,
    in use, lost to another run) is shared, so that every process stops together rather than wait in a collective
    for one that stopped."""

    def __init__(self, workdir, **lock_options):
        self.workdir = workdir
        self.lock = WorkdirLock(workdir, **lock_options) if jax.process_index() == 0 else None

    def __enter__(self) -> SharedLock:
        error = None
        if self.lock is not None:
            try:
                self.lock.acquire()
            except UserError as e:
                error = e
        if not processes.all_ok(error is None):
            if self.lock is not None and error is None:
                self.lock.release()
            raise error or UserError(f"{self.workdir}: process 0 could not take the workdir lock (its error says "
                                     "why)")
        return self

    def check(self) -> None:
        """Every process raises when the lock was taken over by another run (its lease expired)."""
        lost = self.lock is not None and bool(self.lock.lost)
        if not processes.all_ok(not lost):
            if self.lock is not None:
                self.lock.check()
            raise UserError(f"{self.workdir}: the workdir lock was taken over by another run (process 0 says by "
                            "whom); stopping so that only one run writes it")

    def abandon(self) -> None:
        if self.lock is not None:
            self.lock.abandon()

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def train(rc: RunConfig, workdir: str | Path, progress: bool = True, base_moved: bool = False) -> dict:
    """Runs (or resumes) a training run, holding the workdir's lock; returns the last step's metrics (``{}`` when it
    had already finished; ``"preempted": True`` when SIGTERM stopped it before ``train.steps``).
    ``base_moved``: a resumed run may name its base model differently (another ``model.path``) as long as it holds
    the same weights (:func:`checkpoints.check_base`); other weights are refused either way."""
    if not rc.data.train:
        raise UserError("data.train is not set (--config.data.train=FILE)")
    with SharedLock(workdir) as lock:
        return _train(rc, storage.path(workdir), progress, lock, base_moved)


def base_identity(model_path: str) -> dict:
    """The base model ``model_path`` names, as a checkpoint records it (:data:`checkpoints.BASE_KEYS`): the name
    as given, its local directory, hub commit (or None) and content fingerprint."""
    source = resolve_model_dir(resolve_model_arg(model_path))
    return {"model_path": model_path, "model_dir": str(Path(source.local).resolve()),
            "model_revision": source.revision, "model_fingerprint": weights_fingerprint(source.local)}


def _train(rc: RunConfig, workdir, progress: bool, lock: SharedLock, base_moved: bool = False) -> dict:
    d, t = rc.data, rc.train
    processes.check_agree({"the config": rc.source})  # before any process acts on its own copy
    model_config = setup.preflight(rc)
    base = base_identity(rc.model.path)
    processes.check_agree({"the base model's weights": base["model_fingerprint"]})  # every host's copy the same
    checkpoints.check_resumable(workdir, setup.layout(rc, model_config), base, base_moved)  # before data, weights
    train_records = setup.open_records(d, d.train, "data.train")  # bad data fails before the model loads
    eval_records = setup.open_records(d, d.eval, "data.eval") if d.eval else None
    contriever = setup.retriever(d, train_records, eval_records)
    run = setup.build(rc)
    run.eval_records, run.contriever = eval_records, contriever
    rows = run.row_layout()
    processes.check_agree({"data.train": processes.data_fingerprint(train_records),
                           "data.eval": processes.data_fingerprint(eval_records or []),
                           "the mesh": processes.mesh_fingerprint(run.mesh)})
    if jax.process_count() > 1 and jax.process_index() == 0:
        print(f"rows: {rows.describe()}", file=sys.stderr)
    state = run.init_state()
    ref_params = run.reference_params()
    iterator = run.data_iterator(train_records)
    meta = {"config": rc.source, "layout": run.layout(), "model_config": run.model_config.to_hf(), **base}
    mngr = checkpoints.manager(workdir, keep=rc.checkpoint.keep)
    restored, start = checkpoints.restore(mngr, state, iterator, meta, base_moved=base_moved)
    if restored is not None:
        state = restored
        print(f"resumed from step {start}", file=sys.stderr)
    step_fn = run.train_step()
    eval_step = run.eval_step() if d.eval else None
    writer = MetricsWriter(workdir, resume_step=start)
    n_dev = jax.device_count()
    applied = int(state.step) - int(state.nan_skips)
    bar = _progress(applied, t.steps, progress)
    preemption = Preemption()
    last: dict = {}
    storage_failed = False
    try:
        # train.steps counts applied updates, as the schedule does: a skipped (non-finite) step is made up for
        while applied < t.steps:
            step = int(state.step)
            if step - applied > t.steps:
                raise FloatingPointError(f"step {step}: more non-finite steps ({step - applied}) than train.steps")
            batch = common_shape(next(iterator))
            t0, cpu0 = time.perf_counter(), time.process_time()
            with jax.set_mesh(run.mesh):
                state, m = step_fn(state, run.frozen, ref_params, to_global(batch, run.mesh, rows))
            m = jax.device_get(m)
            dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            if not bool(m.pop("finite")) and t.nan_policy == "fail":
                raise FloatingPointError(f"step {step + 1}: loss or gradient is not finite")
            applied = step + 1 - int(state.nan_skips)
            rec = {"step": step + 1, **per_token_metrics(m), "step_time": dt, "step_cpu_time": cpu,
                   "tokens_per_s": float(m["tokens"]) / dt, "nan_skips": int(state.nan_skips),
                   "host_rss_mib": host_rss_mib()}
            if t.peak_tflops > 0:
                global_rows = t.global_batch_size
                rec["mfu"] = run.step_flops(global_rows, *shape_of(batch)) / dt / (n_dev * t.peak_tflops * 1e12)
            done = applied == t.steps
            if eval_step is not None and ((t.eval_every and (step + 1) % t.eval_every == 0) or done):
                rec.update(evaluate(run, state.params, ref_params, eval_step))
            if (step + 1) % t.log_every == 0 or done:
                processes.check_same_rows(step + 1, batch, rows)
                processes.check_same_loss(step + 1, rec["loss"])
                with checkpoints.storage_errors(f"writing the metrics of step {step + 1}", workdir):
                    writer.write(rec)
            stop = preemption.should_stop(step + 1)
            if (step + 1) % rc.checkpoint.every_steps == 0 or done or stop:
                lock.check()  # a run whose workdir was taken over (its lease expired) writes no more
                # an async save's failure surfaces at the next save (or at the final wait below)
                with checkpoints.storage_errors(f"saving checkpoints (at step {step + 1})", workdir):
                    checkpoints.save(mngr, step + 1, state, iterator, meta, force=done or stop)
                    writer.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            last = rec
            if stop and not done:
                last = {**rec, "preempted": True}
                print(f"preempted: checkpoint saved at step {step + 1}; re-run the same command to resume",
                      file=sys.stderr)
                break
        report_drops(iterator, rows, d.max_response_len)
    except StorageError:
        storage_failed = True
        raise
    finally:
        try:
            if not storage_failed:
                with checkpoints.storage_errors("finishing the last checkpoint", workdir):
                    mngr.wait_until_finished()
        except StorageError:
            storage_failed = True
            raise
        finally:
            preemption.restore()
            writer.close(upload=not storage_failed)  # nothing more is sent to a storage known to be failing
            bar.close()
            if storage_failed:
                lock.abandon()  # left for the next run to take over (this pid will be gone)
    return last


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
