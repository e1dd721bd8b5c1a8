"""Hugging Face checkpoints ↔ :class:`CausalLM`: ``config.json`` + safetensors, HF names as the source of truth.

The mapping is mechanical: an NNX path ``model/layers/3/self_attn/q_proj/kernel`` is the HF tensor
``model.layers.3.self_attn.q_proj.weight`` transposed; ``embedding`` and norm ``weight`` keep their layout. With
``scan_layers`` the layer index moves into a leading array axis (stacked on load, unstacked on export).

Loading is tensor by tensor through ``safe_open(...).get_slice``: with a mesh each device reads only its own slice,
so no host or device ever holds a full-size copy of a sharded parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from percausal_jax import storage
from percausal_jax.atomic import atomic_dir
from percausal_jax.errors import UserError
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.decoder import CausalLM
from percausal_jax.models.partitioning import DEFAULT_RULES, param_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# Tensors some checkpoints carry that have no parameter here (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def to_dtype(name: str | Any):
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def hf_tensor_names(path: tuple, scanned: bool, num_layers: int) -> list[str]:
    """HF tensor names stored in the NNX parameter at ``path`` (one per layer when scanned)."""
    keys = [str(k) for k in path]
    leaf = {"kernel": "weight", "embedding": "weight"}.get(keys[-1], keys[-1])
    keys[-1] = leaf
    if scanned and len(keys) > 1 and keys[0] == "model" and keys[1] == "layers":
        return [".".join(keys[:2] + [str(i)] + keys[2:]) for i in range(num_layers)]
    return [".".join(keys)]


def _transposed(path: tuple) -> bool:
    return str(path[-1]) == "kernel"


# ----------------------------------------------------------------------------------------------------- loading
def resolve_model_dir(path: str | os.PathLike) -> storage.Resolved:
    """A local directory, a ``gs://`` directory (copied to the local cache) or a hub id (``org/name``, downloaded
    with huggingface_hub: safetensors, json and tokenizer files only, never pickles)."""
    return storage.resolve_hf_dir(path, what="model directory", allow_patterns=storage.MODEL_PATTERNS)


def read_config(model_dir: Path) -> ModelConfig:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: config.json not found (expected a Hugging Face model directory)")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    return ModelConfig.from_hf(hf, where=str(cfg_path))


def _weight_map(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / f for name, f in wm.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                    "(PyTorch .bin checkpoints are not read: they are pickles)")


FINGERPRINT_SCHEME = "sha256-v1"
_WHOLE_TENSOR_BYTES = 64 << 10  # tensors up to this size are hashed whole
_WINDOWS, _WINDOW_BYTES = 32, 1 << 10  # larger ones: this many evenly spaced windows (first and last included)
_CONFIG_NOISE = ("transformers_version", "_name_or_path")  # written by whoever saved the copy, not the model


def _safetensors_header(f: Path) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file: its JSON header and where its tensor bytes begin."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        assert isinstance(header, dict)
    except FileNotFoundError:
        raise UserError(f"{f}: missing (named by model.safetensors.index.json)") from None
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise UserError(f"{f}: not a safetensors file (its header is not JSON)") from None
    return header, 8 + n


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """The identity of a HF model directory's weights, cheap to compute (no full read): ``sha256-v1:`` and the first
    16 hex digits of a SHA-256 over

    * ``config.json``, parsed, without ``transformers_version`` / ``_name_or_path``, as sorted-key JSON;
    * for every tensor the loader reads (the index's ``weight_map``, else every tensor of ``model.safetensors``),
      in name order: its name, dtype, shape and byte size (from the safetensors headers), and its bytes: all of
      them for a tensor up to 64 KiB, else 32 evenly spaced 1 KiB windows (the first and last included).

    Sharding, file names, offsets, the headers' ``__metadata__`` and where the directory is do not enter it: the
    same weights copied, moved or re-sharded have the same fingerprint; other weights of the same architecture
    (another checkpoint, a fine-tune, a tensor rewritten) have another."""
    model_dir = Path(model_dir)
    h = hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\0")
    config = json.loads((model_dir / "config.json").read_text())
    for k in _CONFIG_NOISE:
        config.pop(k, None)
    h.update(json.dumps(config, sort_keys=True).encode() + b"\0")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = {name: model_dir / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    elif (model_dir / "model.safetensors").is_file():
        weight_map = None
    else:
        raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                        "(PyTorch .bin checkpoints are not read: they are pickles)")
    files = sorted(set(weight_map.values())) if weight_map is not None else [model_dir / "model.safetensors"]
    tensors = {}  # name -> (file, entry, data_start)
    for f in files:
        header, start = _safetensors_header(f)
        for name, entry in header.items():
            if name != "__metadata__" and (weight_map is None or weight_map.get(name) == f):
                tensors[name] = (f, entry, start)
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(tensors):
            f, entry, start = tensors[name]
            begin, end = entry["data_offsets"]
            size = end - begin
            h.update(json.dumps([name, entry["dtype"], entry["shape"], size]).encode() + b"\0")
            fh = handles.get(f) or handles.setdefault(f, open(f, "rb"))
            if size <= _WHOLE_TENSOR_BYTES:
                offsets, width = [0], size
            else:
                offsets, width = [i * (size - _WINDOW_BYTES) // (_WINDOWS - 1) for i in range(_WINDOWS)], _WINDOW_BYTES
            for off in offsets:
                fh.seek(start + begin + off)
                h.update(fh.read(width))
    finally:
        for fh in handles.values():
            fh.close()
    return f"{FINGERPRINT_SCHEME}:{h.hexdigest()[:16]}"


def load_pretrained(path: str | os.PathLike, dtype: str | Any = "float32", mesh: jax.sharding.Mesh | None = None,
                    *, compute_dtype: str | Any | None = None, scan_layers: bool = False,
                    remat_policy: str = "none", attention_impl: str = "xla",
                    rules=DEFAULT_RULES) -> CausalLM:
    """Reads a HF model directory (or hub id) into a :class:`CausalLM`.

    ``dtype`` is the parameter dtype; ``compute_dtype`` (default: same) the activation dtype. With ``mesh``, every
    parameter is created directly in its :func:`param_sharding`.
    """
    model_dir = resolve_model_dir(path).local
    cfg = read_config(model_dir)
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        cfg = dataclasses.replace(cfg, generation_config=json.loads(gen_cfg.read_text()))
    param_dtype = to_dtype(dtype)
    abstract = nnx.eval_shape(lambda: CausalLM(
        cfg, dtype=to_dtype(compute_dtype or dtype), param_dtype=param_dtype, scan_layers=scan_layers,
        remat_policy=remat_policy, attention_impl=attention_impl, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    weight_map = _weight_map(model_dir)

    flat = list(nnx.to_flat_state(abs_state))
    wanted = {path: hf_tensor_names(path, scan_layers, cfg.num_hidden_layers) for path, _ in flat}
    needed = {n for names in wanted.values() for n in names}
    missing = sorted(needed - set(weight_map))
    if missing:
        raise UserError(f"{model_dir}: missing tensor(s) {', '.join(missing[:5])}"
                        + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    unexpected = sorted(n for n in set(weight_map) - needed
                        if not n.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise UserError(f"{model_dir}: unexpected tensor(s) {', '.join(unexpected[:5])} "
                        f"for model_type '{cfg.model_type}'")

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(name: str):
            f = weight_map[name]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, framework="numpy"))
            return handles[f]

        new_flat = []
        for path, var in flat:
            names = wanted[path]
            arr = _load_param(path, var, names, handle, mesh, scan_layers, param_dtype, rules)
            new_flat.append((path, var.replace(arr)))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _load_param(path, var, names, handle, mesh, scanned, param_dtype, rules) -> jax.Array:
    shape, transposed = tuple(var.shape), _transposed(path)
    stacked = len(names) > 1 or (scanned and str(path[1]) == "layers")
    per_layer = shape[1:] if stacked else shape
    expected_hf = tuple(reversed(per_layer)) if transposed else per_layer
    for n in names:
        got = tuple(handle(n).get_slice(n).get_shape())
        if got != expected_hf:
            raise UserError(f"tensor {n}: shape {list(got)} in the checkpoint, expected {list(expected_hf)} "
                            "from config.json")

    def read(name: str, idx: tuple) -> np.ndarray:
        hf_idx = tuple(reversed(idx)) if transposed else idx
        x = np.asarray(handle(name).get_slice(name)[hf_idx] if hf_idx else handle(name).get_tensor(name))
        return (x.T if transposed else x).astype(param_dtype)

    def fetch(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if stacked:
            return np.stack([read(names[i], index[1:]) for i in range(len(names))[index[0]]])
        return read(names[0], index)

    if mesh is None:
        return jnp.asarray(fetch(()))
    sharding = param_sharding(path, shape, mesh, scanned, rules)
    return jax.make_array_from_callback(shape, sharding, fetch)


# ----------------------------------------------------------------------------------------------------- export
def hf_state_dict(model: CausalLM, dtype: str | Any | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` in HF layout, one tensor at a time (gathered to host)."""
    cfg = model.config
    target = to_dtype(dtype) if dtype is not None else None
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = hf_tensor_names(path, model.scan_layers, cfg.num_hidden_layers)
        value = var[...]
        if isinstance(value, jax.Array) and not value.is_fully_addressable:  # parts live on other processes
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
        value = np.asarray(jax.device_get(value))
        if target is not None:
            value = value.astype(target)
        parts = list(value) if len(names) > 1 else [value]
        for name, part in zip(names, parts):
            yield name, np.ascontiguousarray(part.T if _transposed(path) else part)


def save_pretrained(model: CausalLM, out_dir: str | os.PathLike, tokenizer: Any = None,
                    dtype: str | Any | None = None, max_shard_bytes: int = 5 * 2**30) -> storage.Path:
    """Writes ``config.json``, ``generation_config.json``, safetensors (sharded + index above ``max_shard_bytes``)
    and tokenizer files into ``out_dir`` (a local directory or a ``gs://`` URL), atomically
    (:func:`percausal_jax.atomic.atomic_dir`: assembled in a temporary directory, then renamed into place, or
    uploaded with ``config.json`` last). Returns the output as a path (an ``epath.Path``; a URL stays a URL).

    ``config.json`` has the transformers-5 keys (``rope_parameters``, ``dtype``) and the older ones beside them
    (``rope_theta``, ``rope_scaling``, ``torch_dtype``, Gemma3's ``rope_local_base_freq``).
    ``tokenizer``: a transformers tokenizer (``save_pretrained``) or a directory (local, ``gs://`` or a hub id)
    whose tokenizer files are copied.
    """
    with atomic_dir(out_dir) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size, total = 0, 0
        dtype_name = None
        for name, arr in hf_state_dict(model, dtype):
            dtype_name = dtype_name or str(arr.dtype)
            if shards[-1] and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
            total += arr.nbytes
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        cfg = model.config
        hf = cfg.to_hf()
        hf["dtype"] = hf["torch_dtype"] = dtype_name  # torch_dtype: what transformers < 4.56 reads
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        gen = {**{k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
               **cfg.generation_config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
        _write_tokenizer(tokenizer, tmp)
    target = storage.path(out_dir)
    return target if storage.is_remote(target) else storage.path(Path(os.fspath(target)).resolve())


def _write_tokenizer(tokenizer: Any, dest: Path) -> None:
    """Copies the tokenizer files of a directory (local, ``gs://`` or hub id) into the local ``dest``, or saves a
    transformers tokenizer object there."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        src = storage.resolve_hf_dir(tokenizer, what="tokenizer directory",
                                     allow_patterns=list(TOKENIZER_FILES)).local
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, dest / f)
    else:
        tokenizer.save_pretrained(str(dest))
