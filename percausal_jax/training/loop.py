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
    model_dir: Path
    tokenizer: object
    graphdef: object
    params: object  # trainable nnx.State
    frozen: object  # the rest (LoRA base), nnx.State
    model_config: object

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


def build(cfg) -> Run:
    """Mesh, model (sharded straight from the checkpoint), LoRA adapters, and the trainable/frozen split."""
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise UserError(f"mesh: {e}") from None
    rows_per_micro = cfg.train.global_batch_size // cfg.train.grad_accum_steps
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows_per_micro % batch_devices:
        raise UserError(f"a micro-batch has {rows_per_micro} rows, not a multiple of mesh data×fsdp="
                        f"{batch_devices}")
    model_dir = resolve_model_dir(resolve_model_arg(cfg.model.path))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_pretrained(model_dir, dtype=cfg.model.dtype, mesh=mesh, compute_dtype=cfg.model.compute_dtype,
                            scan_layers=cfg.model.scan_layers, remat_policy=cfg.model.remat_policy,
                            attention_impl=cfg.model.attention_impl)
    trainable = nnx.Param
    if cfg.lora.rank > 0:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets), seed=cfg.seed)
        trainable = nnx.LoRAParam
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    params = place(params, mesh, cfg.model.scan_layers)
    return Run(cfg, mesh, model_dir, tokenizer, graphdef, params, frozen, model.config)


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


def data_iterator(cfg, run: Run, path: str, *, seed_offset: int = 0, num_epochs=None, shuffle=None):
    return make_iterator(path, run.tokenizer, featurize_config(cfg),
                         per_process_batch_size=cfg.train.global_batch_size // jax.process_count(),
                         seed=cfg.seed + seed_offset, process_index=jax.process_index(),
                         process_count=jax.process_count(), num_epochs=num_epochs,
                         shuffle=cfg.data.shuffle if shuffle is None else shuffle, packing=cfg.data.packing,
                         bucket_multiple=cfg.data.bucket_multiple)


def layout(cfg, run: Run) -> dict:
    return {"model_type": run.model_config.model_type, "num_params": run.model_config.num_params(),
            "scan_layers": bool(cfg.model.scan_layers), "param_dtype": cfg.model.dtype,
            "lora_rank": int(cfg.lora.rank), "objective": cfg.objective.name, "optimizer": cfg.optimizer.name}


def estimate_flops(cfg, n_params: int, batch: dict) -> float:
    """Matmul FLOPs of one step: 6N per trained token, 2N per forward-only token (attention excluded)."""
    req = registry.get(cfg.objective.name).requirements(cfg.objective[cfg.objective.name])
    tp = float(np.sum(np.asarray(batch["personal"]["segment_ids"]) > 0))
    tc = float(np.sum(np.asarray(batch["counterfactual"]["segment_ids"]) > 0)) if req.counterfactual else 0.0
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
    """``metrics.jsonl`` (append) and TensorBoard events, written by process 0 only."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def device_batch(batch, mesh) -> dict:
    """Host batch → global arrays with the same shape on every process."""
    return to_global(common_shape(batch), mesh)


def evaluate(cfg, run: Run, params, ref_params, eval_step) -> dict:
    """Objective loss on ``data.eval`` (one pass, at most ``train.eval_batches`` batches): Σ loss / Σ normalizer.
    Every process runs the same number of batches (a process whose shard ran out feeds all-padding batches)."""
    rows = cfg.train.global_batch_size // jax.process_count()
    shard = -(-len(open_source(cfg.data.eval)) // jax.process_count())
    n_batches = min(cfg.train.eval_batches, -(-shard // rows))
    it = data_iterator(cfg, run, cfg.data.eval, num_epochs=1, shuffle=False)
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
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = build(cfg)
    obj_name, obj_cfg = cfg.objective.name, cfg.objective
    tx, lr_schedule = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.scan_layers)
    state = init_state(run.params, tx, run.mesh)
    needs_ref = bool(registry.get(obj_name).requirements(obj_cfg[obj_name]).reference)
    # the frozen reference (LossCE, NextQuill fixed θ_D) is the initial model, rebuilt identically on resume
    ref_params = jax.tree.map(jnp.copy, run.params) if needs_ref else None
    iterator = data_iterator(cfg, run, cfg.data.train)
    meta = {"config": json.loads(cfg.to_json_best_effort()), "layout": layout(cfg, run),
            "model_config": run.model_config.to_hf(), "model_dir": str(run.model_dir)}
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
    writer = MetricsWriter(workdir)
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
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            last = rec
            if stop:
                print(f"preempted: checkpoint saved at step {step + 1}; re-run the same command to resume",
                      file=sys.stderr)
                break
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
