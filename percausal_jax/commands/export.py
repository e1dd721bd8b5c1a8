"""``percausal export --workdir DIR [--step N] --out HF_DIR``: a checkpoint back to a Hugging Face directory."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the parameter dtype)")
    p.set_defaults(func=run)


def run(args) -> int:
    from percausal_jax.training.export import export_checkpoint

    out = export_checkpoint(args.workdir, args.out, step=args.step, dtype=args.dtype)
    print(out)
    return 0
