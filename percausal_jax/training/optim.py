"""The optax chain from the typed ``optimizer`` block (:class:`~percausal_jax.config.OptimizerSpec`): schedule,
global-norm clipping, optimizer, decay mask.

Weight decay skips parameters with fewer than two dimensions beyond a scanned layer axis (norm scales, biases).
``grad_clip_norm = 0`` disables clipping.
"""

from __future__ import annotations

import jax
import optax

from percausal_jax.config import OptimizerSpec
from percausal_jax.errors import UserError

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd", "adafactor")


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


def decay_mask(params, scanned: bool):
    """True for matrices (decayed), False for norms and biases."""
    return jax.tree.map(lambda p: p.ndim - (1 if scanned and p.ndim > 1 else 0) >= 2, params)


def make_optimizer(cfg: OptimizerSpec, total_steps: int, scanned: bool = False) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"optimizer.name must be one of {OPTIMIZERS}, got {cfg.name!r}")
    lr = schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, scanned)  # noqa: E731
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "sgd":
        parts = [optax.add_decayed_weights(cfg.weight_decay, mask)] if cfg.weight_decay else []
        opt = optax.chain(*parts, optax.sgd(lr, momentum=cfg.momentum or None))
    else:
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    return optax.chain(*chain, opt), lr
