"""`percausal aot`: the real train step compiled for a TPU topology (needs libtpu, `pip install ".[tpu]"`)."""

import importlib.util

import pytest

from percausal_jax.config import RunConfig, load_config
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import read_config
from percausal_jax.training import aot

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _cfg(model_dir):
    return RunConfig.from_config(load_config("configs/tiny.py", [
        f"--config.model.path={model_dir}", "--config.mesh.fsdp=4", "--config.objective.name=perce",
        "--config.train.grad_accum_steps=1"]))  # the same batch check as training: 4 rows over fsdp=4


def test_aot_refuses_what_training_refuses(setup):
    """The plan is built by the run spine, with training's checks: 2 rows per micro-batch over 4 devices."""
    model_dir, _ = setup
    rc = RunConfig.from_config(load_config("configs/tiny.py", [
        f"--config.model.path={model_dir}", "--config.mesh.fsdp=4", "--config.train.grad_accum_steps=2"]))
    with pytest.raises(UserError, match="a micro-batch has 2 rows, not a multiple of mesh data×fsdp=4"):
        aot.plan(rc, read_config(model_dir), "v5e:2x2")


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install ".[tpu]" enables AOT for TPUs)')
def test_tiny_config_compiles_for_a_small_tpu_topology(setup):
    model_dir, _ = setup
    p = aot.plan(_cfg(model_dir), read_config(model_dir), "v5e:2x2")
    assert p.chips == 4 and p.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert p.fits and 0 < p.peak_bytes < p.hbm_bytes and p.flops_per_chip > 0
    assert "FITS" in p.report()
    assert ("data layout: 4 distinct row blocks of 1 rows; 1 process(es) read each; 1 processes; non-batch axes "
            "spanning processes: none") in p.report()
    assert p.compile_seconds > 0 and f"compiled in {p.compile_seconds:.1f} s" in p.report()


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install ".[tpu]" enables AOT for TPUs)')
def test_packed_plan_compiles_the_row_capacities(setup):
    """With packing every batch has the row capacities, so that is the shape the plan compiles."""
    model_dir, _ = setup
    rc = RunConfig.from_config(load_config("configs/tiny.py", [
        f"--config.model.path={model_dir}", "--config.mesh.fsdp=4", "--config.objective.name=perce",
        "--config.train.grad_accum_steps=1", "--config.data.packing=True", "--config.data.pack_personal_len=256",
        "--config.data.pack_response_len=64"]))
    p = aot.plan(rc, read_config(model_dir), "v5e:2x2")
    need = rc.data.max_prompt_len + rc.data.max_response_len - 1
    multiple = rc.data.bucket_multiple
    assert p.batch_shapes == {"personal": 256, "counterfactual": -(-need // multiple) * multiple, "response": 64,
                              "batch": rc.train.global_batch_size}


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install ".[tpu]" enables AOT for TPUs)')
def test_row_layout_of_a_two_host_slice():
    """v5p:2x2x2 is 8 chips on 2 hosts (4 each). Worked by hand: with the tensor axis across the hosts
    (dcn_tensor=2), each host holds one tensor rank of every fsdp block: 4 blocks, both hosts read all 4; with fsdp
    across the hosts (dcn_fsdp=2) and tensor=4 within one, each host reads its own block."""
    from percausal_jax.data.rows import row_layout
    from percausal_jax.models.partitioning import make_mesh

    _, devices = aot.tpu_devices("v5p:2x2x2")
    assert sorted({d.process_index for d in devices}) == [0, 1]
    across = row_layout(make_mesh(1, 4, 2, devices=devices, dcn=(1, 1, 2)), 8, process=1)
    assert (across.num_blocks, across.blocks, across.readers, across.spanning) == (
        4, (0, 1, 2, 3), ((0, 1),) * 4, ("tensor",))
    assert across.describe() == ("4 distinct row blocks of 2 rows; 2 process(es) read each; 2 processes; "
                                 "non-batch axes spanning processes: tensor")
    within = row_layout(make_mesh(1, 2, 4, devices=devices, dcn=(1, 2, 1)), 8, process=1)
    assert (within.num_blocks, within.blocks, within.readers, within.spanning) == (2, (1,), ((0,), (1,)), ())


HIDE_LIBTPU = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):  # this interpreter behaves as if libtpu were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "libtpu":
            raise ImportError("libtpu is not installed")
sys.meta_path.insert(0, Hide())
from percausal_jax.errors import UserError
from percausal_jax.training import aot
try:
    aot.tpu_devices("v5e:2x2")
except UserError as e:
    print(e)
"""


def test_without_libtpu_the_error_says_how_to_get_it():
    import os
    import subprocess
    import sys

    # a fresh environment: importing jax here (libtpu present) exported TPU_LIBRARY_PATH for child processes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "ALLOW_MULTIPLE_LIBTPU"))}
    out = subprocess.run([sys.executable, "-c", HIDE_LIBTPU], capture_output=True, text=True, timeout=300,
                         env={**env, "JAX_PLATFORMS": "cpu"})
    assert 'AOT planning needs libtpu: pip install ".[tpu]"' in out.stdout, out.stderr[-2000:]


def test_bad_topology_name():
    with pytest.raises(UserError, match="expected e.g. v5p:2x4x4"):
        aot.tpu_devices("h100:8")


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install ".[tpu]" enables AOT for TPUs)')
def test_splash_attention_compiles_for_tpu_under_a_mesh():
    import os

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from percausal_jax.models.config import ModelConfig
    from percausal_jax.models.decoder import CausalLM

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    _, devices = aot.tpu_devices("v5e:2x2")
    mesh = Mesh(np.asarray(devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    gd, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.bfloat16, attention_impl="splash")))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), state)
    ids = jax.ShapeDtypeStruct((4, 512), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda s, x: nnx.merge(gd, s)(x)).lower(state, ids).compile()
    assert compiled.as_text().count("tpu_custom_call") == 2  # one splash kernel per layer
