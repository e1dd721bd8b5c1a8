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
    "score": "percausal_jax.commands.score",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="percausal", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"percausal {args.command}: error: {e}", file=sys.stderr)
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
