"""Retrievers (bm25, recency, random, contriever) and token-budget fitting."""

from __future__ import annotations

import numpy as np
import pytest

from percausal_jax.data import build_pair
from percausal_jax.data.retrieval import (Contriever, PromptTooLong, bm25_order, fit_to_budget, random_order,
                                          rank, recency_order, top_k)
from percausal_jax.errors import UserError

# Hand-checked BM25Okapi (k1=1.5, b=0.75), query "red apple": N=5, avgdl=11/5=2.2, idf(red)=idf(apple)=ln(3.5/2.5).
#   doc0 (dl 3, red+apple once each): 0.3365 * 2 * 2.5/(1 + 1.5*(0.25 + 0.75*3/2.2))       = 0.578
#   doc3 (dl 3, red twice):           0.3365 * 2*2.5/(2 + 1.5*(0.25 + 0.75*3/2.2))         = 0.430
#   doc1 (dl 2, apple once):          0.3365 * 2.5/(1 + 1.5*(0.25 + 0.75*2/2.2))           = 0.351
#   doc2, doc4: 0 (tie, kept in profile order)
DOCS = ["red apple pie", "green apple", "blue sky", "red red car", "dog"]


def test_bm25_hand_checked_order():
    assert bm25_order("red apple", DOCS) == [0, 3, 1, 2, 4]


def test_bm25_keeps_case_and_handles_empty_queries():
    assert bm25_order("apple", DOCS) == [1, 0, 2, 3, 4]  # the shorter document wins
    assert bm25_order("Apple", DOCS) == [0, 1, 2, 3, 4]  # no lowercasing: no match at all
    assert bm25_order("   ", DOCS) == [0, 1, 2, 3, 4]
    assert bm25_order("red", ["", ""]) == [0, 1]
    assert bm25_order("red", []) == []


def test_bm25_on_a_record_uses_the_task_query_and_clamps_k():
    profile = [{"text": d, "score": "3"} for d in DOCS] + [{"text": "What is the score of the following", "score": 1}]
    record = {"id": "r", "task": "LaMP-3", "profile": profile,
              "input": "What is the score of the following review on a scale of 1 to 5? review: red apple"}
    assert [p["text"] for p in top_k(record, 3, "bm25")] == ["red apple pie", "red red car", "green apple"]
    assert len(top_k(record, 50, "bm25")) == len(profile)
    assert top_k({**record, "profile": []}, 4, "bm25") == []


def test_recency_newest_first_by_date_timestamp_or_year():
    assert recency_order([{"date": "2011-05-03"}, {"date": "2012-01-01"}, {"date": "2011-12-30"}]) == [1, 2, 0]
    assert recency_order([{"timestamp": 1700000000}, {"timestamp": 1800000000.5}]) == [1, 0]
    assert recency_order([{"year": 2019}, {"year": "2021"}, {"year": 2019}]) == [1, 2, 0]  # tie: later item first
    assert recency_order([{"date": "2001", "timestamp": 9}, {"date": "2002", "timestamp": 1}]) == [1, 0]


def test_recency_without_a_shared_time_field_reverses_the_profile():
    assert recency_order([{"date": "2020-01-01"}, {"text": "no date"}, {"date": "2019-01-01"}]) == [2, 1, 0]
    assert recency_order([]) == []


def test_random_is_a_seeded_permutation_per_record():
    order = random_order(10, seed=0, record_id="r1")
    assert sorted(order) == list(range(10))
    assert order == random_order(10, seed=0, record_id="r1")
    assert order != random_order(10, seed=1, record_id="r1")
    assert order != random_order(10, seed=0, record_id="r2")
    record = {"id": "r1", "task": "LaMP-7", "input": "x", "profile": [{"text": str(i)} for i in range(10)]}
    assert [int(p["text"]) for p in top_k(record, 99, "random")] == order  # without replacement, k clamped


def test_unknown_retriever_and_missing_contriever_are_user_errors():
    record = {"id": "r1", "task": "LaMP-7", "input": "x", "profile": [{"text": "a"}]}
    with pytest.raises(UserError, match="retriever 'tfidf': expected one of"):
        rank(record, "tfidf")
    with pytest.raises(UserError, match="needs an encoder"):
        rank(record, "contriever")


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A tiny random BERT with a word-level tokenizer, saved like a contriever checkpoint."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("contriever")
    words = "red apple pie green blue sky car dog the a kettle boils fast".split()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(d)
    return d


def test_contriever_mean_pools_without_padding_and_ranks_by_dot_product(tiny_encoder_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    docs = ["red apple pie green blue sky car", "dog", "the kettle boils fast", "a"]
    encoder = Contriever(tiny_encoder_dir, batch_size=4)  # one padded batch
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    model = AutoModel.from_pretrained(tiny_encoder_dir).eval()
    with torch.no_grad():  # one text at a time: no padding, so a plain mean is the reference
        reference = np.stack([model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
                              for t in docs + ["red dog"]])
    np.testing.assert_allclose(encoder.embed(docs + ["red dog"]), reference, rtol=1e-5, atol=1e-5)
    expected = np.argsort(-(reference[:4] @ reference[4]), kind="stable").tolist()
    assert encoder.order("red dog", docs) == expected
    record = {"id": "r", "task": "LaMP-7", "input": "tweet: red dog", "profile": [{"text": t} for t in docs]}
    assert top_k(record, 9, "contriever", contriever=encoder) == [record["profile"][i] for i in expected]


def test_contriever_bad_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load a contriever encoder"):
        Contriever(tmp_path)


# ----------------------------------------------------------------------------------------------- budget fitting

ITEMS = [{"id": "best", "text": "a b c d"}, {"id": "mid", "text": "e f g h i j"}, {"id": "low", "text": "k l"}]


def build(items):
    return " ".join(["Q:"] + [item["text"] for item in items])


def n_words(text):
    return len(text.split())


def test_drop_removes_lowest_ranked_items_first():
    assert fit_to_budget(build, ITEMS, n_words, 13) == ("Q: a b c d e f g h i j k l", ITEMS)
    assert fit_to_budget(build, ITEMS, n_words, 8) == ("Q: a b c d", ITEMS[:1])  # "low" goes first though short
    assert fit_to_budget(build, ITEMS, n_words, 1) == ("Q:", [])


def test_truncate_clips_every_item_to_the_largest_fitting_word_cap():
    prompt, kept = fit_to_budget(build, ITEMS, n_words, 8, mode="truncate", text_field="text")
    assert prompt == "Q: a b e f k l"  # cap 2 fits (7 words), cap 3 would need 9
    assert [item["id"] for item in kept] == ["best", "mid", "low"]
    assert ITEMS[0]["text"] == "a b c d"  # inputs are not modified
    prompt, kept = fit_to_budget(build, ITEMS, n_words, 3, mode="truncate", text_field="text")
    assert (prompt, [item["id"] for item in kept]) == ("Q: a e", ["best", "mid"])  # 1 word each for 3 is too long
    spaced = [{"text": "a  b\nc d"}]
    assert fit_to_budget(build, spaced, n_words, 3, mode="truncate", text_field="text")[1] == [{"text": "a  b"}]


def test_prompt_too_long_even_without_items():
    with pytest.raises(PromptTooLong) as e:
        fit_to_budget(build, ITEMS, n_words, 0, mode="truncate", text_field="text")
    assert (e.value.n_tokens, e.value.max_prompt_len) == (1, 0)
    assert isinstance(e.value, UserError) and "even without profile items" in str(e.value)
    with pytest.raises(UserError, match="budget mode 'shrink'"):
        fit_to_budget(build, ITEMS, n_words, 5, mode="shrink")


def test_amazon_recency_then_budget_keeps_the_newest_reviews():
    review = {"item_title": "Mug", "item_description": "Blue.", "rating": 4.0, "title": "Nice"}
    record = {"id": "a1", "task": "amazon_review", "input": "Kettle", "output": "Good.",
              "target": {"item_title": "Kettle", "item_description": "Steel.", "rating": 5.0, "title": "Wow"},
              "profile": [{**review, "text": f"review {t}", "timestamp": t} for t in (3, 9, 5, 1)]}
    items = top_k(record, 8, "recency")
    assert [item["timestamp"] for item in items] == [9, 5, 3, 1]
    full = n_words(build_pair(record, items).personal.user)
    prompt, kept = fit_to_budget(lambda xs: build_pair(record, xs).personal.user, items, n_words, full - 1)
    assert [item["timestamp"] for item in kept] == [9, 5, 3]
    assert "[Review 1]:\n- [Item Title]: Mug\n- [Item Description]: Blue.\n- [Review Rating]: 4.0\n" \
           "- [Review Title]: Nice\n- [Review Text]: review 9\n" in prompt
