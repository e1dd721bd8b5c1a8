"""``percausal synth --out-dir DIR``: a synthetic personalization dataset with a planted, token-visible style per
user (train.jsonl and test.jsonl split by user, optionally val.jsonl with further users). The generator is
:mod:`percausal_jax.data.synthetic`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``percausal synth``."""
    from percausal_jax.data import synthetic

    p = subparsers.add_parser("synth", help="write a synthetic personalization dataset (train.jsonl, test.jsonl, "
                                            "optionally val.jsonl)",
                              description=synthetic.__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True, type=Path, help="folder for train.jsonl, test.jsonl (and val.jsonl)")
    p.add_argument("--users", type=int, default=20, help="number of users (default 20)")
    p.add_argument("--profile-items", type=int, default=6, help="profile texts per user (default 6)")
    p.add_argument("--per-user", type=int, default=8, help="target records per user (default 8)")
    p.add_argument("--test-frac", type=float, default=0.2, help="fraction of users held out for test (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--difficulty", choices=tuple(synthetic.LEVELS), default="easy",
                   help="how hard the style is to copy from the profile (default easy; see the module doc)")
    p.add_argument("--val-users", type=int, default=0,
                   help="also write val.jsonl with this many more users, disjoint from train and test (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generates, splits by user, writes the files atomically and prints the counts."""
    from percausal_jax.data.files import write_jsonl
    from percausal_jax.data.synthetic import generate, split_by_user
    from percausal_jax.errors import UserError

    for flag, value in (("--users", args.users), ("--profile-items", args.profile_items),
                        ("--per-user", args.per_user)):
        if value < 1:
            raise UserError(f"{flag} {value}: expected an integer >= 1")
    if not 0 <= args.test_frac < 1:
        raise UserError(f"--test-frac {args.test_frac}: expected a number in [0, 1)")
    if args.val_users < 0:
        raise UserError(f"--val-users {args.val_users}: expected an integer >= 0")
    shape = (args.profile_items, args.per_user, args.seed, args.difficulty)
    train, test = split_by_user(generate(args.users, *shape), args.test_frac, args.seed)
    files = [("train.jsonl", train), ("test.jsonl", test)]
    if args.val_users:  # users after the train/test ones, so those files do not change
        files.append(("val.jsonl", generate(args.val_users, *shape, first_user=args.users)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in files:
        write_jsonl(args.out_dir / name, records)
        print(f"wrote {len(records)} records from {len({r['user_id'] for r in records})} user(s) to "
              f"{args.out_dir / name}")
    return 0
