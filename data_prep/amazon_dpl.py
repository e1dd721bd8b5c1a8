"""Amazon reviews as processed by DPL (used by NextQuill) → canonical ``amazon_review`` JSONL
(logic: percausal_jax.data.sources).

    python data_prep/amazon_dpl.py --category Books --split train --out train.jsonl      # fetch with `datasets`
    python data_prep/amazon_dpl.py --main main.jsonl --meta meta.jsonl --out train.jsonl  # local JSONL/parquet
"""

import argparse
import sys
import tempfile
from pathlib import Path

from percausal_jax.data import sources
from percausal_jax.data.records import write_jsonl
from percausal_jax.errors import UserError


def fetch(category: str, split: str, folder: Path) -> tuple[Path, Path]:
    """Downloads SnowCharmQ/DPL-main (split) and DPL-meta (split "full") for one category as parquet."""
    from datasets import load_dataset

    main, meta = folder / f"{category}-{split}.parquet", folder / f"{category}-meta.parquet"
    load_dataset("SnowCharmQ/DPL-main", category, split=split).to_parquet(str(main))
    load_dataset("SnowCharmQ/DPL-meta", category, split="full").to_parquet(str(meta))
    return main, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--category", help="Books, Movies_and_TV or CDs_and_Vinyl (download)")
    p.add_argument("--split", choices=("train", "val", "test"), help="split to download")
    p.add_argument("--main", type=Path, help="local DPL-main rows (.jsonl/.parquet)")
    p.add_argument("--meta", type=Path, help="local DPL-meta rows (.jsonl/.parquet)")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl")
    args = p.parse_args(argv)
    local = args.main is not None and args.meta is not None
    if local == (args.category is not None and args.split is not None):
        p.error("give either --main and --meta (local files) or --category and --split (download)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            main_path, meta_path = (args.main, args.meta) if local else fetch(args.category, args.split, Path(tmp))
            n = write_jsonl(args.out, sources.read_amazon(main_path, meta_path))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(f"wrote {n} canonical records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
