"""AOT memory and FLOP planning: lower and compile the real train step for a TPU topology (on a CPU machine with
libtpu installed: ``pip install ".[tpu]"``) and report, per chip, argument / temporary / output memory against HBM,
the compiled FLOPs, and the step time predicted at a stated MFU.

The run is the one every command builds (:func:`setup.build` with ``abstract=True``): only abstract values
(``jax.ShapeDtypeStruct`` with shardings), nothing allocated and no checkpoint read. The model architecture comes
from ``model.path``'s ``config.json`` (local, gs:// or hub), else from the bundled presets of the paper models.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from percausal_jax.config import RunConfig
from percausal_jax.data.pairing import PairedBatch
from percausal_jax.data.shapes import Buckets, Packing
from percausal_jax.data.rows import BATCH_AXES, row_layout
from percausal_jax.errors import UserError
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.partitioning import MESH_AXES
from percausal_jax.training import setup

# per chip: HBM bytes, peak bf16 FLOP/s (public spec sheets)
CHIPS = {
    "v4": (32 * 2**30, 275e12),
    "v5e": (16 * 2**30, 197e12),
    "v5p": (95 * 2**30, 459e12),
    "v6e": (32 * 2**30, 918e12),
}


@dataclasses.dataclass
class Plan:
    topology: str
    chips: int
    mesh: dict
    batch_shapes: dict
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    hbm_bytes: int
    flops_per_chip: float  # XLA's cost analysis (counts a scanned layer loop's body once)
    model_flops_per_chip: float  # analytic: matmuls + attention of the passes the objective runs
    mfu: float
    peak_flops: float
    compile_seconds: float = 0.0  # wall time of lower + compile on this machine
    rows: str = ""  # how the global batch's rows reach the slice's processes (rows.RowLayout.describe)
    frozen_bytes: int = 0  # per chip: the frozen (LoRA base) weights, as stored (lora.quantize_base)
    quantize_base: str = "none"

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def step_seconds(self) -> float:
        return self.model_flops_per_chip / (self.peak_flops * self.mfu)

    def report(self) -> str:
        gib = lambda b: f"{b / 2**30:7.2f} GiB"  # noqa: E731
        lines = [
            f"topology {self.topology}: {self.chips} chips, mesh {self.mesh}",
            f"batch shapes {self.batch_shapes}",
            f"data layout: {self.rows}",
            f"per chip: arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
            f"outputs {gib(self.output_bytes)}, aliased (donated) {gib(self.alias_bytes)}",
            f"per chip, the frozen base as stored (lora.quantize_base={self.quantize_base}): "
            f"{gib(self.frozen_bytes)} (part of the arguments)",
            f"per chip peak {gib(self.peak_bytes)} of {gib(self.hbm_bytes)} HBM: "
            + ("FITS" if self.fits else "DOES NOT FIT"),
            f"model FLOPs per chip per step {self.model_flops_per_chip:.3e} (XLA cost analysis: "
            f"{self.flops_per_chip:.3e}, a scanned layer counted once); at {self.mfu:.0%} MFU "
            f"({self.peak_flops / 1e12:.0f} TFLOP/s peak) a step takes {self.step_seconds:.2f} s",
            f"lowered and compiled in {self.compile_seconds:.1f} s",
        ]
        return "\n".join(lines)


def tpu_devices(topology: str):
    """``v5p:2x4x4`` → the topology's devices (needs libtpu)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise UserError(f"jax.experimental.topologies unavailable: {e}") from None
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # planning only: no TPU is opened
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu warns without it on a CPU machine
    kind, _, shape = topology.partition(":")
    if kind not in CHIPS or not shape:
        raise UserError(f"topology {topology!r}: expected e.g. v5p:2x4x4, v5e:16x16, v6e:8x8 ({', '.join(CHIPS)})")
    dims = tuple(int(x) for x in shape.split("x"))
    per_host = (2, 2, 1) if len(dims) == 3 else (2, 2, 1)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                            chips_per_host_bounds=per_host, num_slices=1)
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown topology
        raise UserError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); "
                        'AOT planning needs libtpu: pip install ".[tpu]"') from None
    return kind, topo.devices


def plan(rc: RunConfig, model_config: ModelConfig, topology: str, *, mfu: float = 0.4,
         counterfactual_len: int | None = None) -> Plan:
    """Lowers and compiles the run's train step (built by the one setup, abstractly) on ``topology``."""
    kind, devices = tpu_devices(topology)
    hbm, peak = CHIPS[kind]
    run = setup.build(rc, abstract=True, devices=devices, model_config=model_config)
    B, R, multiple = rc.train.global_batch_size, rc.data.max_response_len, rc.data.bucket_multiple
    Lp = -(-(rc.data.max_prompt_len + R - 1) // multiple) * multiple
    Lc = counterfactual_len or min(Lp, -(-(R + 256) // multiple) * multiple)
    if rc.data.packing:  # packed batches always have the row capacities: the one shape training compiles
        fcfg = run.featurize_config
        Lp, Lc, R = Packing.derive(fcfg, Buckets.multiples(fcfg, multiple), rc.data.pack_personal_len,
                                   rc.data.pack_counterfactual_len, rc.data.pack_response_len).capacity
    batch = PairedBatch.spec(B, Lp, Lc, R, sharding=NamedSharding(run.mesh, PartitionSpec(BATCH_AXES)))
    ref = run.reference_params  # abstract: the trained layout stands in for a separate reference
    step_fn, state = run.train_step(), run.abstract_state()  # outside the TPU mesh: optax probes eagerly on CPU
    t0 = time.perf_counter()
    with jax.set_mesh(run.mesh):
        compiled = step_fn.lower(state, run.frozen, ref, batch).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Plan(topology, len(devices), dict(zip(MESH_AXES, run.mesh.devices.shape)), {"personal": Lp,
                "counterfactual": Lc, "response": R, "batch": B}, mem.argument_size_in_bytes,
                mem.temp_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes, hbm,
                float(cost.get("flops", 0.0)), run.step_flops(B, Lp, Lc, R) / len(devices), mfu, peak,
                seconds, row_layout(run.mesh, B, process=0).describe(), per_chip_bytes(run.frozen),
                rc.lora.quantize_base)


def per_chip_bytes(state) -> int:
    """The bytes of one chip's shards of an abstract, sharded nnx.State (the largest shard of each leaf)."""
    total = 0
    for _, v in nnx.to_flat_state(state):
        x = v.get_value()  # (an abstract leaf: a ShapeDtypeStruct with its sharding)
        total += int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    return total
