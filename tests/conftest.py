"""Test set-up: 8 host CPU devices (for mesh tests), offline Hugging Face, shared tiny-model factories."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.helpers import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (untied head) saved with transformers' save_pretrained."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_model("llama", d)
    return d


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct converted to a HF dir (cached under $PERCAUSAL_CACHE after the first run)."""
    from percausal_jax.hf.gguf import embedded_model_dir

    return embedded_model_dir()
