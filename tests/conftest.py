"""Test set-up: 8 host CPU devices (for mesh tests), offline Hugging Face, shared tiny-model factories."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the tpu extra, for AOT) is installed: never probe for TPUs
# The loopback GCS server (tests/gcs.py): its address is fixed now, before any client reads the environment; the
# server itself starts on first use (fixture `gcs`). Each pytest-xdist worker has its own.
from tests.gcs import GcsServer, free_port  # noqa: E402

_GCS_PORT = free_port()
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{_GCS_PORT}"
os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{_GCS_PORT}"
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import pytest  # noqa: E402

from tests.helpers import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def gcs():
    """The running loopback GCS server (``gcs.bucket()`` makes a fresh bucket and returns its gs:// URL)."""
    server = GcsServer(_GCS_PORT).start()
    yield server
    server.stop()


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
