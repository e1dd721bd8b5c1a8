"""A skipped (non-finite) step applies no update and does not advance the schedule: the logged lr is the applied
one, and the next good step is exactly the step a run without the bad batch would have taken."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import percausal_jax as pj
from percausal_jax.objectives import CE
from percausal_jax.training.step import init_state, jit_train_step, make_train_step
from tests.training.test_step import _batch, _examples, tiny  # noqa: F401  (fixture)


def test_logged_lr_is_the_applied_lr_after_a_skip(tiny):  # noqa: F811
    d, _ = tiny
    schedule = optax.linear_schedule(1.0, 0.0, 10)  # distinct rates per count: 1.0, 0.9, 0.8, ...
    tx = optax.sgd(schedule)
    model = pj.load_pretrained(d)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    step = make_train_step(graphdef, tx, schedule, CE(), chunk_size=100)
    good = _batch(_examples(4, seed=2))
    bad = dataclasses.replace(good, response=dataclasses.replace(
        good.response, weight=good.response.weight.at[0, 0].set(jnp.nan)))

    def run(batches):
        state = init_state(jax.tree.map(jnp.copy, params), tx)  # the state is donated: fresh buffers per run
        fn = jit_train_step(step, state)
        logs = []
        for b in batches:
            state, m = fn(state, frozen, None, b)
            logs.append(jax.device_get(m))
        return state, logs

    skipped, logs = run([good, bad, good])
    straight, ref_logs = run([good, good])
    assert [bool(m["finite"]) for m in logs] == [True, False, True] and int(skipped.nan_skips) == 1
    np.testing.assert_allclose([float(m["lr"]) for m in logs], [1.0, 0.0, 0.9], rtol=1e-6)  # next step: count 1
    np.testing.assert_allclose([float(m["lr"]) for m in ref_logs], [1.0, 0.9], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
