"""LongLaMP → canonical JSONL, one config and split at a time (logic: percausal_jax.data.sources).

    python data_prep/longlamp.py --config product_review_user --split val --out val.jsonl   # from the hub
    python data_prep/longlamp.py --input DIR --config product_review_user --split val --out val.jsonl  # snapshot
    python data_prep/longlamp.py --input gs://bucket/longlamp/product_review_user --split val --out gs://b/val.jsonl

``--input``: a hub dataset id (default ``LongLaMP/LongLaMP``; only ``{config}/{split}-*.parquet`` is downloaded,
into the Hugging Face cache; ``HF_HUB_OFFLINE=1`` uses the cache alone), a snapshot root (``--config`` names the
sub-folder), one config's folder, or a parquet/JSONL file; local or ``gs://``. ``--raw`` is the old name of
``--input``. Record ids are ``{file stem}-{row}``, unique across the split's shards.
"""

import argparse
import sys

from percausal_jax.data import sources
from percausal_jax.data.files import write_jsonl
from percausal_jax.data.records import SkipReport
from percausal_jax.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", help=f"hub id, folder or file (default {sources.LONGLAMP_HUB_ID})")
    p.add_argument("--raw", help="same as --input (kept for old scripts)")
    p.add_argument("--config", help=f"LongLaMP config: {', '.join(sources.LONGLAMP_CONFIGS)}")
    p.add_argument("--split", choices=sources.LONGLAMP_SPLITS, required=True)
    p.add_argument("--out", required=True, help="output .jsonl (local path or gs:// URL)")
    p.add_argument("--strict", action="store_true", help="rows with an empty input/output are errors, not skipped")
    args = p.parse_args(argv)
    if args.input is not None and args.raw is not None:
        p.error("give --input or --raw (the same option), not both")
    source = args.input or args.raw or sources.LONGLAMP_HUB_ID
    report = SkipReport()
    try:
        files = sources.find_longlamp(source, split=args.split, config=args.config)
        n = write_jsonl(args.out, sources.read_longlamp(files, strict=args.strict, report=report))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(f"wrote {n} canonical records to {args.out}")
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
