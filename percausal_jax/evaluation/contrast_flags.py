"""The settings of profile-contrastive decoding (:mod:`percausal_jax.evaluation.contrast`): validation and the
``--contrast`` / ``--plausibility`` flags shared by ``percausal generate``, ``eval`` and ``score``. Free of jax, so
registering the subcommands stays fast."""

from __future__ import annotations

import math

from percausal_jax.errors import UserError


def validate(contrast: float, plausibility: float, *, names: tuple[str, str] = ("contrast", "plausibility")) -> None:
    """Raises :class:`UserError` naming the setting (``names``: how the caller calls them, e.g. CLI flags)."""
    if not isinstance(contrast, (int, float)) or not math.isfinite(contrast) or contrast < 0:
        raise UserError(f"{names[0]}={contrast}: expected a finite number ≥ 0 (the contrast strength β; 0 = off)")
    if not isinstance(plausibility, (int, float)) or not 0 <= plausibility <= 1:
        raise UserError(f"{names[1]}={plausibility}: expected a number in [0, 1] (α: only tokens with "
                        "p ≥ α · max p given the profile are eligible)")


def add_flags(parser, what: str = "decode profile-contrastively") -> None:
    """``--contrast BETA`` (default 0 = off) and ``--plausibility ALPHA`` (default 0.1) of an argparse parser."""
    parser.add_argument("--contrast", type=float, default=0.0, metavar="BETA",
                        help=f"β > 0: {what}, z = z_h + β·(z_h − z_0) with z_0 the logits without profile "
                             "(default 0: off)")
    parser.add_argument("--plausibility", type=float, default=0.1, metavar="ALPHA",
                        help="with --contrast: only tokens with p_h ≥ α · max p_h are eligible (default 0.1)")


def check_flags(args) -> None:
    """Validates the parsed ``--contrast`` / ``--plausibility`` (UserError naming the flag: exit code 2)."""
    validate(args.contrast, args.plausibility, names=("--contrast", "--plausibility"))
