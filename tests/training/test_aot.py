"""`percausal aot`: the real train step compiled for a TPU topology (needs libtpu, `pip install ".[tpu]"`)."""

import importlib.util

import pytest

from percausal_jax.config import load_config
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import read_config
from percausal_jax.training import aot

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _cfg(model_dir):
    return load_config("configs/tiny.py", [f"--config.model.path={model_dir}", "--config.mesh.fsdp=4",
                                           "--config.objective.name=perce"])


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install ".[tpu]" enables AOT for TPUs)')
def test_tiny_config_compiles_for_a_small_tpu_topology(setup):
    model_dir, _ = setup
    p = aot.plan(_cfg(model_dir), read_config(model_dir), "v5e:2x2")
    assert p.chips == 4 and p.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert p.fits and 0 < p.peak_bytes < p.hbm_bytes and p.flops_per_chip > 0
    assert "FITS" in p.report()


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message shown when libtpu is missing")
def test_without_libtpu_the_error_says_how_to_get_it(setup):
    model_dir, _ = setup
    with pytest.raises(UserError, match=r'pip install "\.\[tpu\]"'):
        aot.plan(_cfg(model_dir), read_config(model_dir), "v5e:2x2")


def test_bad_topology_name():
    with pytest.raises(UserError, match="expected e.g. v5p:2x4x4"):
        aot.tpu_devices("h100:8")
