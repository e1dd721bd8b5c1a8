"""LaMP questions (+ outputs) → canonical JSONL (logic: percausal_jax.data.sources).

Fetch the task's files first, e.g. https://ciir.cs.umass.edu/downloads/LaMP/LaMP_3/dev/dev_questions.json and
dev_outputs.json (time-based splits under .../LaMP/time/LaMP_3/...).

    python data_prep/lamp.py --questions dev_questions.json --out dev.jsonl    # outputs read from beside it
    python data_prep/lamp.py --questions test_questions.json --task LaMP-3 --out test.jsonl  # no outputs: no targets
"""

import argparse
import sys
from pathlib import Path

from percausal_jax.data import sources
from percausal_jax.data.records import write_jsonl
from percausal_jax.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=Path, required=True, help="{split}_questions.json")
    p.add_argument("--outputs", type=Path, help="{split}_outputs.json (default: beside the questions, if present)")
    p.add_argument("--task", help="LaMP-1 ... LaMP-7 (default: from the outputs file)")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl")
    args = p.parse_args(argv)
    try:
        outputs = args.outputs or sources.lamp_outputs_path(args.questions)
        records = sources.read_lamp(args.questions, outputs, task=args.task, require_output=outputs is not None)
        n = write_jsonl(args.out, records)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(f"wrote {n} canonical records to {args.out}" + ("" if outputs else " (no outputs: no targets)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
