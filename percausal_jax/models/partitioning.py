"""Logical axes of every parameter and the small rule table that maps them onto mesh axes ``(data, fsdp, tensor)``.

Parameters are named by their HF leaf (``q_proj.kernel`` ...), so the table below is the whole story: no per-module
annotations to keep in sync. A mesh axis is used only when it divides the dimension (else that dimension is
replicated), and never twice in one spec.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (module, leaf) -> logical axes of OUR layout (kernels are [in, out]).
PARAM_LOGICAL_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "bias"): ("embed",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "bias"): ("mlp",),
    ("down_proj", "bias"): ("embed",),
}
# LoRA adapters (``lora_a`` [in, r], ``lora_b`` [r, out]) follow their base kernel's input / output axis
# (:func:`logical_axes`): an adapter on ``q_proj`` is ("embed", "rank") and ("rank", "heads"). A quantized base
# (models.qlora) keeps the kernel's axes for its codes ([in, out], nf4 [in/2, out]) and its scales ([1 or in/64,
# out]: nf4's block axis sharded like the input axis; int8's single row stays whole, as spec_for shards only a
# dimension the mesh axis divides).
LORA_LEAVES = {"lora_a": lambda kernel: (kernel[0], "rank"), "lora_b": lambda kernel: ("rank", kernel[1]),
               "qkernel": lambda kernel: kernel, "qscale": lambda kernel: kernel}

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    "norm": (),
    "rank": (),
}


def logical_axes(path: Sequence, ndim: int, scanned: bool) -> tuple[str, ...]:
    """Logical axes of the parameter at ``path`` (a flat NNX state path) with ``ndim`` dimensions."""
    keys = [str(k) for k in path]
    module = keys[-2] if len(keys) >= 2 else ""
    if keys[-1] in LORA_LEAVES and (module, "kernel") in PARAM_LOGICAL_AXES:
        axes = LORA_LEAVES[keys[-1]](PARAM_LOGICAL_AXES[(module, "kernel")])
    else:
        axes = PARAM_LOGICAL_AXES.get((module, keys[-1]))
    if axes is None:
        axes = ("norm",) * (ndim - (1 if scanned and "layers" in keys else 0))
    if scanned and "layers" in keys:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        axes = (axes + ("norm",) * ndim)[:ndim]
    return axes


def spec_for(axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> PartitionSpec:
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        chosen = []
        size = 1
        for mesh_axis in rules.get(name, ()):
            n = mesh.shape.get(mesh_axis, 1)
            if mesh_axis in used or n == 1 or dim % (size * n):
                continue
            chosen.append(mesh_axis)
            size *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def param_sharding(path: Sequence, shape: Sequence[int], mesh: Mesh, scanned: bool,
                   rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes(path, len(shape), scanned), shape, mesh, rules))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None,
              dcn: Sequence[int] = (1, 1, 1)) -> Mesh:
    """Mesh over ``(data, fsdp, tensor)``; one size may be -1 (fills the remaining devices). Auto axis types.

    ``dcn``: how many ranks of each axis lie across process groups (the data-center network between hosts, as
    MaxText's ``dcn_*_parallelism``); the rest within one group. All 1: JAX's own device order (``jax.make_mesh``, topology-aware).
    Else the devices are split into ``prod(dcn)`` groups — by process, or, in a single process, into that many
    consecutive groups standing in for processes (same mesh, same roles, for comparisons) — each group laid out as
    the within-group mesh ``sizes / dcn`` and the groups tiled over ``dcn``: e.g. ``tensor=2`` with
    ``dcn=(1, 1, 2)`` puts the two tensor ranks of every group on two processes.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    fixed = 1
    for s in sizes:
        fixed *= s if s != -1 else 1
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // fixed
    if sizes[0] * sizes[1] * sizes[2] != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {sizes[0]*sizes[1]*sizes[2]} devices, "
                         f"have {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * 3
    if tuple(dcn) == (1, 1, 1):
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(_tiled_devices(devices, sizes, list(dcn)), MESH_AXES, axis_types=auto)


def _tiled_devices(devices: Sequence, sizes: list[int], across: list[int]):
    import numpy as np
    from jax.experimental import mesh_utils

    bad = [f"{name}={n} across {a}" for name, n, a in zip(MESH_AXES, sizes, across) if a < 1 or n % a]
    if bad:
        raise ValueError(f"each axis must be a multiple of its ranks across processes (mesh.dcn_*): "
                         f"{', '.join(bad)}")
    groups_n = int(np.prod(across))
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    groups = [by_process[p] for p in sorted(by_process)]
    if len(groups) == 1:  # one process: consecutive groups stand in for processes
        size = len(devices) // groups_n
        groups = [devices[i * size:(i + 1) * size] for i in range(groups_n)]
    if len(groups) != groups_n or len({len(g) for g in groups}) != 1:
        raise ValueError(f"mesh dcn={tuple(across)} needs {groups_n} equal process groups, have "
                         f"{len(groups)} of {sorted({len(g) for g in groups})} devices")
    within = [n // a for n, a in zip(sizes, across)]
    tiles = np.empty(groups_n, dtype=object)
    for i, g in enumerate(groups):
        tiles[i] = mesh_utils.create_device_mesh(within, g, allow_split_physical_axes=True)
    tiles = tiles.reshape(across)
    return np.block(tiles.tolist())
