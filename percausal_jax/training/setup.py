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
from percausal_jax.data.records import SkipReport, detect_kind
from percausal_jax.data.rows import ProcessRows, RowLayout, row_layout
from percausal_jax.data.retrieval import Contriever
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import load_pretrained, read_config, resolve_model_dir, to_dtype
from percausal_jax.hf.gguf import resolve_model_arg
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.decoder import CausalLM
from percausal_jax.models.lora import apply_lora
from percausal_jax.models.partitioning import MESH_AXES, make_mesh, param_sharding
from percausal_jax.objectives import Objective
from percausal_jax.training import flops, step


@dataclasses.dataclass
class Run:
    """Everything built from a config, before the loop starts. Abstract runs (AOT) have no tokenizer or files."""

    config: RunConfig
    mesh: Mesh
    model_config: ModelConfig
    graphdef: Any
    params: Any  # trainable nnx.State (jax.Array or ShapeDtypeStruct leaves)
    frozen: Any  # the rest (LoRA base), nnx.State
    tx: Any  # optax.GradientTransformation
    lr_schedule: Any
    model_dir: Path | None = None  # local directory with the base model's files
    model_source: storage.Resolved | None = None  # the base model as the user named it + hub revision
    tokenizer: Any = None
    contriever: Contriever | None = None  # data.retriever="contriever", when the records need retrieval
    eval_records: Any = None  # data.eval, read once
    _reference: Any = None  # (graphdef, state) of objective.<name>.reference_model, loaded on first use

    @property
    def objective(self) -> Objective:
        return self.config.objective

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

    def reference_params(self):
        """The frozen reference of LossCE / NextQuill ``fixed_theta_d``, rebuilt identically on resume (None when
        the objective has none): the model named by ``objective.<name>.reference_model``, else the initial
        trainable parameters."""
        if not self.objective.requirements.reference:
            return None
        separate = self._separate_reference()
        return jax.tree.map(jnp.copy, self.params) if separate is None else separate[1]

    @property
    def reference_graphdef(self):
        """Layout of a separate reference model (None: the reference has the trained model's layout)."""
        separate = self._separate_reference()
        return None if separate is None else separate[0]

    def _separate_reference(self):
        """``(graphdef, state)`` of ``objective.<name>.reference_model``, loaded once; None when not set, and for
        abstract runs (AOT plans use the trained model's layout as a stand-in)."""
        name = getattr(self.objective, "reference_model", "")
        if not name or not self.objective.requirements.reference or self.model_dir is None:
            return None
        if self._reference is None:
            self._reference = _load_reference(self, name)
        return self._reference

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
            "objective": rc.objective.name, "optimizer": rc.optimizer.name}


def preflight(rc: RunConfig) -> ModelConfig:
    """The cheap checks of a training run, before any data is read or weights loaded: the mesh and batch, the base
    model's config.json (a supported model_type) and that its tokenizer fits its vocabulary. Returns the model's
    architecture."""
    _check_batch(rc, _mesh(rc, False, None))
    source = resolve_model_dir(resolve_model_arg(rc.model.path))
    model_config = read_config(source.local)
    tokenizer = storage.load_tokenizer(source.local, what=f"tokenizer of model.path={rc.model.path}")
    check_tokenizer(tokenizer, model_config, f"model.path={rc.model.path}")
    return model_config


def build(rc: RunConfig, *, abstract: bool = False, for_export: bool = False, devices: Sequence | None = None,
          model_config: ModelConfig | None = None) -> Run:
    """The run of ``rc``. ``for_export``: the mesh is every local device on the fsdp axis (``(1, -1, 1)``), whatever
    mesh the run trained on (Orbax restores onto any mesh), and no batch-size check applies. ``abstract``: shapes
    only, on ``devices`` (e.g. a TPU topology's), with ``model_config`` or the config.json of ``model.path``."""
    mesh = _mesh(rc, for_export, devices)
    if not for_export:
        _check_batch(rc, mesh)
    from percausal_jax.training.optim import make_optimizer

    tx, lr_schedule = make_optimizer(rc.optimizer, rc.train.steps)
    if abstract:
        mc = model_config or model_config_of(rc.model.path)
        graphdef, params, frozen = _abstract_model(rc, mc, mesh)
        return Run(rc, mesh, mc, graphdef, params, frozen, tx, lr_schedule)
    source = resolve_model_dir(resolve_model_arg(rc.model.path))
    tokenizer = storage.load_tokenizer(source.local, what=f"tokenizer of model.path={rc.model.path}")
    check_tokenizer(tokenizer, read_config(source.local), f"model.path={rc.model.path}")
    m = rc.model
    model = load_pretrained(source.local, dtype=m.dtype, mesh=mesh, compute_dtype=m.compute_dtype,
                            scan_layers=m.scan_layers, remat_policy=m.remat_policy, attention_impl=m.attention_impl)
    if rc.lora.rank > 0:
        apply_lora(model, rc.lora.rank, rc.lora.alpha, rc.lora.targets, seed=rc.seed)
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam if rc.lora.rank > 0 else nnx.Param, ...)
    params = _place(params, mesh, m.scan_layers)
    return Run(rc, mesh, model.config, graphdef, params, frozen, tx, lr_schedule, source.local, source, tokenizer)


def _load_reference(run: Run, name: str):
    """``(graphdef, state)`` of the reference model ``name`` (path, gs:// or hub id), sharded on the run's mesh
    like the trained model; its vocabulary must be the trained model's (the same tokenizer scores both)."""
    m = run.config.model
    source = resolve_model_dir(resolve_model_arg(name))
    model = load_pretrained(source.local, dtype=m.dtype, mesh=run.mesh, compute_dtype=m.compute_dtype,
                            scan_layers=m.scan_layers, attention_impl=m.attention_impl)
    if model.config.vocab_size != run.model_config.vocab_size:
        raise UserError(f"objective.{run.objective.name}.reference_model={name!r}: vocabulary of "
                        f"{model.config.vocab_size} tokens, but the trained model has {run.model_config.vocab_size} "
                        "(a reference must share the tokenizer)")
    graphdef, state = nnx.split(model)
    return graphdef, state


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


def _abstract_model(rc: RunConfig, mc: ModelConfig, mesh: Mesh):
    m = rc.model

    def create():
        model = CausalLM(mc, dtype=to_dtype(m.compute_dtype), param_dtype=to_dtype(m.dtype), scan_layers=m.scan_layers,
                         remat_policy=m.remat_policy, attention_impl=m.attention_impl, rngs=nnx.Rngs(0),
                         backend=mesh.devices.flat[0].platform)  # "auto" picks the kernel of the planned chips
        return apply_lora(model, rc.lora.rank, rc.lora.alpha, rc.lora.targets) if rc.lora.rank > 0 else model

    graphdef, params, frozen = nnx.split(nnx.eval_shape(create), nnx.LoRAParam if rc.lora.rank > 0 else nnx.Param,
                                         ...)

    def shard(state):
        return nnx.from_flat_state([
            (p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype,
                                               sharding=param_sharding(p, v.shape, mesh, m.scan_layers))))
            for p, v in nnx.to_flat_state(state)])

    return graphdef, shard(params), shard(frozen)


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


@dataclasses.dataclass
class Pretrained:
    """A model named on the command line (``--model``: HF dir, hub id, gs:// URL, ``embedded``) and its tokenizer."""

    model: CausalLM
    tokenizer: Any
    source: storage.Resolved


def check_tokenizer(tokenizer, model_config: ModelConfig, where: str) -> None:
    """The tokenizer's ids must index the model's embedding (a larger, padded model vocabulary is fine)."""
    n = len(tokenizer)
    if n > model_config.vocab_size:
        raise UserError(f"{where}: its tokenizer has {n} tokens but the model's vocabulary (config.json vocab_size) "
                        f"has {model_config.vocab_size}; expected the tokenizer the model was trained with")


def pretrained(name: str, dtype: str = "float32") -> Pretrained:
    source = resolve_model_dir(resolve_model_arg(name))
    tokenizer = storage.load_tokenizer(source.local, what=f"tokenizer of {name}")
    check_tokenizer(tokenizer, read_config(source.local), name)
    return Pretrained(load_pretrained(source.local, dtype=dtype), tokenizer, source)


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
