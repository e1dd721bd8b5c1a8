"""LoRA adapters → a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(base, dir)`` loads onto the base model.

PEFT names: ``base_model.model.<hf path>.lora_A.weight`` [r, in] = our ``lora_a`` [in, r] transposed, and
``lora_B.weight`` [out, r] = ``lora_b`` [r, out] transposed; scaling ``lora_alpha / r`` as ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from percausal_jax import storage
from percausal_jax.atomic import atomic_dir
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import _write_tokenizer, hf_tensor_names


def adapter_tensors(model) -> dict[str, np.ndarray]:
    out = {}
    cfg = model.config
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        leaf = str(path[-1])
        names = hf_tensor_names(tuple(path[:-1]) + ("weight",), model.scan_layers, cfg.num_hidden_layers)
        value = np.asarray(jax.device_get(var[...]), np.float32)
        parts = list(value) if len(names) > 1 else [value]
        suffix = "lora_A" if leaf == "lora_a" else "lora_B"
        for name, part in zip(names, parts):
            module = name.removesuffix(".weight")
            out[f"base_model.model.{module}.{suffix}.weight"] = np.ascontiguousarray(part.T)
    if not out:
        raise UserError("the model has no LoRA adapters (train with --config.lora.rank > 0 to export --peft)")
    return out


def save_peft_adapter(model, out_dir: str | os.PathLike, *, base_model: str, rank: int, alpha: float,
                      targets: tuple[str, ...], tokenizer_dir: str | os.PathLike | None = None,
                      revision: str | None = None) -> storage.Path:
    """Writes the adapter into ``out_dir`` (local or ``gs://``; atomic, ``adapter_config.json`` last).

    ``base_model``: the base model as the user named it (hub id, path or URL: what ``AutoPeftModel`` loads, never a
    local snapshot-cache path); ``revision``: the hub commit of that base (PEFT's ``LoraConfig.revision``), when
    known. ``tokenizer_dir``: a directory whose tokenizer files are copied in. Returns the output path."""
    with atomic_dir(out_dir) as tmp:
        save_file(adapter_tensors(model), tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
                  "revision": revision, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
                  "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                  "use_dora": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_dir is not None:
            _write_tokenizer(tokenizer_dir, tmp)
    target = storage.path(out_dir)
    return target if storage.is_remote(target) else storage.path(Path(os.fspath(target)).resolve())
