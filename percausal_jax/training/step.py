"""The pure train step: both passes → objective → gradients (accumulated over micro-batches) → optax update.

``train_step(state, frozen, ref_params, batch) -> (state, metrics)`` is jitted with the state donated. The batch is
a :class:`~percausal_jax.data.pairing.PairedBatch` dict whose leading axis is the global batch. With
``grad_accum_steps = k`` it is split into k micro-batches (row i goes to micro-batch i mod k, so each device keeps
its share of every micro-batch) and a ``lax.scan`` sums gradients of Σ_t loss_sum_t / N_t, where N_t are the
**global** normalizers of the whole optimizer step: taken from the data when possible, else summed in a
forward-only pre-pass (NextQuill's Σω). The result equals one step on the whole batch, not a mean of means.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from percausal_jax.objectives import losses, registry


@struct.dataclass
class TrainState:
    step: jax.Array  # int32[]
    params: Any  # nnx.State of the trainable parameters
    opt_state: Any
    nan_skips: jax.Array  # int32[]: updates skipped because loss or gradients were not finite


def split_micro(batch: dict, k: int) -> dict:
    """Leaves [k·b, ...] → [k, b, ...] with row i in micro-batch i mod k."""
    def f(x):
        b = x.shape[0] // k
        return jnp.swapaxes(x.reshape(b, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(f, batch)


def _targets(batch: dict) -> losses.Targets:
    r = batch["response"]
    return losses.Targets(r["ids"], r["weight"], r["seq_weight"])


def make_train_step(graphdef, tx: optax.GradientTransformation, lr_schedule, objective: str, obj_cfg, *,
                    grad_accum_steps: int = 1, chunk_size: int = 8192, nan_policy: str = "skip"):
    """Returns the un-jitted ``train_step``; see :func:`jit_train_step`."""
    spec = registry.get(objective)
    cfg = obj_cfg[objective]
    needs_ref = bool(spec.requirements(cfg).reference)
    k = grad_accum_steps

    def run(params, frozen, ref_params, mb):
        model = nnx.merge(graphdef, params, frozen)
        ref = nnx.merge(graphdef, ref_params, frozen) if needs_ref else None
        return registry.evaluate(objective, model, mb, cfg, ref, chunk_size)

    def loss_fn(params, frozen, ref_params, mb, norm):
        res = run(params, frozen, ref_params, mb)
        denom = jax.lax.stop_gradient(res.normalizer if norm is None else norm)
        return jnp.sum(res.loss_sum / jnp.maximum(denom, 1e-12)), res

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, frozen, ref_params, batch: dict):
        if k == 1:
            norm = losses.data_normalizer(objective, cfg, _targets(batch))
            (loss, res), grads = grad_fn(state.params, frozen, ref_params, batch, norm)
            metrics = res.metrics
            norm = res.normalizer if norm is None else norm
        else:
            micro = split_micro(batch, k)
            norm = losses.data_normalizer(objective, cfg, _targets(micro))
            if norm is None:  # parameter-dependent normalizer: forward-only pre-pass over the micro-batches
                norm = jax.lax.map(lambda mb: run(state.params, frozen, ref_params, mb).normalizer, micro).sum(0)

            def body(acc, mb):
                (l, res), g = grad_fn(state.params, frozen, ref_params, mb, norm)
                return jax.tree.map(jnp.add, acc, (l, g, res.metrics)), None

            zero_metrics = jax.eval_shape(lambda: run(state.params, frozen, ref_params,
                                                      jax.tree.map(lambda x: x[0], micro)).metrics)
            init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics))
            (loss, grads, metrics), _ = jax.lax.scan(body, init, micro)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params) if nan_policy == "skip" else new_params,
            opt_state=keep(new_opt, state.opt_state) if nan_policy == "skip" else new_opt,
            nan_skips=state.nan_skips + (~finite).astype(jnp.int32),
        )
        out = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step), "finite": finite,
               "normalizer": jnp.sum(norm), **metrics}
        return new_state, out

    return train_step


def jit_train_step(train_step, state: TrainState):
    """jit with the state donated and its shardings kept (inputs arrive already placed on the mesh)."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_sh, None))


def make_eval_step(graphdef, objective: str, obj_cfg, chunk_size: int = 8192):
    """``eval_step(params, frozen, ref_params, batch) -> Result`` sums (loss_sum, normalizer, metrics), no grad."""
    cfg = obj_cfg[objective]
    needs_ref = bool(registry.get(objective).requirements(cfg).reference)

    @jax.jit
    def eval_step(params, frozen, ref_params, batch):
        model = nnx.merge(graphdef, params, frozen)
        ref = nnx.merge(graphdef, ref_params, frozen) if needs_ref else None
        return registry.evaluate(objective, model, batch, cfg, ref, chunk_size)

    return eval_step


def init_state(params, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh | None = None) -> TrainState:
    """Optimizer state built next to the (possibly sharded) parameters; scalars replicated over ``mesh``."""
    opt_state = jax.jit(tx.init)(params)
    if mesh is not None:  # leaves not derived from a parameter (Adam's count) land on one device: replicate them
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        opt_state = jax.tree.map(lambda x: x if len(x.sharding.device_set) == mesh.size else jax.device_put(x, rep),
                                 opt_state)

    def zero():  # two distinct buffers: both are donated
        z = jnp.zeros((), jnp.int32)
        return z if mesh is None else jax.device_put(z, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    return TrainState(step=zero(), params=params, opt_state=opt_state, nan_skips=zero())


