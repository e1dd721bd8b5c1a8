"""The typed config is the only schema: a key declared once on its dataclass field (default, choices / bounds, help)
shows up in configs/base.py, in validation and its errors, in the unknown-key hints and in the help listing.

The mechanism is tested with throwaway keys added to copies of the real declarations, not by comparing a function
with its own source."""

import dataclasses

import jax.numpy as jnp
import pytest

from percausal_jax import cli, config
from percausal_jax.config import RunConfig, declarations, default_config, describe_keys, load_config
from percausal_jax.errors import UserError
from percausal_jax.objectives import PerCE, normalized_loss, registry
from percausal_jax.schema import UNIT, Bound, closest_hint, key
from tests.test_config import _leaves

BASE = "configs/base.py"




def _read(*overrides: str) -> RunConfig:
    return RunConfig.from_config(load_config(BASE, list(overrides)))


def _outside(bound: Bound, default):
    """A value of ``default``'s type just outside ``bound``."""
    if bound.low is not None:
        return type(default)(bound.low if bound.low_open else bound.low - 1)
    return type(default)(bound.high if bound.high_open else bound.high + 1)


def _activating(name: str) -> list[str]:
    """Overrides that make ``name``'s block the active one (an objective's bounds are checked when it trains)."""
    parts = name.split(".")
    return [f"--config.objective.name={parts[1]}"] if parts[0] == "objective" and len(parts) == 3 else []


# ----------------------------------------------------------------------------------------- the real declarations


def test_every_declared_key_is_in_the_base_config_with_its_default():
    leaves = _leaves(load_config(BASE))
    declared = dict(declarations())
    assert set(leaves) == set(declared)
    for name, f in declared.items():
        assert type(leaves[name]) is type(f.default) and leaves[name] == f.default, name


BOUNDED = [(name, f) for name, f in declarations() if f.metadata["bound"] is not None]
WITH_CHOICES = [(name, f) for name, f in declarations() if f.metadata["choices"]]


@pytest.mark.parametrize("name,f", BOUNDED, ids=[n for n, _ in BOUNDED])
def test_a_bound_rejects_a_value_outside_it(name, f):
    bad = _outside(f.metadata["bound"], f.default)
    with pytest.raises(UserError, match=rf"{name}={bad!r}: expected "):
        _read(*_activating(name), f"--config.{name}={bad}")


@pytest.mark.parametrize("override,message", [
    ("data.k=0", "data.k=0: expected an integer ≥ 1"),
    ("optimizer.b2=1.0", "optimizer.b2=1.0: expected a number in [0, 1)"),
    ("optimizer.lr=0.0", "optimizer.lr=0.0: expected a number > 0"),
    ("objective.vocab_chunk_size=-1", "objective.vocab_chunk_size=-1: expected an integer ≥ 0"),
    ("objective.perce.clip_max=0.0", "objective.perce.clip_max=0.0: expected a number > 0"),
    ("objective.lossce.keep_frac=0.0", "objective.lossce.keep_frac=0.0: expected a number in (0, 1]"),
])
def test_bound_errors_keep_their_shape(override, message):
    with pytest.raises(UserError) as e:
        _read(*_activating(override.partition("=")[0]), f"--config.{override}")
    assert message in str(e.value)


@pytest.mark.parametrize("name,f", WITH_CHOICES, ids=[n for n, _ in WITH_CHOICES])
def test_choices_reject_another_value_and_name_the_choices(name, f):
    with pytest.raises(UserError) as e:
        _read(f"--config.{name}=bogus")
    assert f"{name}='bogus'" in str(e.value)
    assert all(choice in str(e.value) for choice in f.metadata["choices"])


def test_describe_keys_lists_every_key_once_with_its_default():
    lines = describe_keys().splitlines()
    declared = declarations()
    assert len(lines) == len(declared)
    for line, (name, f) in zip(lines, declared):
        assert line.startswith(f"{name} = {f.default!r}") and f.metadata["help"] in line
    assert any(line.startswith("data.k = 4 (an integer ≥ 1): ") for line in lines)
    assert any(line.startswith("train.nan_policy = 'skip' (one of skip | fail): ") for line in lines)


def test_remat_policy_typo_is_a_one_line_exit_2_naming_the_choices(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "configs/tiny.py", "--workdir", str(workdir),
                     "--config.model.remat_policy=dot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "model.remat_policy='dot': expected one of none, full, dots, save_qkv_proj, minimal" in err


def test_choices_declared_without_jax_match_the_implementations():
    """config.py declares these without importing the jax modules that implement them: the remat policies are the
    decoder's, and every declared optimizer and schedule builds (training.optim reads its choices from here)."""
    from percausal_jax.config import OptimizerSpec
    from percausal_jax.models.decoder import REMAT_POLICIES
    from percausal_jax.training.optim import make_optimizer

    from percausal_jax.models.qlora import QUANTIZE_BASE

    choices = dict(declarations())
    assert set(choices["model.remat_policy"].metadata["choices"]) == set(REMAT_POLICIES)
    assert set(choices["lora.quantize_base"].metadata["choices"]) == set(QUANTIZE_BASE)
    for name in choices["optimizer.name"].metadata["choices"]:
        for schedule in choices["optimizer.schedule"].metadata["choices"]:
            tx, lr = make_optimizer(dataclasses.replace(OptimizerSpec(), name=name, schedule=schedule), 10)
            assert tx is not None and float(lr(0)) >= 0


def test_the_featurizer_keys_share_its_declarations_with_training_defaults():
    """data.template / data.retriever / ... admit what FeaturizeConfig admits; only the defaults differ."""
    from percausal_jax.data.featurize import FeaturizeConfig

    featurizer = {f.name: f for f in dataclasses.fields(FeaturizeConfig)}
    data = dict(declarations())
    for name in ("template", "counterfactual_mode", "retriever", "budget_mode"):
        assert data[f"data.{name}"].metadata["choices"] == featurizer[name].metadata["choices"]
    with pytest.raises(UserError, match=r"data\.retriever='tfidf': expected one of bm25, recency, random"):
        _read("--config.data.retriever=tfidf")


def test_closest_hint():
    assert closest_hint("stepz", ["steps", "log_every"], "train.") == " (did you mean 'train.steps'?)"
    assert closest_hint("zzz", ["steps"]) == ""


def test_normalized_loss_divides_each_term_and_guards_zero_normalizers():
    """A term with normalizer 0 has loss_sum 0 (no tokens): it adds 0, not NaN."""
    assert float(normalized_loss(jnp.array([0.0, 2.0, 3.0]), jnp.array([0.0, 4.0, 1.0]))) == 3.5


# --------------------------------------------------------------------------------------- a throwaway declared key


@pytest.fixture
def throwaway_keys(monkeypatch):
    """``train.warp`` (bounded), ``train.mode`` (choices) and ``objective.perce.knob`` added to copies of the real
    declarations."""
    Train = dataclasses.make_dataclass(
        "Train", [("warp", int, key(3, "a throwaway bounded key", bound=Bound(1))),
                  ("mode", str, key("a", "a throwaway key with choices", choices=("a", "b")))],
        bases=(config.TrainSpec,), frozen=True)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Tuned(PerCE):
        knob: float = key(0.5, "a throwaway hyper-parameter", bound=UNIT)

    monkeypatch.setitem(config.SECTIONS, "train", Train)
    monkeypatch.setitem(registry.OBJECTIVES, "perce", Tuned)


def test_a_new_key_is_in_the_default_config(throwaway_keys):
    for cfg in (default_config(), load_config(BASE)):
        assert (cfg.train.warp, cfg.train.mode, cfg.objective.perce.knob) == (3, "a", 0.5)
        assert cfg.train.steps == 100  # the rest of the section is still there


def test_a_new_key_is_read_and_typed(throwaway_keys):
    rc = _read("--config.train.warp=7", "--config.train.mode=b", "--config.objective.perce.knob=0.25")
    assert (rc.train.warp, rc.train.mode, rc.objective.knob) == (7, "b", 0.25)


def test_a_new_key_is_validated(throwaway_keys):
    with pytest.raises(UserError, match=r"train\.warp=0: expected an integer ≥ 1"):
        _read("--config.train.warp=0")
    with pytest.raises(UserError, match=r"train\.mode='c': expected one of a, b"):
        _read("--config.train.mode=c")
    with pytest.raises(UserError, match=r"objective\.perce\.knob=2\.0: expected a number in \[0, 1\]"):
        _read("--config.objective.perce.knob=2")


def test_a_new_key_is_the_hint_for_a_typo(throwaway_keys):
    with pytest.raises(UserError, match=r"unknown key 'train\.wrap'.*did you mean 'train\.warp'"):
        load_config(BASE, ["--config.train.wrap=5"])
    cfg = load_config(BASE)
    cfg.objective.perce.knbo = 0.1
    with pytest.raises(UserError, match=r"objective\.perce\.knbo.*did you mean 'knob'"):
        RunConfig.from_config(cfg)


def test_a_new_key_is_described(throwaway_keys):
    lines = describe_keys().splitlines()
    assert "train.warp = 3 (an integer ≥ 1): a throwaway bounded key" in lines
    assert "train.mode = 'a' (one of a | b): a throwaway key with choices" in lines
    assert "objective.perce.knob = 0.5 (a number in [0, 1]): a throwaway hyper-parameter" in lines
