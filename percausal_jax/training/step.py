"""The pure train step: both passes → objective → gradients (accumulated over micro-batches) → optax update.

``train_step(state, frozen, ref_params, batch) -> (state, metrics)`` is jitted with the state donated. The batch is
a :class:`~percausal_jax.data.pairing.PairedBatch` whose leading axis is the global batch. With
``grad_accum_steps = k`` it is split into k micro-batches and :func:`~percausal_jax.training.accumulate.accumulate`
sums gradients of Σ_t loss_sum_t / N_t, where N_t are the **global** normalizers of the whole optimizer step: taken
from the data when the objective knows them (``Objective.data_normalizer``); when every term shares one
parameter-dependent normalizer (``Objective.shared_normalizer``), the unnormalized gradients are summed and divided
once by the summed normalizer; else N_t are summed in a forward-only pre-pass of just the passes they need
(``Objective.normalizer_requirements``: NextQuill's Σω needs gold-token probabilities, no gradient, no contrast).
The result equals one step on the whole batch, not a mean of means.

State shardings have one recipe (:func:`state_shardings`), used for a concrete state (:func:`init_state`), an
abstract one (:func:`abstract_state`, AOT and benchmarks) and the jitted step's outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from percausal_jax.evaluation.token_nll import class_sums
from percausal_jax.objectives import Objective, Result, Targets, compute_passes, evaluate, normalized_loss
from percausal_jax.objectives.passes import evaluate_with_passes
from percausal_jax.training.accumulate import accumulate, split_micro


@struct.dataclass
class TrainState:
    step: jax.Array  # int32[]: batches consumed (applied updates = step - nan_skips)
    params: Any  # nnx.State of the trainable parameters
    opt_state: Any
    nan_skips: jax.Array  # int32[]: updates skipped because loss or gradients were not finite


def reference_model(graphdef, ref_params, frozen, ref_graphdef=None):
    """The frozen reference: ``ref_params`` in the trained model's layout (the initial parameters, sharing the
    frozen base), or, with ``ref_graphdef``, a separate model (``objective.<name>.reference_model``)."""
    if ref_graphdef is None:
        return nnx.merge(graphdef, ref_params, frozen)
    return nnx.merge(ref_graphdef, ref_params)


def model_builder(graphdef, objective: Objective, ref_graphdef=None):
    """``models(params, frozen, ref_params) -> (model, reference)``: the trained model, and the frozen reference
    (:func:`reference_model`) when ``objective`` compares against one, else None. One recipe for train and eval."""
    needs_ref = bool(objective.requirements.reference)

    def models(params, frozen, ref_params):
        model = nnx.merge(graphdef, params, frozen)
        return model, reference_model(graphdef, ref_params, frozen, ref_graphdef) if needs_ref else None

    return models


def make_train_step(graphdef, tx: optax.GradientTransformation, lr_schedule, objective: Objective, *,
                    grad_accum_steps: int = 1, chunk_size: int = 8192, nan_policy: str = "skip",
                    ref_graphdef=None):
    """Returns the un-jitted ``train_step``; see :func:`jit_train_step`."""
    models = model_builder(graphdef, objective, ref_graphdef)
    k = grad_accum_steps

    def normalizer(params, frozen, ref_params, mb) -> jax.Array:
        """Forward-only: the objective's normalizers of one micro-batch from just the passes they need."""
        model, ref = models(params, frozen, ref_params)
        passes = compute_passes(model, mb, objective.normalizer_requirements, chunk_size, ref)
        return objective.normalizer(passes, Targets.of(mb))

    def train_step(state: TrainState, frozen, ref_params, batch):
        def loss_fn(params, mb, norm):
            model, ref = models(params, frozen, ref_params)
            res = evaluate(objective, model, mb, ref, chunk_size)
            denom = jax.lax.stop_gradient(res.normalizer if norm is None else norm)
            return normalized_loss(res.loss_sum, denom), res

        micro = split_micro(batch, k)
        norm = objective.data_normalizer(Targets.of(micro))
        deferred = norm is None and k > 1 and objective.shared_normalizer
        if deferred:  # one shared normalizer: sum unnormalized gradients, divide once by the summed normalizer
            shape = jax.eval_shape(normalizer, state.params, frozen, ref_params, jax.tree.map(lambda x: x[0], micro))
            norm = jnp.ones(shape.shape, shape.dtype)
        elif norm is None and k > 1:  # several normalizers, parameter-dependent: forward-only pre-pass
            norm = jax.lax.map(lambda mb: normalizer(state.params, frozen, ref_params, mb), micro).sum(0)
        loss, grads, metrics, norm = accumulate(jax.value_and_grad(loss_fn, has_aux=True), state.params, micro, norm)
        if deferred:
            scale = normalized_loss(1.0, norm[0])  # 1 / N, N the one summed normalizer
            loss, grads = loss * scale, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
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
        # the rate this update applies: optax's schedule counts applied updates, and a skipped step applies none
        lr = lr_schedule(state.step - state.nan_skips)
        out = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.where(finite, lr, 0.0), "finite": finite,
               "normalizer": jnp.sum(norm), **metrics}
        return new_state, out

    return train_step


def jit_train_step(train_step, state: TrainState):
    """jit with the state donated and its shardings kept (inputs arrive already placed on the mesh); ``state`` may
    be concrete or abstract (its leaves' shardings are used)."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_sh, None))


def make_eval_step(graphdef, objective: Objective, chunk_size: int = 8192, ref_graphdef=None):
    """``eval_step(params, frozen, ref_params, batch) -> Result`` sums (loss_sum, normalizer, metrics), no grad.
    The metrics also hold the personalized pass's NLL sums per token class (``token_nll.SUM_KEYS``; zero when the
    batch's tokens are unclassified)."""
    models = model_builder(graphdef, objective, ref_graphdef)

    @jax.jit
    def eval_step(params, frozen, ref_params, batch):
        model, ref = models(params, frozen, ref_params)
        res, passes = evaluate_with_passes(objective, model, batch, ref, chunk_size)
        r = batch.response
        return res._replace(metrics={**res.metrics, **class_sums(passes.p.logp, r.weight, r.token_class)})

    return eval_step


def state_shardings(params, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Where every leaf of the train state lives: parameters where they are; optimizer leaves shaped like their
    parameter (Adam's moments) with that parameter, everything else (counts, factored statistics) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, params)
    opt = optax.tree_map_params(tx, lambda s, p: p.sharding if s.shape == p.shape else replicated, opt_abstract,
                                params, transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=jax.tree.map(lambda p: p.sharding, params), opt_state=opt,
                      nan_skips=replicated)


def init_state(params, tx: optax.GradientTransformation, mesh: Mesh | None = None) -> TrainState:
    """The initial train state next to the (possibly sharded) parameters, laid out by :func:`state_shardings`."""
    if mesh is None:
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
        return TrainState(step=zero(), params=params, opt_state=jax.jit(tx.init)(params), nan_skips=zero())
    sh = state_shardings(params, tx, mesh)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sh.step)  # noqa: E731  (two buffers: both donated)
    return TrainState(step=zero(), params=params, opt_state=opt_state, nan_skips=zero())


def abstract_state(params, tx: optax.GradientTransformation, mesh: Mesh | None = None) -> TrainState:
    """``jax.ShapeDtypeStruct`` leaves (with :func:`state_shardings` when ``mesh`` is given): nothing allocated."""
    opt = jax.eval_shape(tx.init, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=scalar, params=params, opt_state=opt, nan_skips=scalar)
    if mesh is None:
        return state
    sh = state_shardings(params, tx, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)
