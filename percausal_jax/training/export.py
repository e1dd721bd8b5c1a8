"""Checkpoint → model: rebuild the run's model from its saved config and restore the trained parameters."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx

from percausal_jax.hf.checkpoint import save_pretrained
from percausal_jax.models.lora import merge_lora
from percausal_jax.training import checkpoints
from percausal_jax.training.loop import build, layout
from percausal_jax.training.optim import make_optimizer
from percausal_jax.training.step import init_state


def restore_model(workdir: str | Path, step: int | None = None):
    """Returns ``(model, run, cfg, step)`` with the trained parameters of ``step`` (default: latest)."""
    meta, step = checkpoints.read_meta(workdir, step)
    cfg = ml_collections.ConfigDict(meta["config"])
    cfg.model.path = meta["model_dir"]
    run = build(cfg)
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.scan_layers)
    target = init_state(run.params, tx, run.mesh)  # shapes and shardings to restore into
    state, step = checkpoints.restore(checkpoints.manager(workdir, async_save=False), target, None,
                                      {**meta, "layout": layout(cfg, run)}, step)
    return nnx.merge(run.graphdef, state.params, run.frozen), run, cfg, step


def export_checkpoint(workdir: str | Path, out: str | Path, step: int | None = None, dtype=None,
                      form: str = "full") -> Path:
    """``form``: ``full`` (a full HF model; LoRA runs are merged into the base), ``merged`` (the same, and an error
    for a run without LoRA), or ``peft`` (a PEFT adapter for the base model). Tokenizer copied; atomic."""
    from percausal_jax.errors import UserError
    from percausal_jax.hf.peft import save_peft_adapter

    model, run, cfg, _ = restore_model(workdir, step)
    lora = cfg.lora.rank > 0
    if form in ("merged", "peft") and not lora:
        raise UserError(f"{workdir}: --{'merge-lora' if form == 'merged' else 'peft'} needs a LoRA run "
                        "(this run fine-tuned all parameters); export without it")
    if form == "peft":
        return save_peft_adapter(model, out, base_model=str(run.model_dir), rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                 targets=tuple(cfg.lora.targets), tokenizer_dir=run.model_dir)
    if lora:
        merge_lora(model)
    return save_pretrained(model, out, tokenizer=run.model_dir, dtype=dtype)
