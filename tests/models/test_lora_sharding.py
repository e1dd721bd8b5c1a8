"""LoRA adapters are sharded like their base kernel: ``lora_a`` [.., in, r] takes the kernel's input-axis sharding
and ``lora_b`` [.., r, out] its output-axis sharding; the rank dimension is replicated. Checked on the rule
(``param_sharding``) and on a real LoRA run built by the run spine (``setup.build``), on a fsdp=2 × tensor=4 mesh.
"""

from pathlib import Path

import jax
import pytest
from flax import nnx

import percausal_jax as pj
from percausal_jax.config import RunConfig, load_config
from percausal_jax.models.lora import apply_lora
from percausal_jax.models.partitioning import make_mesh, param_sharding
from percausal_jax.training.setup import build
from tests.helpers import tiny_hf_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
RANK = 4  # divisible by both mesh axes, so a rule that sharded the rank dimension would show
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_model")
    tiny_hf_model("llama", d)  # hidden 64, q 64, kv 32, mlp 128: every dimension divisible by 2 and 4
    tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(1, 2, 4)


def _dims(spec, ndim):
    """A PartitionSpec as one entry per dimension (trailing Nones made explicit)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def _adapters(state):
    """{(path of the adapted module): {"kernel": (path, var), "lora_a": ..., "lora_b": ...}}."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        if path[-1] in ("kernel", "lora_a", "lora_b"):
            out.setdefault(tuple(path[:-1]), {})[path[-1]] = (tuple(path), var)
    return {k: v for k, v in out.items() if "lora_a" in v}


def _expect_like_kernel(kernel_dims, a_dims, b_dims, where):
    lead = len(kernel_dims) - 2
    assert a_dims[-2] == kernel_dims[-2], f"{where}: lora_a input dim {a_dims} vs kernel {kernel_dims}"
    assert a_dims[-1] is None, f"{where}: lora_a rank dim sharded: {a_dims}"
    assert b_dims[-2] is None, f"{where}: lora_b rank dim sharded: {b_dims}"
    assert b_dims[-1] == kernel_dims[-1], f"{where}: lora_b output dim {b_dims} vs kernel {kernel_dims}"
    assert a_dims[:lead] == kernel_dims[:lead] == b_dims[:lead], f"{where}: layer axis {a_dims} {b_dims}"


@pytest.mark.parametrize("scanned", [True, False])
def test_param_sharding_of_adapters_follows_the_base_kernel(model_dir, mesh, scanned):
    model = pj.load_pretrained(model_dir, scan_layers=scanned)
    apply_lora(model, RANK, 2.0 * RANK)
    adapters = _adapters(nnx.state(model))
    assert {str(k[-1]) for k in adapters} == TARGETS
    assert len(adapters) == len(TARGETS) * (1 if scanned else model.config.num_hidden_layers)
    seen_in, seen_out = set(), set()
    for module, leaves in adapters.items():
        (kp, kernel), (ap, a), (bp, b) = leaves["kernel"], leaves["lora_a"], leaves["lora_b"]
        assert a.shape[-1] == b.shape[-2] == RANK
        assert a.shape[-2] == kernel.shape[-2] and b.shape[-1] == kernel.shape[-1]
        k_dims = _dims(param_sharding(kp, kernel.shape, mesh, scanned).spec, kernel.ndim)
        a_dims = _dims(param_sharding(ap, a.shape, mesh, scanned).spec, a.ndim)
        b_dims = _dims(param_sharding(bp, b.shape, mesh, scanned).spec, b.ndim)
        _expect_like_kernel(k_dims, a_dims, b_dims, module)
        seen_in.add(a_dims[-2])
        seen_out.add(b_dims[-1])
    # both sides of the rule are exercised: fsdp-in/tensor-out (q, k, v, gate, up) and tensor-in/fsdp-out (o, down)
    assert seen_in == {"fsdp", "tensor"} and seen_out == {"fsdp", "tensor"}


@pytest.mark.parametrize("scanned", [True, False])
def test_lora_run_places_adapters_like_their_base_kernel(model_dir, scanned):
    cfg = load_config(str(ROOT / "configs" / "tiny.py"), [
        f"--config.model.path={model_dir}", f"--config.lora.rank={RANK}", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=4", f"--config.model.scan_layers={str(scanned).lower()}"])
    run = build(RunConfig.from_config(cfg))
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    trainable = list(nnx.to_flat_state(run.params))
    assert trainable and all(p[-1] in ("lora_a", "lora_b") for p, _ in trainable)
    base = {tuple(p[:-1]): v for p, v in nnx.to_flat_state(run.frozen) if p[-1] == "kernel"}
    by_module = {}
    for path, var in trainable:
        by_module.setdefault(tuple(path[:-1]), {})[path[-1]] = (tuple(path), var[...])
    assert {str(m[-1]) for m in by_module} == TARGETS
    for module, leaves in by_module.items():
        kernel = base[module][...]
        (ap, a), (bp, b) = leaves["lora_a"], leaves["lora_b"]
        assert isinstance(a, jax.Array) and a.sharding.mesh == run.mesh
        k_dims = _dims(kernel.sharding.spec, kernel.ndim)
        # the frozen base kernel itself is where the rule puts it (so comparing against it is meaningful)
        assert k_dims == _dims(param_sharding(module + ("kernel",), kernel.shape, run.mesh, scanned).spec,
                               kernel.ndim)
        assert any(d is not None for d in k_dims), module
        a_dims, b_dims = _dims(a.sharding.spec, a.ndim), _dims(b.sharding.spec, b.ndim)
        _expect_like_kernel(k_dims, a_dims, b_dims, module)
        # and each adapter is where the rule says
        assert a_dims == _dims(param_sharding(ap, a.shape, run.mesh, scanned).spec, a.ndim)
        assert b_dims == _dims(param_sharding(bp, b.shape, run.mesh, scanned).spec, b.ndim)
