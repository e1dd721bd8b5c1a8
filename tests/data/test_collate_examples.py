"""``pairing.collate_examples``: one example per row, lengths rounded up, spare rows all padding or a fill example."""

import numpy as np

from percausal_jax.data.pairing import PairedExample, collate, collate_examples

A = PairedExample((1, 2, 3), (1,), (7, 8, 2))
B = PairedExample((4,), (4, 5), (9, 2))


def test_rounds_lengths_and_pads_with_empty_rows():
    batch = collate_examples([A, B], 3, multiple=4)
    assert batch.personal.tokens.shape == (3, 8) and batch.counterfactual.tokens.shape == (3, 4)
    assert batch.response.ids.shape == (3, 4)
    ref = collate([[A], [B], []], 8, 4, 4)
    for got, want in zip(np.asarray(batch.response.weight), np.asarray(ref.response.weight)):
        np.testing.assert_array_equal(got, want)
    assert batch.response.weight[2].sum() == 0 and (batch.personal.segment_ids[2] == 0).all()


def test_fill_repeats_an_example():
    batch = collate_examples([A], 2, multiple=16, fill=A)
    assert batch.personal.tokens.shape == (2, 16)
    np.testing.assert_array_equal(batch.personal.tokens[1], batch.personal.tokens[0])
    np.testing.assert_array_equal(batch.response.index_counterfactual[1], batch.response.index_counterfactual[0])
