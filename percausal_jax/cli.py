"""Train personalized LLMs with token-level causal objectives (PerCE, NextQuill) on TPU, GPU or CPU: start from a
Hugging Face model and data, fine-tune it (fully or with LoRA) so that it writes like each user, and export it back
to Hugging Face or as a PEFT adapter.

Typical order: prepare (your data -> prompt records) -> train -> eval -> export. For a first run, `percausal demo`
does all of it on a small embedded model and a synthetic set, in minutes on a CPU. Each command's flags: `percausal
COMMAND --help`.

Developer notes
---------------
The text above is ``percausal --help``'s description. Each subcommand lives in its own module under
:mod:`percausal_jax.commands` and exposes ``register(subparsers)``; its ``run(args)`` maps the flags to one call of
the library.

Bad input raises :class:`percausal_jax.errors.UserError`; here it becomes one line on stderr and exit code 2
(3 for a :class:`~percausal_jax.errors.StorageError`: the disk or bucket failed, the input was fine; 4 for a
:class:`~percausal_jax.errors.ProcessMismatch`: the processes of a multi-process run disagree).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from percausal_jax.errors import StorageError, UserError

DESCRIPTION = __doc__.partition("\nDeveloper notes\n")[0].strip()  # --help: the docstring up to its notes
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space left / file too large (ulimit -f) / over quota

# subcommand name -> module that defines register(subparsers); imported lazily so `percausal --help` is fast.
SUBCOMMANDS = {
    "convert-gguf": "percausal_jax.commands.convert_gguf",
    "generate": "percausal_jax.commands.generate",
    "synth": "percausal_jax.commands.synth",
    "prepare": "percausal_jax.commands.prepare",
    "score": "percausal_jax.commands.score",
    "train": "percausal_jax.commands.train",
    "export": "percausal_jax.commands.export",
    "eval": "percausal_jax.commands.eval",
    "aot": "percausal_jax.commands.aot",
    "demo": "percausal_jax.commands.demo",
    "sweep": "percausal_jax.commands.sweep",
}


class _Formatter(argparse.HelpFormatter):
    """Wraps each paragraph of the description by itself (argparse's own formatter joins them into one)."""

    def _fill_text(self, text, width, indent):
        return "\n\n".join(super(_Formatter, self)._fill_text(part, width, indent) for part in text.split("\n\n"))


class _Parser(argparse.ArgumentParser):
    """Argument errors as the other input errors: one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="percausal", description=DESCRIPTION, formatter_class=_Formatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        overrides = getattr(args, "accepts_overrides", False)
        unknown = [e for e in extra if not (overrides and e.startswith("--config."))]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # argument errors (exit 2) and --help (exit 0): already reported
        return int(e.code or 0)
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"percausal {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a write that ran out of room (atomic writers have already removed their temporary file)
        if e.errno not in FULL:
            raise
        what = f"{e.filename}: " if e.filename else ""
        print(f"percausal {args.command}: error: {what}{e.strerror} (the disk is full or over a file-size limit); "
              "nothing partial was published: make room and re-run the same command", file=sys.stderr)
        return StorageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
