"""Checkpoint → model: rebuild the run's model from its saved config and restore the trained parameters, on
whatever devices this machine has (a run trained on a pod slice, or with ``mesh.tensor=2``, restores onto one
CPU), from a local or ``gs://`` workdir, with the base model found where it is now."""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import ml_collections
from flax import nnx

from percausal_jax import storage
from percausal_jax.config import apply_override
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import resolve_model_dir, save_pretrained, weights_fingerprint
from percausal_jax.hf.gguf import resolve_model_arg
from percausal_jax.models.lora import merge_lora
from percausal_jax.config import RunConfig
from percausal_jax.training import checkpoints, setup

FORMS = ("full", "merged", "peft")


def _check_workdir(workdir: storage.PathLike) -> None:
    """Before Orbax sees it (its manager would create a missing directory)."""
    root = storage.path(workdir)
    if not root.is_dir():
        raise UserError(f"{workdir}: no such run directory")
    if not checkpoints.directory(workdir).is_dir():
        raise UserError(f"{workdir}: no checkpoint found (no checkpoints/ directory: not a training run, or it "
                        "stopped before its first checkpoint)")


def base_model(meta: dict, model_path: str | None = None, workdir: storage.PathLike = "") -> storage.Resolved:
    """The run's base model on this machine: ``model_path`` (an override) if given; else the directory the run
    trained from (``meta["model_dir"]``) when it exists here; else ``meta["model_path"]`` (as the user named it:
    hub id at the recorded commit, path or ``gs://`` URL) resolved again. ``name`` is how the user named it."""
    if model_path is not None:
        src = resolve_model_dir(resolve_model_arg(model_path))
        return storage.Resolved(model_path, src.local, src.revision)
    trained_dir = meta.get("model_dir")
    name = meta.get("model_path") or trained_dir
    revision = meta.get("model_revision")
    if trained_dir and not storage.is_remote(trained_dir) and pathlib.Path(trained_dir, "config.json").is_file():
        return storage.Resolved(name, pathlib.Path(trained_dir), revision)
    if not name:
        raise UserError(f"{workdir}: the checkpoint does not record its base model; pass --config.model.path=DIR")
    try:
        src = storage.resolve_hf_dir(resolve_model_arg(name), what="model directory",
                                     allow_patterns=storage.MODEL_PATTERNS, revision=revision)
    except UserError as e:
        raise UserError(f"{workdir}: the run's base model is not on this machine (trained from {trained_dir}; "
                        f"model.path={name}); pass --config.model.path=DIR --base-moved (a DIR with the same "
                        f"weights). {e}") from None
    return storage.Resolved(name, src.local, revision or src.revision)


def restore_model(workdir: storage.PathLike, step: int | None = None, overrides: Sequence[str] = (),
                  base_moved: bool = False):
    """Returns ``(model, run, run_config, step)`` with the trained parameters of ``step`` (default: latest).

    ``overrides``: ``--config.a.b=v`` items applied to the run's saved config (e.g. ``model.path`` when the base
    model moved). The model is built on every local device (fsdp axis), whatever mesh the run trained on.
    ``run.model_source`` names the base model as the user did (for exports), with its local directory.
    The base found must hold the weights the run trained on (:func:`checkpoints.check_base`): another fingerprint
    is an error; the same weights under another name (a ``model.path`` override) need ``base_moved``."""
    _check_workdir(workdir)
    meta, step = checkpoints.read_meta(workdir, step)
    cfg = ml_collections.ConfigDict(meta["config"])
    path_override = None
    for item in overrides:
        if apply_override(cfg, item, source=f"the config of {workdir}") == "model.path":
            path_override = str(cfg.model.path)
    rc = RunConfig.from_config(cfg, where=f"the config of {workdir}")
    source = base_model(meta, path_override, workdir)
    current = {"model_path": source.name, "model_dir": str(pathlib.Path(source.local).resolve()),
               "model_revision": source.revision, "model_fingerprint": weights_fingerprint(source.local)}
    checkpoints.check_base(meta, current, checkpoints.directory(workdir) / str(step), base_moved)
    rc = rc.with_model_path(source.name)  # the config handed back names the model as the user did
    run = setup.build(rc, for_export=True, source=source)
    target = run.abstract_state()  # shapes and shardings (this machine's mesh) to restore into
    state, step = checkpoints.restore(checkpoints.manager(workdir, async_save=False), target, None,
                                      {**meta, "layout": run.layout()}, step)
    return nnx.merge(run.graphdef, state.params, run.frozen), run, rc, step


def export_checkpoint(workdir: storage.PathLike, out: storage.PathLike, step: int | None = None, dtype=None,
                      form: str = "full", overrides: Sequence[str] = (), base_moved: bool = False) -> storage.Path:
    """``form``: ``full`` (a full HF model; LoRA runs are merged into the base), ``merged`` (the same, and an error
    for a run without LoRA), or ``peft`` (a PEFT adapter for the base model, which it names as the user did).
    ``out``: a local directory or a ``gs://`` URL, written atomically (markers last); tokenizer files copied in.
    ``base_moved``: see :func:`restore_model`. Returns the output path."""
    if form not in FORMS:
        raise UserError(f"export form '{form}' is not one of {', '.join(FORMS)}")
    model, run, rc, _ = restore_model(workdir, step, overrides, base_moved)
    lora = rc.lora.rank > 0
    if form in ("merged", "peft") and not lora:
        raise UserError(f"{workdir}: --{'merge-lora' if form == 'merged' else 'peft'} needs a LoRA run "
                        "(this run fine-tuned all parameters); export without it")
    if form == "peft":
        if dtype is not None:
            raise UserError("--dtype applies to full exports; a PEFT adapter is written in float32")
    with checkpoints.storage_errors("writing the export", out, "nothing partial was published (markers are written "
                                    "last): make room or restore the storage and re-run the same command"):
        return _write(model, run, rc, out, form, dtype, lora)


def _write(model, run, rc, out, form: str, dtype, lora: bool) -> storage.Path:
    from percausal_jax.hf.peft import save_peft_adapter

    if form == "peft":
        return save_peft_adapter(model, out, base_model=_adapter_base_name(run.model_source), rank=rc.lora.rank,
                                 alpha=rc.lora.alpha, targets=rc.lora.targets, tokenizer_dir=run.model_dir,
                                 revision=run.model_source.revision)
    if lora:
        merge_lora(model)
    return save_pretrained(model, out, tokenizer=run.model_dir, dtype=dtype)


def _adapter_base_name(source: storage.Resolved) -> str:
    """``base_model_name_or_path``: the user's name for the base; the word ``embedded`` (ours, not a name any other
    tool resolves) becomes the converted directory."""
    return str(source.local) if source.name == "embedded" else os.fspath(source.name)
