"""``percausal export --workdir DIR [--step N] --out HF_DIR``: a checkpoint back to a Hugging Face directory."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the parameter dtype)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--merge-lora", action="store_true", help="LoRA run: adapters merged into the base weights")
    form.add_argument("--peft", action="store_true", help="LoRA run: a PEFT adapter (adapter_config.json + "
                                                          "adapter_model.safetensors) for the base model")
    p.set_defaults(func=run)


def run(args) -> int:
    from percausal_jax.training.export import export_checkpoint

    form = "peft" if args.peft else "merged" if args.merge_lora else "full"
    out = export_checkpoint(args.workdir, args.out, step=args.step, dtype=args.dtype, form=form)
    print(out)
    return 0
