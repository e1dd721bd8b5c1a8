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


def export_checkpoint(workdir: str | Path, out: str | Path, step: int | None = None, dtype=None) -> Path:
    """Full model (LoRA merged into the base when the run used adapters), tokenizer copied, atomic."""
    model, run, cfg, _ = restore_model(workdir, step)
    if cfg.lora.rank > 0:
        merge_lora(model)
    return save_pretrained(model, out, tokenizer=run.model_dir, dtype=dtype)
