"""Configs: loading an ml-collections config file plus ``--config.a.b=value`` overrides, with clear errors, and
reading it once into the typed :class:`RunConfig` that every command builds its run from."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import ml_collections

from percausal_jax.errors import UserError


def load_config(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Imports ``path`` (a Python file with ``get_config()``; ``file.py:arg`` calls ``get_config("arg")``) and
    applies ``a.b=value`` overrides (typed like the existing value; unknown keys are an error)."""
    path, _, arg = str(path).partition(":")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    root = str(p.resolve().parent.parent)  # so `from configs.base import ...` works from the repository
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location(f"_percausal_config_{p.stem}", p)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: no get_config() function")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}:{arg}: {e}") from None
    except TypeError as e:  # ConfigDict is typed: `c.train.steps = "100"` in the file
        raise UserError(f"{_config_line(e, p)}: {e} (the value's type must match configs/base.py)") from None
    for item in overrides:
        apply_override(cfg, item, source=path)
    return cfg


def _config_line(error: BaseException, file: Path) -> str:
    """``file:line: source`` of the config-file line that raised ``error`` (or just the file)."""
    import linecache
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == file.resolve()]
    if not frames:
        return str(file)
    line = linecache.getline(str(file), frames[-1].lineno).strip()
    return f"{file}:{frames[-1].lineno}: `{line}`"


def apply_override(cfg: ml_collections.ConfigDict, item: str, source: str = "") -> str:
    """Sets ``a.b=value`` in ``cfg`` (typed like the existing value); returns the dotted key ``a.b``."""
    if "=" not in item:
        raise UserError(f"override {item!r}: expected --config.key=value")
    key, raw = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise UserError(f"override {item!r}: {source} has no config section '{part}'"
                            f"{_closest(part, [k for k in node.keys() if isinstance(node[k], ml_collections.ConfigDict)])}")
        node = node[part]
    if parts[-1] not in node:
        prefix = key.rpartition(".")[0]
        raise UserError(f"override {item!r}: unknown key '{key}' (not in {source})"
                        f"{_closest(parts[-1], node.keys(), prefix + '.' if prefix else '')}")
    old = node[parts[-1]]
    node[parts[-1]] = _parse(raw, old, key)
    return key


def _parse(raw: str, old, key: str):
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(old, int):
            return int(raw)
        if isinstance(old, float):
            return float(raw)
        if isinstance(old, (tuple, list)):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if old is None:
            try:
                return ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return raw
        return raw
    except ValueError:
        raise UserError(f"--config.{key}={raw}: expected a {type(old).__name__}") from None


# ------------------------------------------------------------------------------------------------ the typed config
#
# ``RunConfig.from_config(cfg)`` is the one place a ConfigDict is read: every key of ``configs/base.py`` becomes a
# typed field below (the defaults live in ``configs/base.py``; the objectives' in their dataclasses). A key that no
# field reads is an error naming it and the closest valid key; nothing below the spine sees the ConfigDict.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    path: str  # HF dir, hub id, gs:// URL, or "embedded"
    dtype: str  # parameter dtype
    compute_dtype: str
    scan_layers: bool
    remat_policy: str
    attention_impl: str


@dataclasses.dataclass(frozen=True)
class DataSpec:
    train: str
    eval: str
    shuffle: bool
    template: str
    counterfactual_mode: str
    retriever: str
    retriever_path: str
    retriever_revision: str
    strict: bool
    task: str
    k: int
    max_prompt_len: int
    max_response_len: int
    truncate_response: bool
    budget_mode: str
    packing: bool
    pack_personal_len: int  # packed row capacities (0 = derived); checked against the length limits here
    pack_counterfactual_len: int
    pack_response_len: int
    pack_lookahead: int
    bucket_multiple: int
    separator: str
    enable_thinking: bool

    def __post_init__(self):
        from percausal_jax.data.pipeline import check_packing  # UserErrors name data.pack_*

        check_packing(self.max_prompt_len, self.max_response_len, self.pack_personal_len,
                      self.pack_counterfactual_len, self.pack_response_len, self.pack_lookahead)

    def featurize(self, seed: int):
        """The featurizer's settings (validated there)."""
        from percausal_jax.data.featurize import FeaturizeConfig

        try:
            return FeaturizeConfig(template=self.template, counterfactual_mode=self.counterfactual_mode,
                                   retriever=self.retriever, k=self.k, seed=seed, max_prompt_len=self.max_prompt_len,
                                   max_response_len=self.max_response_len, budget_mode=self.budget_mode,
                                   truncate_response=self.truncate_response, separator=self.separator,
                                   enable_thinking=self.enable_thinking)
        except UserError as e:
            raise UserError(str(e).replace("featurize setting ", "data.")) from None


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int
    global_batch_size: int
    grad_accum_steps: int
    log_every: int
    eval_every: int
    eval_batches: int
    nan_policy: str
    peak_tflops: float


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float
    schedule: str
    warmup_steps: int
    warmup_ratio: float
    min_lr_ratio: float
    weight_decay: float
    grad_clip_norm: float
    b1: float
    b2: float
    eps: float
    momentum: float


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int
    keep: int


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int
    fsdp: int
    tensor: int
    dcn_data: int
    dcn_fsdp: int
    dcn_tensor: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data, self.fsdp, self.tensor

    @property
    def dcn(self) -> tuple[int, int, int]:
        return self.dcn_data, self.dcn_fsdp, self.dcn_tensor


SECTIONS = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec, "optimizer": OptimizerSpec,
            "lora": LoraSpec, "checkpoint": CheckpointSpec, "mesh": MeshSpec}
CHOICES = {"train.nan_policy": ("skip", "fail"), "model.dtype": ("float32", "bfloat16", "float16"),
           "model.compute_dtype": ("float32", "bfloat16", "float16"),
           # as models.layers.ATTENTION_IMPLEMENTATIONS (not imported: this module stays free of jax)
           "model.attention_impl": ("auto", "xla", "blocked", "cudnn", "splash")}


@dataclasses.dataclass(frozen=True)
class Bound:
    """The admissible range of a numeric key: ``low`` / ``high`` (None: unbounded), each inclusive or not."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def expected(self, value) -> str:
        kind = "an integer" if isinstance(value, int) else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '≥'} {self.low:g}"
        return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def check(self, key: str, value) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high or value != value:  # NaN is out of every range
            raise UserError(f"{key}={value!r}: expected {self.expected(value)}")


_POS, _NONNEG, _UNIT = Bound(0, low_open=True), Bound(0), Bound(0, 1)
BOUNDS = {  # every numeric key with a limited range (the mesh's -1 = "the remaining devices": _check_mesh)
    "seed": _NONNEG, "vocab_chunk_size": _NONNEG,
    "train.steps": Bound(1), "train.global_batch_size": Bound(1), "train.grad_accum_steps": Bound(1),
    "train.log_every": Bound(1), "train.eval_every": _NONNEG, "train.eval_batches": Bound(1),
    "train.peak_tflops": _NONNEG,
    "optimizer.lr": _POS, "optimizer.warmup_steps": _NONNEG, "optimizer.warmup_ratio": _UNIT,
    "optimizer.min_lr_ratio": _UNIT, "optimizer.weight_decay": _NONNEG, "optimizer.grad_clip_norm": _NONNEG,
    "optimizer.b1": Bound(0, 1, high_open=True), "optimizer.b2": Bound(0, 1, high_open=True),
    "optimizer.eps": _NONNEG, "optimizer.momentum": Bound(0, 1, high_open=True),
    "lora.rank": _NONNEG, "lora.alpha": _POS,
    "checkpoint.every_steps": Bound(1), "checkpoint.keep": Bound(1),
    "data.k": Bound(1), "data.max_prompt_len": Bound(1), "data.max_response_len": Bound(1),
    "data.pack_personal_len": _NONNEG, "data.pack_counterfactual_len": _NONNEG, "data.pack_response_len": _NONNEG,
    "data.pack_lookahead": _NONNEG, "data.bucket_multiple": Bound(1),
    "mesh.dcn_data": Bound(1), "mesh.dcn_fsdp": Bound(1), "mesh.dcn_tensor": Bound(1),
}
# the objectives' hyper-parameters with a limited range, and pairs that must be ordered (low ≤ high)
OBJECTIVE_BOUNDS = {"perce": {"clip_min": _NONNEG, "clip_max": _POS},
                    "nextquill": {"delta": _NONNEG, "high": _UNIT, "low": _UNIT, "alpha": _NONNEG},
                    "lossce": {"keep_frac": Bound(0, 1, low_open=True)}, "entce": {"max_weight": _POS}}
OBJECTIVE_ORDER = {"perce": (("clip_min", "clip_max"),), "nextquill": (("low", "high"),)}


def _check_mesh(mesh: MeshSpec) -> None:
    sizes = {f"mesh.{k}": getattr(mesh, k) for k in ("data", "fsdp", "tensor")}
    for key, n in sizes.items():
        if n != -1 and n < 1:
            raise UserError(f"{key}={n}: expected an integer ≥ 1, or -1 (the remaining devices)")
    if list(sizes.values()).count(-1) > 1:
        raise UserError(f"mesh {', '.join(f'{k}={v}' for k, v in sizes.items())}: expected at most one axis of -1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run's whole configuration, typed. ``source`` is the config as JSON (saved with checkpoints, so
    ``export`` / ``eval --workdir`` rebuild the same run)."""

    seed: int
    model: ModelSpec
    data: DataSpec
    objective: Any  # percausal_jax.objectives.Objective
    vocab_chunk_size: int
    train: TrainSpec
    optimizer: OptimizerSpec
    lora: LoraSpec
    checkpoint: CheckpointSpec
    mesh: MeshSpec
    source: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, where: str = "config") -> RunConfig:
        from percausal_jax.objectives import registry

        top = {"seed", "objective", *SECTIONS}
        for key in cfg.keys():
            if key not in top:
                raise UserError(f"{where}: unknown key '{key}'{_closest(key, top)}; the keys are those of "
                                "configs/base.py")
        missing = sorted(k for k in top if k not in cfg)
        if missing:
            raise UserError(f"{where}: missing key '{missing[0]}' (start from configs/base.py: "
                            "`from configs.base import get_config as base`)")
        sections = {name: _section(spec, cfg[name], name, where) for name, spec in SECTIONS.items()}
        objective = registry.from_config(cfg.objective, "objective")
        if "vocab_chunk_size" not in cfg.objective:
            raise UserError(f"{where}: missing key 'objective.vocab_chunk_size' (start from configs/base.py)")
        chunk = _typed(cfg.objective.vocab_chunk_size, int, "objective.vocab_chunk_size", where)
        rc = cls(seed=_typed(cfg.seed, int, "seed", where), objective=objective, vocab_chunk_size=chunk,
                 source=json.loads(cfg.to_json_best_effort()), **sections)
        rc.validate()
        return rc

    def validate(self) -> None:
        for key, bound in BOUNDS.items():
            bound.check(key, self._value(key))
        for key, bound in OBJECTIVE_BOUNDS.get(self.objective.name, {}).items():
            bound.check(f"objective.{self.objective.name}.{key}", getattr(self.objective, key))
        for low, high in OBJECTIVE_ORDER.get(self.objective.name, ()):
            a, b = getattr(self.objective, low), getattr(self.objective, high)
            if a > b:
                name = self.objective.name
                raise UserError(f"objective.{name}.{low}={a} > objective.{name}.{high}={b}: expected "
                                f"{low} ≤ {high}")
        _check_mesh(self.mesh)
        t = self.train
        if t.global_batch_size % t.grad_accum_steps:
            raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                            f"train.grad_accum_steps={t.grad_accum_steps}")
        self.data.featurize(self.seed)
        from percausal_jax.training.optim import make_optimizer

        make_optimizer(self.optimizer, t.steps)  # names a bad optimizer.name / optimizer.schedule

    def _value(self, key: str):
        node = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def with_model_path(self, path: str) -> RunConfig:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, path=str(path)))


def _section(spec: type, node, name: str, where: str):
    if not isinstance(node, ml_collections.ConfigDict):
        raise UserError(f"{where}: '{name}' must be a config section (configs/base.py), got {type(node).__name__}")
    known = {f.name: f for f in dataclasses.fields(spec)}
    for key in node.keys():
        if key not in known:
            raise UserError(f"{where}: unknown key '{name}.{key}'{_closest(key, known, name + '.')}")
    values = {}
    for key, f in known.items():
        if key not in node:
            raise UserError(f"{where}: missing key '{name}.{key}' (start from configs/base.py)")
        values[key] = _typed(node[key], f.type, f"{name}.{key}", where)
        allowed = CHOICES.get(f"{name}.{key}")
        if allowed and values[key] not in allowed:
            raise UserError(f"{where}: {name}.{key}={values[key]!r}: expected one of {', '.join(allowed)}")
    return spec(**values)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple}


def _typed(value, kind, key: str, where: str):
    kind = _TYPES.get(kind, kind) if isinstance(kind, str) else kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        return tuple(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise UserError(f"{where}: {key}={value!r}: expected {'a tuple of strings' if kind is tuple else kind.__name__}")


def _closest(key: str, candidates, prefix: str = "") -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""
