"""Configs: loading an ml-collections config file plus ``--config.a.b=value`` overrides, with clear errors, and
reading it once into the typed :class:`RunConfig` that every command builds its run from.

The typed dataclasses below are the config's only schema: each key is declared once, on its field
(:func:`~percausal_jax.schema.key`: default, help, choices or bounds), and :func:`default_config` (what
``configs/base.py`` returns), the checks of :meth:`RunConfig.from_config`, the unknown-key hints and
:func:`describe_keys` are all read from those declarations."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import ml_collections

from percausal_jax.data.featurize import FeaturizeConfig
from percausal_jax.errors import UserError
from percausal_jax.schema import (NONNEGATIVE, POSITIVE, UNIT, Bound, check_bounds, check_choice, closest_hint,
                                  config_dict, declared, describe, key, like)


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
        sections = [k for k in node.keys() if isinstance(node[k], ml_collections.ConfigDict)]
        if part not in sections:
            raise UserError(f"override {item!r}: {source} has no config section '{part}'{closest_hint(part, sections)}")
        node = node[part]
    if parts[-1] not in node:
        prefix = key.rpartition(".")[0]
        raise UserError(f"override {item!r}: unknown key '{key}' (not in {source})"
                        f"{closest_hint(parts[-1], node.keys(), prefix + '.' if prefix else '')}")
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
# ``RunConfig.from_config(cfg)`` is the one place a ConfigDict is read: every key is a field declared below with its
# default, help and admissible values (the objectives' in their dataclasses, the featurizer's settings in
# ``FeaturizeConfig``). A key that no field reads is an error naming it and the closest valid key; nothing below the
# spine sees the ConfigDict.

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    path: str = key("embedded", 'HF dir, hub id, gs:// URL, or "embedded" (SmolLM2-135M-Instruct)')
    dtype: str = key("float32", "parameter dtype (a frozen LoRA base may be bfloat16)", choices=DTYPES)
    compute_dtype: str = key("float32", "activation dtype; log-softmax is always float32", choices=DTYPES)
    scan_layers: bool = key(True, "one compiled layer body: compile time constant in depth (CPU: False steps 4-5% "
                                  "faster at 256-512 tokens; bench/RESULTS.md \"CPU profile\")")
    # as models.decoder.REMAT_POLICIES (not imported: this module stays free of jax)
    remat_policy: str = key("none", "activation rematerialization (jax.checkpoint policy) of each layer",
                            choices=("none", "full", "dots", "save_qkv_proj", "minimal"))
    # as models.layers.ATTENTION_IMPLEMENTATIONS (not imported: this module stays free of jax)
    attention_impl: str = key("auto", "auto: splash on TPU, cudnn on GPU for bf16/fp16 compute, blocked "
                                      "(flash-style tiles, no [L, L] mask) elsewhere and where those cannot run "
                                      "(models.layers.resolve_attention_impl)",
                              choices=("auto", "xla", "blocked", "cudnn", "splash"))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data keys; the featurizer's settings share ``FeaturizeConfig``'s declarations, with training defaults."""

    train: str = key("", "JSONL / parquet / ArrayRecord of canonical or prompt records")
    eval: str = key("", "evaluation records (same formats)")
    shuffle: bool = key(True, "shuffle the training records every epoch")
    template: str = like(FeaturizeConfig, "template", "chat")
    counterfactual_mode: str = like(FeaturizeConfig, "counterfactual_mode", "drop")
    retriever: str = like(FeaturizeConfig, "retriever", "bm25")
    retriever_path: str = key("", 'contriever encoder: hub id, local or gs:// dir (data.retriever="contriever")')
    retriever_revision: str = key("", 'hub revision (commit / branch) of retriever_path; "" = main')
    strict: bool = key(False, "True: a record with an empty required field is an error, not a skip")
    task: str = key("", 'every record must be of this task (e.g. product_review); "" = any')
    k: int = like(FeaturizeConfig, "k", 4, bound=Bound(1))
    max_prompt_len: int = like(FeaturizeConfig, "max_prompt_len", 1024, bound=Bound(1))
    max_response_len: int = like(FeaturizeConfig, "max_response_len", 512, bound=Bound(1))
    truncate_response: bool = like(FeaturizeConfig, "truncate_response", True)
    budget_mode: str = like(FeaturizeConfig, "budget_mode", "drop")
    packing: bool = key(False, "pack several examples per row: every batch is (B, pack_*_len) rows, one shape")
    pack_personal_len: int = key(0, "packed personal row capacity; 0 = the longest admissible example "
                                    "(max_prompt_len + max_response_len - 1) rounded up to bucket_multiple",
                                 bound=NONNEGATIVE)
    pack_counterfactual_len: int = key(0, "packed counterfactual row capacity (0 = derived, as above)",
                                       bound=NONNEGATIVE)
    pack_response_len: int = key(0, "packed response row capacity (0 = max_response_len rounded up)",
                                 bound=NONNEGATIVE)
    pack_lookahead: int = key(64, "examples kept pending for first-fit-decreasing placement (0 = first fit in "
                                  "order)", bound=NONNEGATIVE)
    bucket_multiple: int = key(64, "sequence lengths are padded to a multiple of this", bound=Bound(1))
    separator: str = like(FeaturizeConfig, "separator", "\n")
    enable_thinking: bool = like(FeaturizeConfig, "enable_thinking", False)

    def featurize(self, seed: int) -> FeaturizeConfig:
        """The featurizer's settings (validated there)."""
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
    steps: int = key(100, "optimizer steps", bound=Bound(1))
    global_batch_size: int = key(8, "examples per step, over all devices and micro-batches", bound=Bound(1))
    grad_accum_steps: int = key(1, "micro-batches per step (divides global_batch_size)", bound=Bound(1))
    log_every: int = key(1, "steps between metric lines", bound=Bound(1))
    eval_every: int = key(0, "steps between evaluations; 0 = only at the end (when data.eval is set)",
                          bound=NONNEGATIVE)
    eval_batches: int = key(4, "batches per evaluation", bound=Bound(1))
    nan_policy: str = key("skip", "a non-finite loss: skip the update, or fail the run", choices=("skip", "fail"))
    peak_tflops: float = key(0.0, "per device, for the MFU estimate (0 = not reported)", bound=NONNEGATIVE)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    # training.optim builds from these choices (OPTIMIZERS, SCHEDULES)
    name: str = key("adamw", "the optimizer", choices=("adamw", "sgd", "adafactor"))
    lr: float = key(2e-5, "peak learning rate", bound=POSITIVE)
    schedule: str = key("cosine", "decay after warm-up, to min_lr_ratio·lr", choices=("constant", "linear", "cosine"))
    warmup_steps: int = key(0, "linear warm-up from 0 (0 = warmup_ratio of the run)", bound=NONNEGATIVE)
    warmup_ratio: float = key(0.03, "warm-up as a fraction of the run, when warmup_steps is 0", bound=UNIT)
    min_lr_ratio: float = key(0.0, "final learning rate as a fraction of lr", bound=UNIT)
    weight_decay: float = key(0.0, "decoupled weight decay (not of biases and norm scales)", bound=NONNEGATIVE)
    grad_clip_norm: float = key(1.0, "global gradient-norm clip (0 = off)", bound=NONNEGATIVE)
    b1: float = key(0.9, "adamw β1", bound=Bound(0, 1, high_open=True))
    b2: float = key(0.999, "adamw β2", bound=Bound(0, 1, high_open=True))
    eps: float = key(1e-8, "adamw ε", bound=NONNEGATIVE)
    momentum: float = key(0.0, "sgd momentum (0 = none)", bound=Bound(0, 1, high_open=True))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = key(0, "LoRA rank; 0 = full fine-tuning", bound=NONNEGATIVE)
    alpha: float = key(16.0, "LoRA scale numerator (scale = alpha / rank)", bound=POSITIVE)
    targets: tuple[str, ...] = key(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                   "projections that get adapters")
    # as models.qlora.QUANTIZE_BASE (not imported: this module stays free of jax)
    quantize_base: str = key("none", "QLoRA: the frozen base kernels of the adapted projections stored as int8 "
                                     "(per-column absmax) or nf4 (64-row blocks, 0.56 bytes per weight); adapters "
                                     "stay float (needs lora.rank > 0)", choices=("none", "int8", "nf4"))


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int = key(100, "steps between checkpoints", bound=Bound(1))
    keep: int = key(3, "checkpoints kept", bound=Bound(1))


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int = key(1, "data-parallel axis size (-1 fills the remaining devices)")
    fsdp: int = key(-1, "fully sharded data-parallel axis size (-1 fills the remaining devices)")
    tensor: int = key(1, "tensor-parallel axis size (-1 fills the remaining devices)")
    # ranks of each axis across processes (hosts), the rest within one (MaxText's dcn_*_parallelism). All 1: JAX's
    # own device order. E.g. tensor=2, dcn_tensor=2: every tensor pair spans two hosts.
    dcn_data: int = key(1, "ranks of the data axis across processes (hosts)", bound=Bound(1))
    dcn_fsdp: int = key(1, "ranks of the fsdp axis across processes (hosts)", bound=Bound(1))
    dcn_tensor: int = key(1, "ranks of the tensor axis across processes (e.g. 2 with tensor=2: every tensor pair "
                             "spans two hosts)", bound=Bound(1))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data, self.fsdp, self.tensor

    @property
    def dcn(self) -> tuple[int, int, int]:
        return self.dcn_data, self.dcn_fsdp, self.dcn_tensor


SECTIONS = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec, "optimizer": OptimizerSpec,
            "lora": LoraSpec, "checkpoint": CheckpointSpec, "mesh": MeshSpec}
CHOICES = {name: f.metadata["choices"] for section, spec in SECTIONS.items()  # a view of the declarations
           for name, f in declared(spec, section + ".") if f.metadata["choices"]}


def _check_mesh(mesh: MeshSpec) -> None:
    sizes = {f"mesh.{k}": getattr(mesh, k) for k in ("data", "fsdp", "tensor")}
    for key, n in sizes.items():
        if n != -1 and n < 1:
            raise UserError(f"{key}={n}: expected an integer ≥ 1, or -1 (the remaining devices)")
    if list(sizes.values()).count(-1) > 1:
        raise UserError(f"mesh {', '.join(f'{k}={v}' for k, v in sizes.items())}: expected at most one axis of -1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A training run's whole configuration, typed. ``source`` is the config as JSON (saved with checkpoints, so
    ``export`` / ``eval --workdir`` rebuild the same run)."""

    seed: int = key(0, "seeds the LoRA initialization, the data order and the random retriever", bound=NONNEGATIVE)
    model: ModelSpec
    data: DataSpec
    objective: Any  # percausal_jax.objectives.Objective: the objective block (objectives.registry)
    vocab_chunk_size: int  # objective.vocab_chunk_size (declared in objectives.registry.Block)
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
                raise UserError(f"{where}: unknown key '{key}'{closest_hint(key, top)}; the keys are those of "
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
        """The declared bounds of every key, then the constraints between keys."""
        from percausal_jax.data.shapes import check_packing  # UserErrors name data.pack_*
        from percausal_jax.objectives.registry import Block

        d = self.data
        check_packing(d.max_prompt_len, d.max_response_len, d.pack_personal_len, d.pack_counterfactual_len,
                      d.pack_response_len, d.pack_lookahead)
        check_bounds(self)
        for name in SECTIONS:
            check_bounds(getattr(self, name), name + ".")
        check_bounds(Block(name=self.objective.name, vocab_chunk_size=self.vocab_chunk_size), "objective.")
        check_bounds(self.objective, f"objective.{self.objective.name}.")
        _check_ordered(self.objective)
        _check_mesh(self.mesh)
        if self.lora.quantize_base != "none" and self.lora.rank == 0:
            raise UserError(f"lora.quantize_base={self.lora.quantize_base!r} quantizes the frozen base of a LoRA "
                            "run: set lora.rank > 0 (full fine-tuning trains every weight in float)")
        t = self.train
        if t.global_batch_size % t.grad_accum_steps:
            raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                            f"train.grad_accum_steps={t.grad_accum_steps}")
        d.featurize(self.seed)

    def with_model_path(self, path: str) -> RunConfig:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, path=str(path)))


def _check_ordered(objective) -> None:
    """The objective's ordered pairs of hyper-parameters (``Objective.ordered``): low ≤ high."""
    name = objective.name
    for low, high in type(objective).ordered:
        a, b = getattr(objective, low), getattr(objective, high)
        if a > b:
            raise UserError(f"objective.{name}.{low}={a} > objective.{name}.{high}={b}: expected {low} ≤ {high}")


def _section(spec: type, node, name: str, where: str):
    if not isinstance(node, ml_collections.ConfigDict):
        raise UserError(f"{where}: '{name}' must be a config section (configs/base.py), got {type(node).__name__}")
    known = {f.name: f for f in dataclasses.fields(spec)}
    for key in node.keys():
        if key not in known:
            raise UserError(f"{where}: unknown key '{name}.{key}'{closest_hint(key, known, name + '.')}")
    values = {}
    for key, f in known.items():
        if key not in node:
            raise UserError(f"{where}: missing key '{name}.{key}' (start from configs/base.py)")
        values[key] = _typed(node[key], f.type, f"{name}.{key}", where)
        check_choice(f"{name}.{key}", values[key], f, where)
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


# ------------------------------------------------------------------------------------------------ derived views


def declarations() -> list[tuple[str, dataclasses.Field]]:
    """Every key of the config, dotted, with the field that declares it, in ``configs/base.py``'s order."""
    from percausal_jax.objectives import registry

    out = []
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            out += declared(SECTIONS[f.name], f.name + ".")
        elif f.name == "objective":
            out += registry.declarations("objective.")
        elif "help" in f.metadata:
            out.append((f.name, f))
    return out


def default_config() -> ml_collections.ConfigDict:
    """The config of every key at its declared default: ``configs/base.py``'s ``get_config()``."""
    return config_dict((name, f.default) for name, f in declarations())


def describe_keys() -> str:
    """One line per key: ``key = default (admissible values): help`` (for ``--help`` texts)."""
    return "\n".join(describe(name, f) for name, f in declarations())
