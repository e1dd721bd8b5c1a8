"""Amazon reviews as processed by DPL (used by NextQuill) → canonical ``amazon_review`` JSONL
(logic: percausal_jax.data.sources).

    python data_prep/amazon_dpl.py --category Books --split train --out train.jsonl      # from the hub
    python data_prep/amazon_dpl.py --main main.jsonl --meta meta.jsonl --out train.jsonl  # local JSONL/parquet
    python data_prep/amazon_dpl.py --main DIR_MAIN --meta DIR_META --category Books --split val --out val.jsonl

``--main`` / ``--meta``: files, folders (local or ``gs://``; a snapshot root with one sub-folder per category, or
one category's folder) or hub ids, default ``SnowCharmQ/DPL-main`` / ``SnowCharmQ/DPL-meta`` (only the category's
``{split}`` and ``full`` parquet files are downloaded, into the Hugging Face cache).
"""

import argparse
import sys

from percausal_jax.data import sources
from percausal_jax.data.files import write_jsonl
from percausal_jax.data.records import SkipReport
from percausal_jax.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--category", help=f"DPL category (hub config / sub-folder): {', '.join(sources.DPL_CATEGORIES)}")
    p.add_argument("--split", choices=sources.DPL_SPLITS, help="split of DPL-main")
    p.add_argument("--main", help=f"DPL-main rows: file, folder or hub id (default {sources.DPL_MAIN_HUB_ID})")
    p.add_argument("--meta", help=f"DPL-meta rows: file, folder or hub id (default {sources.DPL_META_HUB_ID})")
    p.add_argument("--out", required=True, help="output .jsonl (local path or gs:// URL)")
    p.add_argument("--strict", action="store_true", help="rows with an empty review text are errors, not skipped")
    args = p.parse_args(argv)
    if (args.main is None or args.meta is None) and (args.category is None or args.split is None):
        p.error("give --main and --meta (files or folders), or --category and --split (hub download)")
    report = SkipReport()
    try:
        main_files, meta_files = sources.find_amazon(args.main or sources.DPL_MAIN_HUB_ID,
                                                     args.meta or sources.DPL_META_HUB_ID,
                                                     split=args.split, config=args.category)
        n = write_jsonl(args.out, sources.read_amazon(main_files, meta_files, strict=args.strict, report=report))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(f"wrote {n} canonical records to {args.out}")
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
