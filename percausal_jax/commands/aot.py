"""``percausal aot --config X --topology v5p:2x4x4``: will this configuration fit that TPU slice, and how fast?"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("aot", help="compile the train step for a TPU topology and report memory and FLOPs")
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True, help="e.g. v5p:2x4x4 (v5p-64), v5e:16x16, v6e:8x8")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the predicted step time")
    p.add_argument("--counterfactual-len", type=int, default=None, help="counterfactual sequence length")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from percausal_jax.commands._args import AT_LEAST_1, check
    from percausal_jax.config import Bound, RunConfig, load_config
    from percausal_jax.training.aot import plan
    from percausal_jax.training.setup import model_config_of

    check(args, {"mfu": Bound(0, 1, low_open=True), "counterfactual_len": AT_LEAST_1})

    rc = RunConfig.from_config(load_config(args.config, args.overrides), where=args.config)
    model_config = model_config_of(rc.model.path)
    result = plan(rc, model_config, args.topology, mfu=args.mfu, counterfactual_len=args.counterfactual_len)
    print(f"{args.config}: {model_config.model_type}, {model_config.num_params() / 1e9:.2f}B parameters, "
          f"objective {rc.objective.name}")
    print(result.report())
    return 0 if result.fits else 1
