"""Padding and compiled shapes of the batching stage: bucketing vs packing, at LongLaMP-like lengths.

    python bench/packing.py [--examples 4096] [--batch 8] [--multiple 64] [--lookahead 64]

No model and no tokenizer: examples of the drawn lengths (``bench/lengths.py`` ``longlamp``: personalized prompt P,
query Q, response R incl. its end token; random ids) go as featurized ``Kept`` items through the pipeline's own
last stage (``data.pipeline.PairedBatchIterator``: bucketing, or packing with its capacities and lookahead), over
an endless stream (so no end-of-epoch tail is measured), until ``--examples`` examples have been batched. The
length limits are those of the distribution: ``max_prompt_len`` 2048, ``max_response_len`` 512, so the longest
admissible sequence is 2559 tokens, for the counterfactual array too (a profile-free prompt may be as long as
``max_prompt_len``).

Padding is reported as padded slots / real tokens (real: ``segment_ids != 0`` for the two sequence arrays,
``weight != 0`` for the response slots), per array and over the three together; "shapes" counts the distinct
``(Lp, Lc, R)`` of the batches (each one a compilation of the train step). The "HEAD" row is the previous packing:
the placement of ``pack_lookahead=0`` (plain first fit, checked identical) with each batch cut to the smallest bucket
boundaries holding its fullest row, as the pipeline used to pad.

Prints a markdown table.
"""

from __future__ import annotations

import argparse

import grain
import numpy as np
from lengths import LONGLAMP

from percausal_jax.data.featurize import FeaturizeConfig, Kept
from percausal_jax.data.pairing import PairedExample, shape_of
from percausal_jax.data.pipeline import PairedBatchIterator
from percausal_jax.data.shapes import ARRAYS, Buckets, Packing
from percausal_jax.errors import UserError


def examples(n: int, seed: int) -> list[Kept]:
    rs = np.random.RandomState(seed + 1)
    out = []
    for p, q, r in LONGLAMP.sample(n, seed=seed):
        ids = rs.randint(1, 1000, p + q + r).tolist()
        out.append(Kept(PairedExample(tuple(ids[:p]), tuple(ids[p:p + q]), tuple(ids[p + q:])), 1))
    return out


def measure(items: list[Kept], batch: int, buckets: Buckets, packing, n_examples: int, head: bool = False) -> dict:
    parent = iter(grain.MapDataset.source(items).repeat(None).to_iter_dataset())
    it = PairedBatchIterator(parent, batch, buckets, packing)
    real, slots, shapes, batches = np.zeros(3), np.zeros(3), set(), 0
    while it.featurize_stats.kept < n_examples:
        b = next(it)
        batches += 1
        used = [(b.personal.segment_ids != 0).sum(1), (b.counterfactual.segment_ids != 0).sum(1),
                (b.response.weight != 0).sum(1)]
        shape = buckets.fit(tuple(int(u.max()) for u in used)) if head else shape_of(b)
        shapes.add(shape)
        real += [u.sum() for u in used]
        slots += np.asarray(shape) * batch
    pad = (slots - real) / real
    return {"padding": dict(zip(ARRAYS, pad)), "total": (slots.sum() - real.sum()) / real.sum(),
            "shapes": len(shapes), "batches": batches, "per_batch": it.featurize_stats.kept / batches,
            "shape": sorted(shapes)[0] if len(shapes) == 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=4096, help="examples batched per variant")
    ap.add_argument("--batch", type=int, default=8, help="rows per batch (per_process_batch_size)")
    ap.add_argument("--multiple", type=int, default=64, help="data.bucket_multiple")
    ap.add_argument("--lookahead", type=int, default=64, help="data.pack_lookahead of the lookahead variants")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    fcfg = FeaturizeConfig(max_prompt_len=LONGLAMP.max_prompt_len, max_response_len=LONGLAMP.max_response_len)
    buckets = Buckets.multiples(fcfg, args.multiple)
    items = examples(args.examples + 256, args.seed)
    W = args.lookahead
    variants = [
        ("bucketed (one example per row)", False, False, ""),
        ("packed, HEAD (first fit, cut to the fullest row's bucket)", (0, 0, 0, 0), True, ""),
        ("packed, derived capacity, no lookahead", (0, 0, 0, 0), False, ""),
        (f"packed, derived capacity, lookahead {W}", (0, 0, 0, W), False, ""),
        (f"packed 4096 / 2560 / 1024, lookahead {W}", (4096, 2560, 1024, W), False, ""),
        ("packed 8192 / 2560 / 1792, no lookahead", (8192, 2560, 1792, 0), False, ""),
        (f"packed 8192 / 2560 / 1792, lookahead {W}", (8192, 2560, 1792, W), False, ""),
        (f"packed 4096 / 1024 / 1024, lookahead {W}", (4096, 1024, 1024, W), False, "¹"),
        (f"packed 4096 / 1280 / 896, lookahead {W}", (4096, 1280, 896, W), False, "¹"),
    ]
    print(f"LongLaMP-like lengths ({LONGLAMP.describe()}); max_prompt_len {fcfg.max_prompt_len}, max_response_len "
          f"{fcfg.max_response_len}; batch {args.batch}; bucket multiple {args.multiple}; {args.examples} examples "
          "per variant.\n")
    print("| variant | personal | counterfactual | response | total | shapes | batches | examples / batch |")
    print("|---|---|---|---|---|---|---|---|")
    rejected = []
    for name, lens, head, mark in variants:
        if lens is False:
            packing = False
        else:
            try:
                packing = Packing.derive(fcfg, buckets, *lens)
            except UserError as e:  # below the longest admissible example: measured, but not a valid config
                rejected.append(str(e))
                packing = Packing(*lens)
        m = measure(items, args.batch, buckets, packing, args.examples, head=head)
        shape = f" {m['shape']}" if m["shape"] else ""
        print(f"| {name}{mark} | " + " | ".join(f"{100 * m['padding'][a]:.1f}%" for a in ARRAYS)
              + f" | **{100 * m['total']:.1f}%** | {m['shapes']}{shape} | {m['batches']} | {m['per_batch']:.2f} |")
    print("\nPadding = padded slots / real tokens. Capacities are personal / counterfactual / response tokens per row.")
    if rejected:
        print("\n¹ Not admissible at these length limits (the pipeline refuses it; measured by building the packing "
              "directly, which works here only because every drawn counterfactual is ≤ 1023 tokens): "
              f"{rejected[0]}")


if __name__ == "__main__":
    main()
