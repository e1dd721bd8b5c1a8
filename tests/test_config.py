"""Config files → RunConfig: every key typed and read once; typos, unknown keys and wrong types are UserErrors
that name the key (and the closest valid one), from a config file, from an override and through the CLI."""

import dataclasses
import importlib.util
import shutil
import sys
import typing
from pathlib import Path

import ml_collections
import pytest

from percausal_jax import cli
from percausal_jax.config import (SECTIONS, CheckpointSpec, DataSpec, LoraSpec, MeshSpec, ModelSpec, OptimizerSpec,
                                   RunConfig, TrainSpec, load_config)
from percausal_jax.errors import UserError
from percausal_jax.objectives import OBJECTIVES, PerCE, default_config
from percausal_jax.objectives import from_config as objective_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _leaves(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_file(tmp_path: Path, body: str, name: str = "bad.py") -> Path:
    """``tmp/configs/<name>`` starting from the base config (a copy of configs/base.py sits next to it, so
    ``from configs.base import ...`` resolves to the same base whichever ``configs`` package is found)."""
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    shutil.copy(CONFIGS / "base.py", folder / "base.py")
    lines = "\n".join("    " + line for line in body.strip().splitlines())
    path = folder / name
    path.write_text("import ml_collections\n\nfrom configs.base import get_config as base\n\n\n"
                    f"def get_config():\n    c = base()\n{lines}\n    return c\n")
    return path


def _from_file(path: Path, overrides=()) -> RunConfig:
    return RunConfig.from_config(load_config(str(path), list(overrides)), where=str(path))


# configs/base.py's values, written out by hand (the objectives' as README's objective table documents them), not read
# back from the code that builds them: ``objective`` is ``objectives.default_config()``, itself made of the
# dataclasses' defaults, so comparing either with the other would pass whatever the defaults were
BASE_OBJECTIVE_BLOCK = {
    "name": "perce", "vocab_chunk_size": 8192,
    "ce": {"per_sequence": False},
    "perce": {"per_sequence": False, "clip_min": 0.8, "clip_max": 5.0},
    "nextquill": {"delta": 0.05, "high": 0.9, "low": 0.1, "alpha": 0.1, "weighted_lp": False,
                  "fixed_theta_d": False, "per_sequence": False, "reference_model": ""},
    "lossce": {"keep_frac": 0.6, "reference_model": ""},
    "entce": {"per_sequence": False, "max_weight": 5.0},
}
BASE_RUN_CONFIG = RunConfig(
    seed=0,
    model=ModelSpec(path="embedded", dtype="float32", compute_dtype="float32", scan_layers=True, remat_policy="none",
                    attention_impl="auto"),
    data=DataSpec(train="", eval="", shuffle=True, template="chat", counterfactual_mode="drop", retriever="bm25",
                  retriever_path="", retriever_revision="", strict=False, task="", k=4, max_prompt_len=1024,
                  max_response_len=512, truncate_response=True, budget_mode="drop", packing=False,
                  pack_personal_len=0, pack_counterfactual_len=0, pack_response_len=0, pack_lookahead=64,
                  bucket_multiple=64, separator="\n", enable_thinking=False),
    objective=PerCE(per_sequence=False, clip_min=0.8, clip_max=5.0),
    vocab_chunk_size=8192,
    train=TrainSpec(steps=100, global_batch_size=8, grad_accum_steps=1, log_every=1, eval_every=0, eval_batches=4,
                    nan_policy="skip", peak_tflops=0.0),
    optimizer=OptimizerSpec(name="adamw", lr=2e-5, schedule="cosine", warmup_steps=0, warmup_ratio=0.03,
                            min_lr_ratio=0.0, weight_decay=0.0, grad_clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8,
                            momentum=0.0),
    lora=LoraSpec(rank=0, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")),
    checkpoint=CheckpointSpec(every_steps=100, keep=3),
    mesh=MeshSpec(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1),
)


def _typed_equal(a, b) -> bool:
    """Equal, and of the same types all the way down (5.0 is not 5, a tuple is not a list)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_typed_equal(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return type(a) is type(b) and all(_typed_equal(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a) if f.compare)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_typed_equal, a, b))
    return type(a) is type(b) and a == b


def test_base_config_loads_into_the_documented_values():
    """Every key of configs/base.py lands in its typed field with the value written above."""
    cfg = load_config(str(CONFIGS / "base.py"))
    rc = RunConfig.from_config(cfg, where="configs/base.py")
    assert rc == BASE_RUN_CONFIG
    assert _typed_equal(rc, BASE_RUN_CONFIG)
    assert _typed_equal(cfg.objective.to_dict(), BASE_OBJECTIVE_BLOCK)


@pytest.mark.parametrize("name", ["ce", "perce", "nextquill", "lossce", "entce"])
def test_objective_defaults_are_the_documented_values(name):
    """``objectives.default_config()`` (the ``objective`` block of every config) holds the hand-written values, and
    selecting a method from it gives an objective with exactly those hyper-parameters."""
    block = default_config()
    assert _typed_equal(block.to_dict(), BASE_OBJECTIVE_BLOCK)
    block.name = name
    obj = objective_from_config(block)
    assert type(obj) is OBJECTIVES[name] and obj.name == name
    assert _typed_equal({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, BASE_OBJECTIVE_BLOCK[name])


def test_every_base_key_maps_to_exactly_one_field_and_back():
    """The leaf keys of configs/base.py and the fields of RunConfig (sections, objective dataclasses) coincide."""
    hints = typing.get_type_hints(RunConfig)
    fields = []
    for f in dataclasses.fields(RunConfig):
        kind = hints[f.name]
        if f.name == "source":
            continue
        if dataclasses.is_dataclass(kind):
            fields += [f"{f.name}.{sub.name}" for sub in dataclasses.fields(kind)]
        elif f.name == "objective":  # the name picks the class; each method's dataclass fields are its block
            fields.append("objective.name")
            for name, cls in OBJECTIVES.items():
                fields += [f"objective.{name}.{sub.name}" for sub in dataclasses.fields(cls)]
        elif f.name == "vocab_chunk_size":
            fields.append("objective.vocab_chunk_size")
        else:
            fields.append(f.name)
    assert len(fields) == len(set(fields))  # no config key feeds two fields
    keys = set(_leaves(load_config(str(CONFIGS / "base.py"))))
    assert keys - set(fields) == set(), "keys of configs/base.py that no RunConfig field reads"
    assert set(fields) - keys == set(), "RunConfig fields without a key in configs/base.py"
    assert {f.name for f in dataclasses.fields(RunConfig)} - {"source"} == (
        set(SECTIONS) | {"seed", "objective", "vocab_chunk_size"})


def _shipped():
    out = []
    for path in sorted(CONFIGS.glob("*.py")):
        out.append(str(path))
        spec = importlib.util.spec_from_file_location(f"_shipped_{path.stem}", path)
        src = path.read_text()
        if "def get_config(arg" in src:  # parameterized configs: every argument they accept
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(ROOT))
            try:
                spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(ROOT))
            out += [f"{path}:{t},{m}" for t in module.TASKS for m in module.MODELS]
    return out


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: Path(p).name)
def test_every_shipped_config_builds_a_run_config(path):
    rc = RunConfig.from_config(load_config(path), where=path)
    assert rc.train.steps > 0 and rc.objective.name in OBJECTIVES
    assert rc.source["objective"]["name"] == rc.objective.name


def test_typo_in_a_section_key_names_it_and_the_right_one(tmp_path):
    path = _config_file(tmp_path, 'c.data.retreiver = "bm25"')
    with pytest.raises(UserError) as e:
        _from_file(path)
    msg = str(e.value)
    assert "data.retreiver" in msg and "data.retriever" in msg.replace("data.retreiver", "")
    assert str(path) in msg


def test_unknown_top_level_key(tmp_path):
    path = _config_file(tmp_path, "c.sede = 3")
    with pytest.raises(UserError, match=r"unknown key 'sede'.*'seed'"):
        _from_file(path)
    path = _config_file(tmp_path, "c.optimiser = ml_collections.ConfigDict({'lr': 1e-3})", "bad2.py")
    with pytest.raises(UserError, match=r"unknown key 'optimiser'.*'optimizer'"):
        _from_file(path)


@pytest.mark.parametrize("override,named,closest", [
    ("--config.data.retreiver=bm25", "data.retreiver", "data.retriever"),
    ("--config.optimizer.learning_rate=1e-3", "optimizer.learning_rate", None),
    ("--config.trian.steps=3", "trian", "train"),
    ("--config.objective.perce.clip_mn=0.5", "objective.perce.clip_mn", "objective.perce.clip_min"),
])
def test_unknown_override_names_the_key_and_the_closest(tmp_path, override, named, closest):
    with pytest.raises(UserError) as e:
        load_config(str(CONFIGS / "tiny.py"), [override])
    msg = str(e.value)
    assert f"'{named}'" in msg
    if closest is not None:
        assert f"'{closest}'" in msg


def test_known_override_is_typed_like_the_base_value():
    cfg = load_config(str(CONFIGS / "tiny.py"), ["--config.train.steps=7", "--config.optimizer.lr=0.25",
                                                  "--config.data.shuffle=false", "--config.lora.targets=q_proj,v_proj"])
    rc = RunConfig.from_config(cfg)
    assert (rc.train.steps, rc.optimizer.lr, rc.data.shuffle, rc.lora.targets) == (7, 0.25, False,
                                                                                     ("q_proj", "v_proj"))


def test_data_settings_reach_the_featurizer():
    """data.separator / data.enable_thinking / data.truncate_response (base defaults and overrides) are what the
    training featurizer gets."""
    fcfg = RunConfig.from_config(load_config(str(CONFIGS / "base.py"))).data.featurize(0)
    assert (fcfg.separator, fcfg.enable_thinking, fcfg.truncate_response) == ("\n", False, True)
    cfg = load_config(str(CONFIGS / "tiny.py"), ["--config.data.enable_thinking=true", "--config.data.separator= A:",
                                                  "--config.data.truncate_response=false"])
    fcfg = RunConfig.from_config(cfg).data.featurize(3)
    assert (fcfg.separator, fcfg.enable_thinking, fcfg.truncate_response, fcfg.seed) == (" A:", True, False, 3)


@pytest.mark.parametrize("key,value", [("train.steps", '"100"'), ("data.shuffle", '"yes"'),
                                       ("data.separator", "1"), ("data.enable_thinking", '"no"'),
                                       ("objective.perce.clip_min", '"low"')])
def test_wrong_type_in_a_config_file_names_the_key(tmp_path, key, value):
    """A config file assigning a value of the wrong type (ml_collections rejects it inside get_config)."""
    path = _config_file(tmp_path, f"c.{key} = {value}")
    with pytest.raises(UserError) as e:
        _from_file(path)
    assert key in str(e.value)


def test_wrong_type_in_a_replaced_section_names_the_key(tmp_path):
    """A section rebuilt as a fresh ConfigDict (no ml_collections type check): the RunConfig reader catches it."""
    path = _config_file(tmp_path, 'c.train = ml_collections.ConfigDict({**c.train.to_dict(), "steps": "100"})')
    with pytest.raises(UserError, match=r"train\.steps='100': expected int"):
        _from_file(path)


def test_wrong_type_in_an_override_names_the_key():
    with pytest.raises(UserError, match=r"--config\.train\.steps=ten: expected a int"):
        load_config(str(CONFIGS / "tiny.py"), ["--config.train.steps=ten"])
    with pytest.raises(UserError, match=r"--config\.objective\.perce\.clip_min=low: expected a float"):
        load_config(str(CONFIGS / "tiny.py"), ["--config.objective.perce.clip_min=low"])


def test_unknown_objective_hyperparameter_names_the_key(tmp_path):
    path = _config_file(tmp_path, "c.objective.perce.clip_mn = 0.5")
    with pytest.raises(UserError, match=r"objective\.perce\.clip_mn.*'clip_min'"):
        _from_file(path)
    # a typo in the block of a method that is not the active one is an error too, not silently ignored
    path = _config_file(tmp_path, 'c.objective.name = "ce"\nc.objective.nextquill.detla = 0.1', "bad4.py")
    with pytest.raises(UserError, match=r"objective\.nextquill\.detla.*'delta'"):
        _from_file(path)


def test_cli_unknown_override_is_one_line_and_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    rc = cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(workdir),
                   "--config.data.retreiver=bm25"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "data.retreiver" in lines[0] and "data.retriever" in lines[0].replace("data.retreiver", "")
    assert not workdir.exists() or not any(workdir.iterdir())
