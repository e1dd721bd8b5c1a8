"""BM25 ranking agreement before/after the switch from bm25s (Robertson idf, which zeroes terms found in more than
half of a profile; ties in profile order) to ``rank_bm25.BM25Okapi`` (the reference implementations' library: idf
floor ε·mean idf, k1 = 1.5, b = 0.75, ε = 0.25; ties later-item-first, :func:`percausal_jax.data.retrieval.bm25_order`).

On the LaMP-3 and LongLaMP fixtures of the tests and on the identification benchmark's synthetic records: for how
many records (one query and its profile) the top-k lists agree (ordered, and as sets), and — to separate the idf
floor from the tie rule — how many agree when only the tie rule changes (Robertson idf, new tie order).
Needs ``pip install bm25s`` (the old implementation; not a dependency any more).

    .venv/bin/python bench/bm25_agreement.py [--no-write]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, info_block, machine_info, md_table, write_section

sys.path.insert(0, str(REPO / "tests" / "data"))


def old_scores(query: str, docs: list[str]) -> np.ndarray:
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    q, corpus = query.split(), [d.split() for d in docs]
    if not q or not any(corpus):
        return np.zeros(len(corpus))
    index = bm25s.BM25(method="robertson", k1=1.5, b=0.75, dtype="float64")
    index.index(corpus, show_progress=False)
    return np.asarray(index.get_scores(q))


def record_sets() -> dict[str, list[dict]]:
    from tokenizer_fixture import write_lamp, write_longlamp

    from percausal_jax.data import sources, synthetic

    tmp = Path(tempfile.mkdtemp())
    lamp = []
    for split, n in (("train", 12), ("dev", 6)):
        qp = write_lamp(tmp / "lamp", split, n)
        lamp += sources.read_lamp(qp, sources.lamp_outputs_path(qp))
    root = write_longlamp(tmp / "ll", {"train": 12, "val": 6})
    longlamp = [r for split in ("train", "val") for r in sources.read_longlamp(sources.find_longlamp(root, split=split))]
    return {"LaMP-3 fixture (lamp_questions)": lamp, "LongLaMP product_review fixture (longlamp_rows)": longlamp,
            "synthetic.generate(15, 6, 4, seed 0) (identification bench)": synthetic.generate(15, 6, 4, 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from percausal_jax.data.prompts import get_task
    from percausal_jax.data.retrieval import bm25_order

    rows = []
    for name, records in record_sets().items():
        pairs = []
        for r in records:
            task = get_task(r)
            query, docs = task.query(r), [task.document(p) for p in r["profile"]]
            scores = old_scores(query, docs)
            old = np.argsort(-scores, kind="stable").tolist()
            old_idf_new_ties = np.argsort(scores, kind="stable")[::-1].tolist()
            pairs.append((old, bm25_order(query, docs), old_idf_new_ties))
        sizes = sorted({len(p[0]) for p in pairs})
        for k in (1, 2, 4, None):
            if k is not None and k > max(sizes):
                continue
            rows.append([name if k == 1 else "", f"{len(pairs)} (profiles of {sizes[0]}–{sizes[-1]})" if k == 1 else "",
                         k or "all", f"{sum(o[:k] == n[:k] for o, n, _ in pairs)}/{len(pairs)}",
                         f"{sum(set(o[:k]) == set(n[:k]) for o, n, _ in pairs)}/{len(pairs)}",
                         f"{sum(t[:k] == n[:k] for _, n, t in pairs)}/{len(pairs)}"])
    body = "\n".join([info_block(machine_info()), "",
                      md_table(["records", "n", "top-k", "same order", "same set", "old idf + new ties = new"],
                               rows), "",
                      "On the tiny LaMP / LongLaMP fixtures every difference is the tie rule (every score ties: the "
                      "query words are in every item); on the synthetic profiles the ε·mean-idf floor changes the "
                      "rankings too. BM25Okapi's scores are those of `rank_bm25` (tested); the order of tied scores "
                      "is a stable reverse argsort, which `np.argsort` (the reference's `get_top_n`) matches only "
                      "where its default sort keeps ties in place (machine-dependent)."])
    print(body)
    if not args.no_write:
        write_section("BM25 ranking agreement: bm25s (Robertson) → rank_bm25.BM25Okapi", body)


if __name__ == "__main__":
    main()
