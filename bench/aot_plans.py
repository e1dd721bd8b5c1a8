"""The TPU memory plans of README / RESULTS re-checked: ``percausal aot`` for three (config, topology) pairs, on this
CPU machine with libtpu (``pip install ".[tpu]"``, installed by ``make test``), with the wall time of lowering and
compiling each. Nothing is allocated: the run is ``setup.build(abstract=True)`` on the topology's devices.

    .venv/bin/python bench/aot_plans.py                 # writes its section of bench/RESULTS.md
    .venv/bin/python bench/aot_plans.py --only qwen3-4b --no-write
"""

from __future__ import annotations

import argparse
import time

from common import REPO, info_block, machine_info, md_table, write_section

PLANS = [  # (config argument, topology, slice name)
    ("review,qwen3-14b", "v5p:2x4x4", "v5p-64 (32 chips)"),
    ("review,llama3-8b", "v5e:16x16", "v5e-256"),
    ("review,qwen3-4b", "v6e:8x8", "v6e-64"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only plans whose config argument contains this")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from percausal_jax.config import RunConfig, load_config
    from percausal_jax.training.aot import plan
    from percausal_jax.training.setup import model_config_of

    import importlib.metadata as md
    info = machine_info({"libtpu": md.version("libtpu")})
    rows, t_all = [], time.perf_counter()
    for arg, topology, name in PLANS:
        if args.only not in arg:
            continue
        path = f"{REPO / 'configs' / 'perce_longlamp.py'}:{arg}"
        rc = RunConfig.from_config(load_config(path, []), where=path)
        mc = model_config_of(rc.model.path)
        p = plan(rc, mc, topology)
        print(p.report(), flush=True)
        mesh = ", ".join(str(p.mesh[a]) for a in ("data", "fsdp", "tensor"))
        rows.append([f"{arg.split(',')[1]} {rc.objective.name}", name, mesh, p.batch_shapes["batch"],
                     f"{p.peak_bytes / 2**30:.2f} GiB", f"{p.hbm_bytes / 2**30:.0f} GiB", "yes" if p.fits else "NO",
                     f"{p.model_flops_per_chip:.2e}", f"{p.step_seconds:.2f} s", f"{p.compile_seconds:.0f} s"])
    table = md_table(["config", "slice", "mesh (data, fsdp, tensor)", "global batch", "peak per chip", "HBM", "fits",
                      "model FLOPs / chip / step", "step at 40% MFU", "lower + compile"], rows)
    body = (info_block({**info, "wall_s": f"{time.perf_counter() - t_all:.0f}"}) + "\n\n"
            "`configs/perce_longlamp.py` (personal sequences up to 5,120 slots, response 512; fp32 params, bf16 "
            "compute, remat full, scanned layers): the real PerCE train step compiled for each topology.\n\n" + table)
    print(table)
    if not args.no_write:
        write_section("AOT plans re-checked (TPU compile on CPU, with compile time)", body)


if __name__ == "__main__":
    main()
