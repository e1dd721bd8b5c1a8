"""AOT memory and FLOP planning: lower and compile the real train step for a TPU topology (on a CPU machine with
libtpu installed: ``pip install ".[tpu]"``) and report, per chip, argument / temporary / output memory against HBM,
the compiled FLOPs, and the step time predicted at a stated MFU.

Only abstract values are used (``jax.ShapeDtypeStruct`` with shardings): nothing is allocated and no checkpoint is
read. The model architecture comes from ``model.path``'s ``config.json`` when it is a local directory, else from
the bundled presets of the paper models (:mod:`percausal_jax.models.presets`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import to_dtype
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.decoder import CausalLM
from percausal_jax.models.lora import apply_lora
from percausal_jax.models.partitioning import MESH_AXES, param_sharding
from percausal_jax.objectives import registry
from percausal_jax.training.optim import make_optimizer
from percausal_jax.training.step import TrainState, make_train_step

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
            f"per chip: arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
            f"outputs {gib(self.output_bytes)}, aliased (donated) {gib(self.alias_bytes)}",
            f"per chip peak {gib(self.peak_bytes)} of {gib(self.hbm_bytes)} HBM: "
            + ("FITS" if self.fits else "DOES NOT FIT"),
            f"model FLOPs per chip per step {self.model_flops_per_chip:.3e} (XLA cost analysis: "
            f"{self.flops_per_chip:.3e}, a scanned layer counted once); at {self.mfu:.0%} MFU "
            f"({self.peak_flops / 1e12:.0f} TFLOP/s peak) a step takes {self.step_seconds:.2f} s",
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


def topology_mesh(devices, cfg) -> Mesh:
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} does not use the topology's {len(devices)} chips")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def forward_flops(mc: ModelConfig, batch: int, seq: int, response: int) -> float:
    """One forward pass: 2·(layer params)·tokens + causal attention scores (4·layers·heads·head_dim·S², computed
    densely) + the LM head at response positions only."""
    n_layer_params = mc.num_params() - mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    attn = 4 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * seq * seq
    return batch * (2 * n_layer_params * seq + attn + 2 * mc.hidden_size * mc.vocab_size * response)


def step_flops(cfg, mc: ModelConfig, B: int, Lp: int, Lc: int, R: int) -> float:
    """Model FLOPs of one optimizer step (backward = 2× forward; rematerialization not counted)."""
    req = registry.get(cfg.objective.name).requirements(cfg.objective[cfg.objective.name])
    fp, fc = forward_flops(mc, B, Lp, R), forward_flops(mc, B, Lc, R)
    total = 3 * fp
    if req.counterfactual:
        total += 3 * fc if req.counterfactual_grad else fc
    total += fp * ("p" in req.reference) + fc * ("c" in req.reference)
    return total


def plan(cfg, model_config: ModelConfig, topology: str, *, mfu: float = 0.4, counterfactual_len: int | None = None
         ) -> Plan:
    kind, devices = tpu_devices(topology)
    mesh = topology_mesh(devices, cfg)
    hbm, peak = CHIPS[kind]
    scanned = cfg.model.scan_layers

    def create():
        m = CausalLM(model_config, dtype=to_dtype(cfg.model.compute_dtype), param_dtype=to_dtype(cfg.model.dtype),
                     scan_layers=scanned, remat_policy=cfg.model.remat_policy,
                     attention_impl=cfg.model.attention_impl, rngs=nnx.Rngs(0))
        return apply_lora(m, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets)) if cfg.lora.rank > 0 else m

    abstract = nnx.eval_shape(create)
    trainable = nnx.LoRAParam if cfg.lora.rank > 0 else nnx.Param
    graphdef, params, frozen = nnx.split(abstract, trainable, ...)

    def shard(state):
        return nnx.from_flat_state([
            (p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=param_sharding(p, v.shape, mesh, scanned))))
            for p, v in nnx.to_flat_state(state)])

    params, frozen = shard(params), shard(frozen)
    tx, lr = make_optimizer(cfg.optimizer, cfg.train.steps, scanned)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, p: p.sharding, opt_abstract, params,
                                   transform_non_params=lambda _: replicated)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_sh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = TrainState(step=scalar, params=params, opt_state=opt_state, nan_skips=scalar)

    obj = cfg.objective.name
    needs_ref = bool(registry.get(obj).requirements(cfg.objective[obj]).reference)
    B, R = cfg.train.global_batch_size, cfg.data.max_response_len
    Lp = -(-(cfg.data.max_prompt_len + R - 1) // cfg.data.bucket_multiple) * cfg.data.bucket_multiple
    Lc = counterfactual_len or min(Lp, -(-(R + 256) // cfg.data.bucket_multiple) * cfg.data.bucket_multiple)
    bsh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    seq = lambda L: {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=bsh)  # noqa: E731
                     for k in ("tokens", "positions", "segment_ids")}
    resp = {k: jax.ShapeDtypeStruct((B, R), dt, sharding=bsh) for k, dt in (
        ("ids", jnp.int32), ("weight", jnp.float32), ("seq_weight", jnp.float32), ("index_personal", jnp.int32),
        ("index_counterfactual", jnp.int32))}
    batch = {"personal": seq(Lp), "counterfactual": seq(Lc), "response": resp}
    step = make_train_step(graphdef, tx, lr, obj, cfg.objective, grad_accum_steps=cfg.train.grad_accum_steps,
                           chunk_size=cfg.objective.vocab_chunk_size)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(state_sh, None))
    with jax.set_mesh(mesh):
        compiled = jitted.lower(state, frozen, params if needs_ref else None, batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Plan(topology, len(devices), dict(zip(MESH_AXES, mesh.devices.shape)), {"personal": Lp,
                "counterfactual": Lc, "response": R, "batch": B}, mem.argument_size_in_bytes,
                mem.temp_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes, hbm,
                float(cost.get("flops", 0.0)), step_flops(cfg, model_config, B, Lp, Lc, R) / len(devices), mfu, peak)
