"""The optax chain from the typed ``optimizer`` block (:class:`~percausal_jax.config.OptimizerSpec`): schedule,
global-norm clipping, optimizer, decay mask.

Weight decay skips biases and norm scales, by role (:func:`decay_mask`), identically for both layer layouts.
``grad_clip_norm = 0`` disables clipping.
"""

from __future__ import annotations

import jax
import optax

from percausal_jax.config import CHOICES, OptimizerSpec
from percausal_jax.errors import UserError

SCHEDULES = CHOICES["optimizer.schedule"]  # declared with the config key (percausal_jax.config.OptimizerSpec)
OPTIMIZERS = CHOICES["optimizer.name"]


def schedule(cfg: OptimizerSpec, total_steps: int) -> optax.Schedule:
    """Warm-up (``warmup_steps``, or ``warmup_ratio`` of the run) from 0, then constant / linear / cosine decay to
    ``min_lr_ratio · lr``."""
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"optimizer.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    warmup = int(cfg.warmup_steps or round(cfg.warmup_ratio * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    lr, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    else:
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params):
    """By parameter role, as HF Trainer: everything is decayed (kernels, embeddings, the head, LoRA adapters)
    except biases and norm scales (``*norm*.weight``), whatever the layer layout (a scanned layer axis changes
    shapes, not roles)."""
    def decayed(path, _) -> bool:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        keys = [k for k in keys if k != "value"]  # an nnx.Variable's own attribute, not a parameter name
        return not (keys[-1] == "bias" or any("norm" in k for k in keys[:-1]))

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: OptimizerSpec, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"optimizer.name must be one of {OPTIMIZERS}, got {cfg.name!r}")
    lr = schedule(cfg, total_steps)
    mask = decay_mask
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "sgd":
        parts = [optax.add_decayed_weights(cfg.weight_decay, mask)] if cfg.weight_decay else []
        opt = optax.chain(*parts, optax.sgd(lr, momentum=cfg.momentum or None))
    else:
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    return optax.chain(*chain, opt), lr
