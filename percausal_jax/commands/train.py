"""``percausal train --config FILE --workdir DIR [--config.a.b=v ...] [--base-moved]``: train (or resume) one
run."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from percausal_jax.config import describe_keys

    p = subparsers.add_parser("train", help="train with a token-level objective (resumes from DIR if present)",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="config keys (--config.KEY=VALUE overrides the config file's value):\n"
                                     + describe_keys())
    p.add_argument("--config", required=True, help="Python config file with get_config() (see configs/)")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, tensorboard/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator address host:port "
                                                       "(or JAX_COORDINATOR_ADDRESS; TPU pods are detected)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--base-moved", action="store_true",
                   help="resume with the base model under a new model.path: accepted when it holds the weights the "
                        "checkpoint was trained on (same fingerprint); other weights are always refused")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from percausal_jax.training.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before anything touches a device
    from percausal_jax.config import RunConfig, load_config
    from percausal_jax.training.loop import train

    rc = RunConfig.from_config(load_config(args.config, args.overrides), where=args.config)
    last = train(rc, args.workdir, progress=not args.no_progress, base_moved=args.base_moved)
    if last:
        print(f"step {last['step']}: loss {last['loss']:.4f}" +
              (f", eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))
    return 0
