"""``percausal export --workdir RUN [--step N] --out HF_DIR [--merge-lora | --peft] [--config.a.b=v ...]
[--base-moved]``: a checkpoint back to a Hugging Face directory (local or ``gs://``), on whatever devices this
machine has."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                              epilog="--config.a.b=v overrides the run's saved config, e.g. "
                                     "--config.model.path=DIR --base-moved when the base model has moved")
    p.add_argument("--workdir", required=True, help="the training run (local directory or gs:// URL)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", required=True, help="output directory or gs:// URL (written atomically: config.json / "
                                                "adapter_config.json appear last)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the parameter dtype)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--merge-lora", action="store_true", help="LoRA run: adapters merged into the base weights")
    form.add_argument("--peft", action="store_true", help="LoRA run: a PEFT adapter (adapter_config.json + "
                                                          "adapter_model.safetensors) for the base model")
    p.add_argument("--base-moved", action="store_true",
                   help="the base model is now elsewhere (--config.model.path=NEW): accepted when NEW holds the "
                        "weights the run was trained on (same fingerprint); other weights are always refused")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from percausal_jax.commands._args import NONNEG, check
    from percausal_jax.training.export import export_checkpoint

    check(args, {"step": NONNEG})

    form = "peft" if args.peft else "merged" if args.merge_lora else "full"
    out = export_checkpoint(args.workdir, args.out, step=args.step, dtype=args.dtype, form=form,
                            overrides=getattr(args, "overrides", ()), base_moved=args.base_moved)
    print(out)
    return 0
