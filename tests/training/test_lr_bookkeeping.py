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


def test_the_run_makes_up_a_skipped_step(setup, tmp_path, monkeypatch):
    """One non-finite batch in a 3-step run: 4 batches are consumed, 3 updates applied, the last lr logged is the
    schedule's value at count 2, and the run ends there (the schedule's end), checkpointed at step 4."""
    import json

    from percausal_jax import cli
    from percausal_jax.training import setup as spine
    from tests.training.common import train_args

    real = spine.Run.train_step

    def poisoned(self):
        step, calls = real(self), [0]

        def fn(state, frozen, ref, batch):
            calls[0] += 1
            if calls[0] == 2:  # the second batch carries a NaN weight: loss and gradient are not finite
                batch = dataclasses.replace(batch, response=dataclasses.replace(
                    batch.response, weight=batch.response.weight * jnp.nan))
            return step(state, frozen, ref, batch)

        return fn

    monkeypatch.setattr(spine.Run, "train_step", poisoned)
    model_dir, data = setup
    work = tmp_path / "run"
    assert cli.main(train_args(model_dir, data, work, "ce", steps=3, extra=[
        "--config.optimizer.schedule=linear", "--config.optimizer.warmup_steps=0", "--config.optimizer.lr=0.3",
        "--config.train.grad_accum_steps=1", "--config.data.eval="])) == 0
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["nan_skips"] for r in rows] == [0, 1, 1, 1]
    np.testing.assert_allclose([r["lr"] for r in rows], [0.3, 0.0, 0.2, 0.1], rtol=1e-6)  # linear 0.3 → 0 in 3
