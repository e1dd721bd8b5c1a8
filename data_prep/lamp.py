"""LaMP questions (+ outputs) → canonical JSONL (logic: percausal_jax.data.sources).

Fetch the task's files first, e.g. https://ciir.cs.umass.edu/downloads/LaMP/LaMP_3/dev/dev_questions.json and
dev_outputs.json (time-based splits under .../LaMP/time/LaMP_3/...).

    python data_prep/lamp.py --questions dev_questions.json --out dev.jsonl    # outputs read from beside it
    python data_prep/lamp.py --input DIR --split dev --out dev.jsonl          # DIR (or gs://, or a hub id) holds it
    python data_prep/lamp.py --questions test_questions.json --task LaMP-3 --out test.jsonl  # no outputs: no targets
"""

import argparse
import sys

from percausal_jax.data import sources
from percausal_jax.data.files import write_jsonl
from percausal_jax.data.records import SkipReport
from percausal_jax.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", help="{split}_questions.json (local path or gs:// URL)")
    p.add_argument("--input", help="a folder (local or gs://) or hub dataset id holding {split}_questions.json")
    p.add_argument("--split", choices=sources.LAMP_SPLITS, help="split to find in --input")
    p.add_argument("--config", help="sub-folder of --input, e.g. LaMP_3 or time/LaMP_3")
    p.add_argument("--outputs", help="{split}_outputs.json (default: beside the questions, if present)")
    p.add_argument("--task", help="LaMP-1 ... LaMP-7 (default: from the outputs file)")
    p.add_argument("--out", required=True, help="output .jsonl (local path or gs:// URL)")
    p.add_argument("--strict", action="store_true", help="questions with an empty input/output are errors")
    args = p.parse_args(argv)
    if (args.questions is None) == (args.input is None):
        p.error("give exactly one of --questions (a file) and --input (a folder or hub id)")
    report = SkipReport()
    try:
        questions = args.questions or sources.find_lamp(args.input, split=args.split, config=args.config)
        outputs = args.outputs or sources.lamp_outputs_path(questions)
        records = sources.read_lamp(questions, outputs, task=args.task, require_output=outputs is not None,
                                    strict=args.strict, report=report)
        n = write_jsonl(args.out, records)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(f"wrote {n} canonical records to {args.out}" + ("" if outputs else " (no outputs: no targets)"))
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
