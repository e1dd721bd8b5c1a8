"""LongLaMP → canonical JSONL, one config and split at a time (logic: percausal_jax.data.sources).

    python data_prep/longlamp.py --config product_review_user --split val --out val.jsonl   # fetch with `datasets`
    python data_prep/longlamp.py --raw DIR_OR_PARQUET --split val --out val.jsonl           # local parquet files
"""

import argparse
import sys
import tempfile
from pathlib import Path

from percausal_jax.data import sources
from percausal_jax.data.records import write_jsonl
from percausal_jax.errors import UserError


def fetch(config: str, split: str, folder: Path) -> Path:
    """Downloads one split with `datasets` and stores it as parquet (record ids become {config}-{split}-{row})."""
    from datasets import load_dataset

    path = folder / f"{config}-{split}.parquet"
    load_dataset("LongLaMP/LongLaMP", config, split=split).to_parquet(str(path))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sources.LONGLAMP_CONFIGS, help="HF config to fetch (without --raw)")
    p.add_argument("--split", choices=sources.LONGLAMP_SPLITS, required=True)
    p.add_argument("--raw", type=Path, help="a local parquet/JSONL file, or a folder searched for the split's files")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl")
    args = p.parse_args(argv)
    if (args.raw is None) == (args.config is None):
        p.error("give exactly one of --config (download) and --raw (local files)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.raw is None:
                files = [fetch(args.config, args.split, Path(tmp))]
            else:
                files = sources.longlamp_files(args.raw, args.split) if args.raw.is_dir() else [args.raw]
            if not files:
                raise UserError(f"{args.raw}: no parquet files for split {args.split!r}")
            n = write_jsonl(args.out, sources.read_longlamp(files))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(f"wrote {n} canonical records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
