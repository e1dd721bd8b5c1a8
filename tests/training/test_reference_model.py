"""``objective.<name>.reference_model``: LossCE's / NextQuill's frozen reference is a separate model when named (a
path or hub id), loaded on the run's mesh; LossCE's excess loss is then nll_θ − nll_ref of that model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percausal_jax.config import RunConfig, load_config
from percausal_jax.data.pairing import collate
from percausal_jax.errors import UserError
from percausal_jax.objectives import CE, evaluate
from percausal_jax.training import setup as spine
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.test_step import _examples


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    out = {}
    for name, kw in (("model", {}), ("ref", {"seed": 3}), ("other_vocab", {"vocab_size": 300})):
        tiny_hf_model("llama", root / name, **kw)
        tiny_tokenizer(root / name)
        out[name] = root / name
    return out


def _rc(dirs, *extra):
    return RunConfig.from_config(load_config("configs/tiny.py", [
        f"--config.model.path={dirs['model']}", "--config.objective.name=lossce", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=4", "--config.train.grad_accum_steps=1", *extra]))


def test_lossce_excess_is_measured_against_the_named_model(dirs):
    run = spine.build(_rc(dirs, f"--config.objective.lossce.reference_model={dirs['ref']}"))
    ref_state = run.reference_params
    assert run.reference_graphdef is not None
    batch = jax.tree.map(jnp.asarray, collate([[e] for e in _examples(4, seed=1)], 24, 16, 10))
    ref_model = spine.pretrained(str(dirs["ref"])).model
    f = jax.jit(lambda b: (evaluate(run.objective, run.model(), b, ref_model, 64).metrics,
                           evaluate(CE(), run.model(), b).metrics, evaluate(CE(), ref_model, b).metrics))
    lossce, ours, theirs = jax.device_get(f(batch))
    np.testing.assert_allclose(lossce["excess_sum"], ours["nll_sum"] - theirs["nll_sum"], rtol=1e-5)
    assert abs(float(lossce["excess_sum"])) > 1e-2  # a different model: the excess loss is not zero
    step = run.train_step()  # the step merges the reference with its own layout
    state, m = step(run.init_state(), run.frozen, ref_state, jax.device_put(batch))
    np.testing.assert_allclose(float(m["excess_sum"]), float(lossce["excess_sum"]), rtol=1e-4)


def test_reference_must_share_the_vocabulary(dirs):
    rc = _rc(dirs, f"--config.objective.lossce.reference_model={dirs['other_vocab']}")
    with pytest.raises(UserError, match="lossce.reference_model=.*vocabulary of 300 tokens"):
        spine.build(rc)


def test_nextquill_reference_needs_fixed_theta_d(dirs):
    with pytest.raises(UserError, match="objective.nextquill: .*fixed_theta_d=True"):
        _rc(dirs, "--config.objective.name=nextquill", f"--config.objective.nextquill.reference_model={dirs['ref']}")
