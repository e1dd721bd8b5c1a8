"""The training loop behind ``percausal train``: config → mesh → model (+LoRA) → Grain iterator → jitted step →
metrics (JSONL, TensorBoard, progress bar) → periodic eval → Orbax checkpoints. Re-running the same command resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from percausal_jax.data.featurize import FeaturizeConfig
from percausal_jax.data.pairing import empty_batch
from percausal_jax.data.pipeline import make_iterator, open_source, to_global
from percausal_jax.data.records import SkipReport, detect_kind
from percausal_jax.data.retrieval import Contriever
from percausal_jax import atomic, storage
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import load_pretrained, resolve_model_dir
from percausal_jax.hf.gguf import resolve_model_arg
from percausal_jax.models.lora import apply_lora
from percausal_jax.models.partitioning import make_mesh, param_sharding
from percausal_jax.objectives import registry
from percausal_jax.training import checkpoints
from percausal_jax.training.distributed import Preemption, common_shape
from percausal_jax.training.optim import make_optimizer
from percausal_jax.training.step import init_state, jit_train_step, make_eval_step, make_train_step


@dataclasses.dataclass
class Run:
    """Everything built from a config, before the loop starts."""

    cfg: object
    mesh: jax.sharding.Mesh
    model_dir: Path  # local directory with the base model's files
    model_source: storage.Resolved  # the base model as the user named it (hub id / path / URL) + hub revision
    tokenizer: object
    graphdef: object
    params: object  # trainable nnx.State
    frozen: object  # the rest (LoRA base), nnx.State
    model_config: object
    contriever: Contriever | None = None  # the dense retriever of data.retriever="contriever"
    eval_records: object = None  # data.eval, read once

    def model(self, params=None):
        return nnx.merge(self.graphdef, self.params if params is None else params, self.frozen)


def validate(cfg) -> None:
    t = cfg.train
    if t.global_batch_size % t.grad_accum_steps:
        raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                        f"train.grad_accum_steps={t.grad_accum_steps}")
    if t.global_batch_size % jax.process_count():
        raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of the process count "
                        f"{jax.process_count()}")
    registry.get(cfg.objective.name)
    if not cfg.data.train:
        raise UserError("data.train is not set (--config.data.train=FILE)")


def build(cfg, *, for_export: bool = False) -> Run:
    """Mesh, model (sharded straight from the checkpoint), LoRA adapters, and the trainable/frozen split.

    ``for_export``: the mesh is every device of this machine on the fsdp axis (``(1, -1, 1)``), whatever mesh the
    run trained on (Orbax restores onto any mesh), and no batch-size check applies."""
    shape = (1, -1, 1) if for_export else (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    try:
        mesh = make_mesh(*shape)
    except ValueError as e:
        raise UserError(f"mesh: {e}") from None
    rows_per_micro = cfg.train.global_batch_size // cfg.train.grad_accum_steps
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows_per_micro % batch_devices and not for_export:
        raise UserError(f"a micro-batch has {rows_per_micro} rows, not a multiple of mesh data×fsdp="
                        f"{batch_devices}")
    source = resolve_model_dir(resolve_model_arg(cfg.model.path))
    model_dir = source.local
    tokenizer = storage.load_tokenizer(model_dir, what=f"tokenizer of model.path={cfg.model.path}")
    model = load_pretrained(model_dir, dtype=cfg.model.dtype, mesh=mesh, compute_dtype=cfg.model.compute_dtype,
                            scan_layers=cfg.model.scan_layers, remat_policy=cfg.model.remat_policy,
                            attention_impl=cfg.model.attention_impl)
    trainable = nnx.Param
    if cfg.lora.rank > 0:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets), seed=cfg.seed)
        trainable = nnx.LoRAParam
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    params = place(params, mesh, cfg.model.scan_layers)
    return Run(cfg, mesh, model_dir, source, tokenizer, graphdef, params, frozen, model.config)


def retriever(cfg, *sources) -> Contriever | None:
    """The Contriever encoder named by ``data.retriever_path`` (hub id, local or gs:// dir) when the config
    retrieves with it and the records need retrieval (canonical records; prompt records are already retrieved); a
    path set for another retriever is an error rather than silently unused."""
    d = cfg.data
    if d.retriever != "contriever":
        if d.retriever_path:
            raise UserError(f"data.retriever_path={d.retriever_path!r} is only used by data.retriever='contriever' "
                            f"(this config has data.retriever={d.retriever!r}); unset it or switch the retriever")
        return None
    if not any(src is not None and len(src) and detect_kind(src[0]) == "canonical" for src in sources):
        return None
    if not d.retriever_path:
        raise UserError("data.retriever='contriever' needs data.retriever_path (a hub id such as "
                        "facebook/contriever, or a local / gs:// model directory)")
    return Contriever(d.retriever_path, revision=d.retriever_revision or None)


def place(state, mesh, scanned: bool):
    """Puts every leaf of an nnx.State into its parameter sharding (no-op for leaves already there)."""
    flat = [(path, var.replace(jax.device_put(var[...], param_sharding(path, var.shape, mesh, scanned))))
            for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def featurize_config(cfg) -> FeaturizeConfig:
    d = cfg.data
    return FeaturizeConfig(template=d.template, counterfactual_mode=d.counterfactual_mode, retriever=d.retriever,
                           k=d.k, seed=cfg.seed, max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
                           budget_mode=d.budget_mode, truncate_response=d.truncate_response)


def open_records(cfg, path: str, key: str):
    """The records of ``data.train`` / ``data.eval`` (local or gs://), read once; every record must be of
    ``data.task`` when that is set. Records with an empty required field are skipped (``data.strict``: an error)
    and process 0 prints what was kept and skipped."""
    report = SkipReport()
    records = open_source(path, strict=cfg.data.strict, report=report)
    if jax.process_index() == 0:
        print(f"{key}={path}:\n{report.table()}", file=sys.stderr)
    if cfg.data.task:
        for i in range(len(records)):
            task = records[i].get("task")
            if task is not None and task != cfg.data.task:
                raise UserError(f"{path}: record {records[i].get('id', i + 1)!r} is of task {task!r}, but this config "
                                f"trains data.task={cfg.data.task!r} ({key}); use the matching config or data")
    return records


def data_iterator(cfg, run: Run, records, *, seed_offset: int = 0, num_epochs=None, shuffle=None):
    return make_iterator(records, run.tokenizer, featurize_config(cfg),
                         per_process_batch_size=cfg.train.global_batch_size // jax.process_count(),
                         seed=cfg.seed + seed_offset, process_index=jax.process_index(),
                         process_count=jax.process_count(), num_epochs=num_epochs,
                         shuffle=cfg.data.shuffle if shuffle is None else shuffle, packing=cfg.data.packing,
                         bucket_multiple=cfg.data.bucket_multiple, contriever=run.contriever)


def layout(cfg, run: Run) -> dict:
    return {"model_type": run.model_config.model_type, "num_params": run.model_config.num_params(),
            "scan_layers": bool(cfg.model.scan_layers), "param_dtype": cfg.model.dtype,
            "lora_rank": int(cfg.lora.rank), "objective": cfg.objective.name, "optimizer": cfg.optimizer.name}


def estimate_flops(cfg, n_params: int, batch) -> float:
    """Matmul FLOPs of one step: 6N per trained token, 2N per forward-only token (attention excluded)."""
    req = registry.get(cfg.objective.name).requirements(cfg.objective[cfg.objective.name])
    tp = float(np.sum(np.asarray(batch.personal.segment_ids) > 0))
    tc = float(np.sum(np.asarray(batch.counterfactual.segment_ids) > 0)) if req.counterfactual else 0.0
    flops = 6 * n_params * tp + (6 if req.counterfactual_grad else 2) * n_params * tc
    flops += 2 * n_params * (tp if "p" in req.reference else 0) + 2 * n_params * (tc if "c" in req.reference else 0)
    return flops


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
            keep = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.strip() and (resume_step is not None and json.loads(line).get("step", 0) <= resume_step)]
            self.path.write_text("".join(keep))
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

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        self.mirror.close()


def device_batch(batch, mesh) -> dict:
    """Host batch → global arrays with the same shape on every process."""
    return to_global(common_shape(batch), mesh)


def evaluate(cfg, run: Run, params, ref_params, eval_step) -> dict:
    """Objective loss on ``data.eval`` (one pass, at most ``train.eval_batches`` batches): Σ loss / Σ normalizer.
    Every process runs the same number of batches (a process whose shard ran out feeds all-padding batches)."""
    rows = cfg.train.global_batch_size // jax.process_count()
    records = run.eval_records
    shard = -(-len(records) // jax.process_count())
    n_batches = min(cfg.train.eval_batches, -(-shard // rows))
    it = data_iterator(cfg, run, records, num_epochs=1, shuffle=False)
    total_ls = total_n = None
    tokens = nll = 0.0
    for _ in range(n_batches):
        batch = next(it, None) or empty_batch(rows)
        with jax.set_mesh(run.mesh):
            res = eval_step(params, run.frozen, ref_params, device_batch(batch, run.mesh))
        ls, n = np.asarray(res.loss_sum, np.float64), np.asarray(res.normalizer, np.float64)
        total_ls = ls if total_ls is None else total_ls + ls
        total_n = n if total_n is None else total_n + n
        tokens += float(res.metrics["tokens"])
        nll += float(res.metrics["nll_sum"])
    if total_ls is None or tokens == 0:
        raise UserError(f"{cfg.data.eval}: no evaluation examples")
    # eval_nll (mean gold-token NLL) compares across objectives; eval_loss is each objective's own loss
    return {"eval_loss": float(np.sum(total_ls / np.maximum(total_n, 1e-12))), "eval_nll": nll / tokens,
            "eval_tokens": tokens}


def train(cfg, workdir: str | Path, progress: bool = True) -> dict:
    """Runs (or resumes) a training run; returns the last logged metrics."""
    validate(cfg)
    workdir = storage.path(workdir)
    train_records = open_records(cfg, cfg.data.train, "data.train")  # bad data fails before the model loads
    eval_records = open_records(cfg, cfg.data.eval, "data.eval") if cfg.data.eval else None
    contriever = retriever(cfg, train_records, eval_records)
    run = build(cfg)
    run.eval_records, run.contriever = eval_records, contriever
    obj_name, obj_cfg = cfg.objective.name, cfg.objective
    tx, lr_schedule = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.scan_layers)
    state = init_state(run.params, tx, run.mesh)
    needs_ref = bool(registry.get(obj_name).requirements(obj_cfg[obj_name]).reference)
    # the frozen reference (LossCE, NextQuill fixed θ_D) is the initial model, rebuilt identically on resume
    ref_params = jax.tree.map(jnp.copy, run.params) if needs_ref else None
    iterator = data_iterator(cfg, run, train_records)
    meta = {"config": json.loads(cfg.to_json_best_effort()), "layout": layout(cfg, run),
            "model_config": run.model_config.to_hf(), "model_dir": str(Path(run.model_dir).resolve()),
            "model_path": str(cfg.model.path), "model_revision": run.model_source.revision}
    mngr = checkpoints.manager(workdir, keep=cfg.checkpoint.keep)
    restored, start = checkpoints.restore(mngr, state, iterator, meta)
    if restored is not None:
        state = restored
        print(f"resumed from step {start}", file=sys.stderr)
    step_fn = jit_train_step(make_train_step(run.graphdef, tx, lr_schedule, obj_name, obj_cfg,
                                             grad_accum_steps=cfg.train.grad_accum_steps,
                                             chunk_size=obj_cfg.vocab_chunk_size, nan_policy=cfg.train.nan_policy),
                             state)
    eval_step = make_eval_step(run.graphdef, obj_name, obj_cfg, obj_cfg.vocab_chunk_size) if cfg.data.eval else None
    writer = MetricsWriter(workdir, resume_step=start)
    n_params, n_dev = run.model_config.num_params(), jax.device_count()
    first = int(state.step)
    bar = _progress(first, cfg.train.steps, progress)
    preemption = Preemption()
    last: dict = {}
    try:
        for step in range(first, cfg.train.steps):
            batch = next(iterator)
            t0 = time.perf_counter()
            with jax.set_mesh(run.mesh):
                state, m = step_fn(state, run.frozen, ref_params, device_batch(batch, run.mesh))
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            if not bool(m.pop("finite")) and cfg.train.nan_policy == "fail":
                raise FloatingPointError(f"step {step + 1}: loss or gradient is not finite")
            rec = {"step": step + 1, **per_token_metrics(m), "step_time": dt,
                   "tokens_per_s": float(m["tokens"]) / dt, "nan_skips": int(state.nan_skips)}
            if cfg.train.peak_tflops > 0:
                rec["mfu"] = estimate_flops(cfg, n_params, batch) / dt / (n_dev * cfg.train.peak_tflops * 1e12)
            done = step + 1 == cfg.train.steps
            if eval_step is not None and ((cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or done):
                rec.update(evaluate(cfg, run, state.params, ref_params, eval_step))
            if (step + 1) % cfg.train.log_every == 0 or done:
                writer.write(rec)
            stop = preemption.should_stop(step + 1)
            if (step + 1) % cfg.checkpoint.every_steps == 0 or done or stop:
                checkpoints.save(mngr, step + 1, state, iterator, meta, force=done or stop)
                writer.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            last = rec
            if stop:
                print(f"preempted: checkpoint saved at step {step + 1}; re-run the same command to resume",
                      file=sys.stderr)
                break
        dropped = iterator.featurize_stats.dropped
        if sum(dropped.values()) and jax.process_index() == 0:
            print(f"data.train: dropped while featurizing (this process): "
                  + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()) if v)
                  + " (raise data.max_prompt_len / data.max_response_len, or set data.truncate_response)",
                  file=sys.stderr)
    finally:
        mngr.wait_until_finished()
        preemption.restore()
        writer.close()
        bar.close()
    return last


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                disable=not enabled or jax.process_index() != 0)
