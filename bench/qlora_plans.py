"""QLoRA in AOT plans: the PerCE train step of Qwen3-14B with LoRA (rank 16, every projection) compiled for TPU
slices on this CPU machine (libtpu), the frozen base stored as bfloat16, int8 or nf4 (``lora.quantize_base``).
Nothing is allocated: ``setup.build(abstract=True)`` on the topology's devices, as ``percausal aot``.

    .venv/bin/python bench/qlora_plans.py            # writes its section of bench/RESULTS.md
    .venv/bin/python bench/qlora_plans.py --no-write --only v5p
"""

from __future__ import annotations

import argparse
import time

from common import REPO, info_block, machine_info, md_table, write_section

SLICES = [("v5e:4x4", "v5e-16"), ("v5p:2x2x1", "v5p-8 (4 chips)")]
BASES = ("none", "int8", "nf4")
LORA = ["lora.rank=16", "lora.alpha=32.0", "model.dtype=bfloat16", "train.global_batch_size=16",
        "mesh.fsdp=-1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only slices whose topology contains this")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import importlib.metadata as md

    from percausal_jax.config import RunConfig, load_config
    from percausal_jax.training.aot import plan
    from percausal_jax.training.setup import model_config_of

    info = machine_info({"libtpu": md.version("libtpu")})
    rows, t_all = [], time.perf_counter()
    for topology, name in SLICES:
        if args.only not in topology:
            continue
        for base in BASES:
            path = f"{REPO / 'configs' / 'perce_longlamp.py'}:review,qwen3-14b"
            overrides = [f"--config.{o}" for o in (*LORA, f"lora.quantize_base={base}")]
            rc = RunConfig.from_config(load_config(path, overrides), where=path)
            p = plan(rc, model_config_of(rc.model.path), topology)
            print(p.report(), flush=True)
            gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
            rows.append([name, "bfloat16" if base == "none" else base, gib(p.frozen_bytes), gib(p.argument_bytes),
                         gib(p.temp_bytes), gib(p.peak_bytes), f"{p.hbm_bytes / 2**30:.0f} GiB",
                         "yes" if p.fits else "NO", f"{p.compile_seconds:.0f} s"])
    table = md_table(["slice", "frozen base", "base per chip", "arguments per chip", "temporaries per chip",
                      "peak per chip", "HBM", "fits", "lower + compile"], rows)
    body = (info_block({**info, "wall_s": f"{time.perf_counter() - t_all:.0f}"}) + "\n\n"
            "`configs/perce_longlamp.py:review,qwen3-14b` with `" + " ".join(f"--config.{o}" for o in LORA)
            + "` and `--config.lora.quantize_base=none|int8|nf4`: the real PerCE train step (both passes through the "
            "frozen base) compiled for each slice. Per chip, from XLA's memory analysis of the compiled step; "
            "'base per chip' is the frozen weights as stored (the adapted projections quantized; embeddings, "
            "norms and head stay bfloat16).\n\n" + table)
    print(table)
    if not args.no_write:
        write_section("QLoRA plans (TPU compile on CPU)", body)


if __name__ == "__main__":
    main()
