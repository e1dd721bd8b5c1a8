"""The ``percausal`` command line. Each subcommand lives in its own module and exposes ``register(subparsers)``.

Bad input raises :class:`percausal_jax.errors.UserError`; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from percausal_jax.errors import UserError

# subcommand name -> module that defines register(subparsers); imported lazily so `percausal --help` is fast.
SUBCOMMANDS = {
    "convert-gguf": "percausal_jax.hf.gguf",
    "generate": "percausal_jax.commands.generate",
    "synth": "percausal_jax.data.synthetic",
    "prepare": "percausal_jax.commands.prepare",
    "score": "percausal_jax.commands.score",
    "train": "percausal_jax.commands.train",
    "export": "percausal_jax.commands.export",
    "eval": "percausal_jax.commands.eval",
    "aot": "percausal_jax.commands.aot",
    "demo": "percausal_jax.commands.demo",
    "sweep": "percausal_jax.commands.sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="percausal", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False) or any(not e.startswith("--config.") for e in extra):
        build_parser().parse_args(argv)  # reports the unknown arguments the standard way
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"percausal {args.command}: error: {e}", file=sys.stderr)
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
