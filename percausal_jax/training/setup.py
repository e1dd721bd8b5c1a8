"""The run spine: one typed :class:`Run` built from a :class:`~percausal_jax.config.RunConfig`, for every command.

``build(rc)`` assembles, in this order: the mesh, the model (sharded straight from the checkpoint; LoRA adapters;
the trainable / frozen split), the tokenizer, the objective, the optimizer and its schedule, and from them the state
shardings, the jitted steps and the FLOP model. ``build(rc, abstract=True, devices=...)`` does the same with
``jax.ShapeDtypeStruct`` leaves (nothing allocated, no checkpoint read) for AOT planning on a TPU topology.
``train``, ``export``, ``eval``, ``score``, ``aot``, ``sweep``, the demo and ``bench/`` all start here;
:mod:`~percausal_jax.training.loop` keeps only the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from percausal_jax import storage
from percausal_jax.config import DataSpec, RunConfig
from percausal_jax.data.featurize import FeaturizeConfig
from percausal_jax.data.pipeline import make_iterator, open_source
from percausal_jax.data.records import detect_kind
from percausal_jax.data.skips import SkipReport
from percausal_jax.data.rows import ProcessRows, RowLayout, row_layout
from percausal_jax.data.retrieval import Contriever
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import load_pretrained, read_config, resolve_model_dir, to_dtype
from percausal_jax.hf.gguf import resolve_model_arg
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.decoder import CausalLM
from percausal_jax.models.lora import apply_lora
from percausal_jax.models.partitioning import make_mesh, param_sharding
from percausal_jax.objectives import Objective
from percausal_jax.training import flops, step


@dataclasses.dataclass(frozen=True)
class Reference:
    """The frozen reference of LossCE / NextQuill ``fixed_theta_d``, rebuilt identically on resume: the model named
    by ``objective.<name>.reference_model`` (its own ``graphdef``), else the trained model's initial trainable
    parameters (``graphdef`` None: merged with the trained model's layout)."""

    graphdef: Any
    params: Any


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything built from a config, before the loop starts; immutable. Abstract runs (AOT) have shapes for
    parameters and no tokenizer or files."""

    config: RunConfig
    mesh: Mesh
    model_config: ModelConfig
    graphdef: Any
    params: Any  # trainable nnx.State (jax.Array or ShapeDtypeStruct leaves)
    frozen: Any  # the rest (LoRA base), nnx.State
    tx: Any  # optax.GradientTransformation
    lr_schedule: Any
    reference: Reference | None  # None: the objective has no reference model (or an export run)
    model_source: storage.Resolved | None = None  # the base model as the user named it, its files, hub revision
    tokenizer: Any = None
    contriever: Contriever | None = None  # data.retriever="contriever", when the records need retrieval

    @property
    def objective(self) -> Objective:
        return self.config.objective

    @property
    def model_dir(self) -> Path | None:
        """The local directory with the base model's files (None for abstract runs)."""
        return None if self.model_source is None else Path(self.model_source.local)

    @property
    def featurize_config(self) -> FeaturizeConfig:
        return self.config.data.featurize(self.config.seed)

    def model(self, params=None) -> CausalLM:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.frozen)

    # ------------------------------------------------------------------------------------------ state and steps

    def init_state(self) -> step.TrainState:
        return step.init_state(self.params, self.tx, self.mesh)

    def abstract_state(self) -> step.TrainState:
        return step.abstract_state(self.params, self.tx, self.mesh)

    @property
    def reference_params(self):
        return None if self.reference is None else self.reference.params

    def train_step(self):
        """The train step, jitted with the state donated and laid out by the one sharding recipe."""
        rc = self.config
        fn = step.make_train_step(self.graphdef, self.tx, self.lr_schedule, rc.objective,
                                  grad_accum_steps=rc.train.grad_accum_steps, chunk_size=rc.vocab_chunk_size,
                                  nan_policy=rc.train.nan_policy, ref_graphdef=self.reference_graphdef)
        return step.jit_train_step(fn, self.abstract_state())

    def eval_step(self):
        return step.make_eval_step(self.graphdef, self.objective, self.config.vocab_chunk_size,
                                   self.reference_graphdef)

    @property
    def reference_graphdef(self):
        return None if self.reference is None else self.reference.graphdef

    def step_flops(self, batch: int, personal_len: int, counterfactual_len: int, response_len: int) -> float:
        return flops.step_flops(self.model_config, self.objective.requirements, batch, personal_len,
                                counterfactual_len, response_len)

    def layout(self) -> dict:
        """What a checkpoint must match to be restored into this run."""
        return layout(self.config, self.model_config)

    # ------------------------------------------------------------------------------------------------------ data

    def row_layout(self) -> RowLayout:
        """The row blocks of every global batch this process reads (:mod:`~percausal_jax.data.rows`)."""
        return row_layout(self.mesh, self.config.train.global_batch_size)

    def data_iterator(self, records, *, num_epochs=None, shuffle: bool | None = None) -> ProcessRows:
        """This process's rows of every global batch: one pipeline per row block its devices hold."""
        d, rows = self.config.data, self.row_layout()

        def block(j: int):
            return make_iterator(records, self.tokenizer, self.featurize_config, batch_size=rows.block_rows,
                                 seed=self.config.seed, block=j, num_blocks=rows.num_blocks, num_epochs=num_epochs,
                                 shuffle=d.shuffle if shuffle is None else shuffle, packing=d.packing,
                                 bucket_multiple=d.bucket_multiple, pack_personal_len=d.pack_personal_len,
                                 pack_counterfactual_len=d.pack_counterfactual_len,
                                 pack_response_len=d.pack_response_len, pack_lookahead=d.pack_lookahead,
                                 contriever=self.contriever)

        return ProcessRows({j: block(j) for j in rows.blocks}, rows.block_rows)


def layout(rc: RunConfig, model_config: ModelConfig) -> dict:
    """What a checkpoint must match to be restored into the run of ``rc`` on ``model_config``."""
    return {"model_type": model_config.model_type, "num_params": model_config.num_params(),
            "scan_layers": rc.model.scan_layers, "param_dtype": rc.model.dtype, "lora_rank": rc.lora.rank,
            "lora_quantize_base": rc.lora.quantize_base, "objective": rc.objective.name,
            "optimizer": rc.optimizer.name}


def preflight(rc: RunConfig) -> ModelConfig:
    """The cheap checks of a training run, before any data is read or weights loaded: the mesh and batch, the base
    model's config.json (a supported model_type) and that its tokenizer fits its vocabulary. Returns the model's
    architecture."""
    _check_batch(rc, _mesh(rc, False, None))
    return resolve_model(rc.model.path, f"model.path={rc.model.path}").config


def build(rc: RunConfig, *, abstract: bool = False, for_export: bool = False, devices: Sequence | None = None,
          model_config: ModelConfig | None = None, source: storage.Resolved | None = None,
          contriever: Contriever | None = None) -> Run:
    """The run of ``rc``; abstract and concrete runs differ only in where the parameters come from.

    ``abstract``: shapes only (``jax.ShapeDtypeStruct`` leaves, nothing allocated or read), on ``devices`` (e.g. a
    TPU topology's), with ``model_config`` or the config.json of ``model.path``. Otherwise the weights are read
    from ``source`` (default: ``model.path`` resolved), sharded straight from the checkpoint. ``for_export``: the
    mesh is every local device on the fsdp axis (``(1, -1, 1)``), whatever mesh the run trained on (Orbax restores
    onto any mesh), with no batch-size check and no reference model. ``contriever``: the retriever the data
    iterators use (:func:`retriever`)."""
    mesh = _mesh(rc, for_export, devices)
    if not for_export:
        _check_batch(rc, mesh)
    from percausal_jax.training.optim import make_optimizer

    tx, lr_schedule = make_optimizer(rc.optimizer, rc.train.steps)
    model, tokenizer = None, None
    if abstract:
        mc = model_config or model_config_of(rc.model.path)
        model = nnx.eval_shape(lambda: _with_lora(rc, _new_model(rc, mc, mesh)))
    else:
        resolved = resolve_model(rc.model.path, f"model.path={rc.model.path}", source)
        source, tokenizer = resolved.source, resolved.tokenizer
        model = _with_lora(rc, _load_model(rc, source, mesh))
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam if rc.lora.rank > 0 else nnx.Param, ...)
    place = functools.partial(_shard_abstract if abstract else _place, mesh=mesh, scanned=rc.model.scan_layers)
    params, frozen = place(params), place(frozen)  # (a loaded float base is in place already: a no-op for it)
    reference = None
    if rc.objective.requirements.reference and not for_export:
        name = getattr(rc.objective, "reference_model", "")
        if name and not abstract:
            reference = _load_reference(rc, name, mesh, model.config)
        else:  # the initial parameters; AOT plans use the trained model's layout as a stand-in for a separate one
            reference = Reference(None, params if abstract else jax.tree.map(jnp.copy, params))
    return Run(rc, mesh, model.config, graphdef, params, frozen, tx, lr_schedule, reference, source, tokenizer,
               contriever)


def _new_model(rc: RunConfig, mc: ModelConfig, mesh: Mesh) -> CausalLM:
    m = rc.model
    return CausalLM(mc, dtype=to_dtype(m.compute_dtype), param_dtype=to_dtype(m.dtype), scan_layers=m.scan_layers,
                    remat_policy=m.remat_policy, attention_impl=m.attention_impl, rngs=nnx.Rngs(0),
                    backend=mesh.devices.flat[0].platform)  # "auto" picks the kernel of the planned chips


def _load_model(rc: RunConfig, source: storage.Resolved, mesh: Mesh, remat: bool = True) -> CausalLM:
    m = rc.model
    return load_pretrained(source.local, dtype=m.dtype, mesh=mesh, compute_dtype=m.compute_dtype,
                           scan_layers=m.scan_layers, remat_policy=m.remat_policy if remat else "none",
                           attention_impl=m.attention_impl)


def _with_lora(rc: RunConfig, model: CausalLM) -> CausalLM:
    lora = rc.lora
    if lora.rank == 0:
        return model
    return apply_lora(model, lora.rank, lora.alpha, lora.targets, seed=rc.seed, quantize=lora.quantize_base)


def _load_reference(rc: RunConfig, name: str, mesh: Mesh, trained: ModelConfig) -> Reference:
    """The reference model ``name`` (path, gs:// or hub id), sharded on the run's mesh like the trained model; its
    vocabulary must be the trained model's (the same tokenizer scores both)."""
    model = _load_model(rc, resolve_model_dir(resolve_model_arg(name)), mesh, remat=False)
    if model.config.vocab_size != trained.vocab_size:
        raise UserError(f"objective.{rc.objective.name}.reference_model={name!r}: vocabulary of "
                        f"{model.config.vocab_size} tokens, but the trained model has {trained.vocab_size} "
                        "(a reference must share the tokenizer)")
    graphdef, state = nnx.split(model)
    return Reference(graphdef, state)


def _mesh(rc: RunConfig, for_export: bool, devices: Sequence | None) -> Mesh:
    """The run's mesh over ``devices`` (default: all of this job's), as a real run lays it out: JAX's own device
    order, or the ``mesh.dcn_*`` tiling of process groups."""
    shape, dcn = ((1, -1, 1), (1, 1, 1)) if for_export else (rc.mesh.shape, rc.mesh.dcn)
    try:
        return make_mesh(*shape, devices=devices, dcn=dcn)
    except ValueError as e:
        raise UserError(f"mesh: {e}") from None


def _check_batch(rc: RunConfig, mesh: Mesh) -> None:
    t = rc.train
    rows_per_micro = t.global_batch_size // t.grad_accum_steps
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows_per_micro % batch_devices:
        raise UserError(f"a micro-batch has {rows_per_micro} rows, not a multiple of mesh data×fsdp="
                        f"{batch_devices}")


def _place(state, mesh: Mesh, scanned: bool):
    """Puts every leaf of an nnx.State into its parameter sharding (no-op for leaves already there)."""
    flat = [(path, var.replace(jax.device_put(var[...], param_sharding(path, var.shape, mesh, scanned))))
            for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def _shard_abstract(state, mesh: Mesh, scanned: bool):
    """Every leaf of an abstract nnx.State as a ``ShapeDtypeStruct`` carrying its parameter sharding."""
    return nnx.from_flat_state([
        (p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=param_sharding(p, v.shape, mesh, scanned))))
        for p, v in nnx.to_flat_state(state)])


def model_config_of(path: str) -> ModelConfig:
    """The architecture of ``model.path`` without its weights: the config.json of a local / gs:// directory or hub
    id, else a bundled preset of the paper models."""
    from percausal_jax.models.presets import PRESETS

    try:
        resolved = storage.resolve_hf_dir(path, what="model directory", allow_patterns=["config.json"])
        return read_config(resolved.local)
    except UserError as e:
        if path not in PRESETS:
            raise UserError(f"model.path {path!r}: {e}; and not a bundled preset ({', '.join(PRESETS)})") from None
        return ModelConfig.from_hf(PRESETS[path], where=f"preset {path}")


# ------------------------------------------------------------------------------------------ models by name, data


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A model named on the command line (``--model``: HF dir, hub id, gs:// URL, ``embedded``) and its tokenizer."""

    model: CausalLM
    tokenizer: Any
    source: storage.Resolved


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A model found by :func:`resolve_model`, before its weights are read."""

    source: storage.Resolved  # where its files are, and the name and revision the user gave
    config: ModelConfig
    tokenizer: Any


def resolve_model(name: str, where: str, source: storage.Resolved | None = None) -> ResolvedModel:
    """The one way a model is found: ``name`` (HF dir, hub id, gs:// URL, GGUF, ``embedded``; or an already
    resolved ``source``) → its local files, its architecture (config.json: a supported model_type) and its tokenizer,
    which must fit its vocabulary. ``where`` names it in errors."""
    source = source or resolve_model_dir(resolve_model_arg(name))
    model_config = read_config(source.local)
    tokenizer = storage.load_tokenizer(source.local, what=f"tokenizer of {where}")
    check_tokenizer(tokenizer, model_config, where)
    return ResolvedModel(source, model_config, tokenizer)


def check_tokenizer(tokenizer, model_config: ModelConfig, where: str) -> None:
    """The tokenizer's ids must index the model's embedding (a larger, padded model vocabulary is fine)."""
    n = len(tokenizer)
    if n > model_config.vocab_size:
        raise UserError(f"{where}: its tokenizer has {n} tokens but the model's vocabulary (config.json vocab_size) "
                        f"has {model_config.vocab_size}; expected the tokenizer the model was trained with")


def pretrained(name: str, dtype: str = "float32") -> Pretrained:
    resolved = resolve_model(name, name)
    return Pretrained(load_pretrained(resolved.source.local, dtype=dtype), resolved.tokenizer, resolved.source)


def retriever(d: DataSpec, *sources) -> Contriever | None:
    """The Contriever encoder named by ``data.retriever_path`` (hub id, local or gs:// dir) when the config
    retrieves with it and the records need retrieval (canonical records; prompt records are already retrieved); a
    path set for another retriever is an error rather than silently unused."""
    if d.retriever != "contriever":
        if d.retriever_path:
            raise UserError(f"data.retriever_path={d.retriever_path!r} is only used by data.retriever='contriever' "
                            f"(this config has data.retriever={d.retriever!r}); unset it or switch the retriever")
        return None
    if not any(src is not None and len(src) and detect_kind(src[0]) == "canonical" for src in sources):
        return None
    if not d.retriever_path:
        raise UserError("data.retriever='contriever' needs data.retriever_path (a hub id such as "
                        "facebook/contriever, or a local / gs:// model directory)")
    return Contriever(d.retriever_path, revision=d.retriever_revision or None)


def open_records(d: DataSpec, path: str, key: str):
    """The records of ``data.train`` / ``data.eval`` (local or gs://), read once; every record must be of
    ``data.task`` when that is set. Records with an empty required field are skipped (``data.strict``: an error)
    and process 0 prints what was kept and skipped."""
    report = SkipReport()
    records = open_source(path, strict=d.strict, report=report)
    if jax.process_index() == 0:
        report.announce(f"{key}={path}")
    if d.task:
        for i in range(len(records)):
            task = records[i].get("task")
            if task is not None and task != d.task:
                raise UserError(f"{path}: record {records[i].get('id', i + 1)!r} is of task {task!r}, but this config "
                                f"trains data.task={d.task!r} ({key}); use the matching config or data")
    return records
