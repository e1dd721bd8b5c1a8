"""Retrievers (bm25, recency, random, contriever) and token-budget fitting."""

from __future__ import annotations

import numpy as np
import pytest

from percausal_jax.data import build_pair, sources, synthetic
from percausal_jax.data.prompts import get_task
from percausal_jax.data.retrieval import (Contriever, PromptTooLong, bm25_order, fit_to_budget, random_order,
                                          rank, recency_order, top_k)
from percausal_jax.errors import UserError
from tests.data.tokenizer_fixture import write_lamp, write_longlamp

# Hand-checked BM25Okapi (k1=1.5, b=0.75), query "red apple": N=5, avgdl=11/5=2.2, idf(red)=idf(apple)=ln(3.5/2.5).
#   doc0 (dl 3, red+apple once each): 0.3365 * 2 * 2.5/(1 + 1.5*(0.25 + 0.75*3/2.2))       = 0.578
#   doc3 (dl 3, red twice):           0.3365 * 2*2.5/(2 + 1.5*(0.25 + 0.75*3/2.2))         = 0.430
#   doc1 (dl 2, apple once):          0.3365 * 2.5/(1 + 1.5*(0.25 + 0.75*2/2.2))           = 0.351
#   doc2, doc4: 0 (tie: the later document first, as argsort(scores)[::-1] with a stable sort)
DOCS = ["red apple pie", "green apple", "blue sky", "red red car", "dog"]


def test_bm25_hand_checked_order():
    assert bm25_order("red apple", DOCS) == [0, 3, 1, 4, 2]
    np.testing.assert_allclose(_okapi_scores("red apple", DOCS)[[0, 3, 1]], [0.578, 0.430, 0.351], atol=5e-4)


def test_bm25_keeps_case_and_handles_empty_queries():
    assert bm25_order("apple", DOCS) == [1, 0, 4, 3, 2]  # the shorter document wins
    assert bm25_order("Apple", DOCS) == [4, 3, 2, 1, 0]  # no lowercasing: no match at all, all tied
    assert bm25_order("   ", DOCS) == [4, 3, 2, 1, 0]
    assert bm25_order("red", ["", ""]) == [1, 0]  # BM25Okapi itself would divide by zero here
    assert bm25_order("red", []) == []


def test_bm25_on_a_record_uses_the_task_query_and_clamps_k():
    profile = [{"text": d, "score": "3"} for d in DOCS] + [{"text": "What is the score of the following", "score": 1}]
    record = {"id": "r", "task": "LaMP-3", "profile": profile,
              "input": "What is the score of the following review on a scale of 1 to 5? review: red apple"}
    assert [p["text"] for p in top_k(record, 3, "bm25")] == ["red apple pie", "red red car", "green apple"]
    assert len(top_k(record, 50, "bm25")) == len(profile)
    assert top_k({**record, "profile": []}, 4, "bm25") == []


def _okapi_scores(query: str, documents: list[str]) -> np.ndarray:
    from rank_bm25 import BM25Okapi

    return BM25Okapi([d.split() for d in documents]).get_scores(query.split())


def _reference_top_n(query: str, documents: list[str]) -> list[int]:
    """The reference's call: ``BM25Okapi(corpus).get_top_n(query.split(), corpus, n)``, returning indices."""
    from rank_bm25 import BM25Okapi

    corpus = [d.split() for d in documents]
    return BM25Okapi(corpus).get_top_n(query.split(), list(range(len(corpus))), n=len(corpus))


def _robertson_scores(query: str, documents: list[str]) -> np.ndarray:
    """The previous retriever (bm25s ``robertson``): idf = max(0, ln((N-n+0.5)/(n+0.5))), no (k1+1) factor."""
    corpus = [d.split() for d in documents]
    n_docs, avgdl = len(corpus), sum(map(len, corpus)) / len(corpus)
    scores = np.zeros(n_docs)
    for term in query.split():
        df = sum(term in doc for doc in corpus)
        idf = max(0.0, float(np.log((n_docs - df + 0.5) / (df + 0.5))))
        for i, doc in enumerate(corpus):
            tf = doc.count(term)
            scores[i] += idf * tf / (tf + 1.5 * (0.25 + 0.75 * len(doc) / avgdl))
    return scores


def _assert_reference_ranking(query: str, documents: list[str]) -> list[int]:
    """Our order has the reference's score sequence; it is get_top_n itself when no scores tie."""
    ours, reference, scores = bm25_order(query, documents), _reference_top_n(query, documents), \
        _okapi_scores(query, documents)
    assert sorted(ours) == list(range(len(documents)))
    np.testing.assert_array_equal(scores[ours], scores[reference])  # the full score order, bit for bit
    assert ours == np.argsort(scores, kind="stable")[::-1].tolist()  # ties: the later document first
    if len(set(scores.tolist())) == len(scores):
        assert ours == reference
    return ours


# An instruction-heavy LongLaMP query (the whole input is the query): "the", "a", "is", "for" occur in 3 of the 4
# profile documents. Robertson idf makes them 0; BM25Okapi raises them to 0.25 * mean idf, which outweighs the towel
# review's three rare matches ("rating", "overall", "given") and puts the mug review first.
REVIEW_RECORD = {
    "id": "rev", "task": "product_review", "output": "o",
    "input": 'Generate the review text written by a reviewer who has a given an overall rating of "5.0" for a product '
             'with description "Steel kettle". The summary of the review text is "Great kettle".',
    "profile": [
        {"overall": 4.0, "summary": "Works", "description": "Blue enamel kettle with induction base",
         "reviewText": "Heats water quickly on our induction hob and the whistle is loud, a good buy for the price."},
        {"overall": 5.0, "summary": "Good mug", "description": "Ceramic mug",
         "reviewText": "It is the best mug of the set, a gift for my dad."},
        {"overall": 2.0, "summary": "Meh", "description": "Plastic cup",
         "reviewText": "The cup is thin and the print is a mess, not for hot tea."},
        {"overall": 3.0, "summary": "Fine", "description": "Cotton towel",
         "reviewText": "Softer than expected; dries dishes fast; honest rating overall given washing shrinkage "
                       "nobody mentioned anywhere."},
    ]}


def test_bm25_floors_terms_in_most_of_the_profile_at_epsilon_times_mean_idf():
    from rank_bm25 import BM25Okapi

    task = get_task(REVIEW_RECORD)
    query, documents = task.query(REVIEW_RECORD), [task.document(p) for p in REVIEW_RECORD["profile"]]
    index = BM25Okapi([d.split() for d in documents])
    for term in ("the", "a", "is", "for"):
        assert sum(term in d.split() for d in documents) == 3
        assert index.idf[term] == pytest.approx(0.25 * index.average_idf) and index.idf[term] > 0
    ours = _assert_reference_ranking(query, documents)
    assert ours == [1, 3, 2, 0]
    robertson = _robertson_scores(query, documents)
    assert len(set(robertson.tolist())) == 4  # no ties: Robertson's ranking is unambiguous, and it differs
    assert np.argsort(-robertson).tolist() == [3, 1, 2, 0] != ours
    assert [p["summary"] for p in top_k(REVIEW_RECORD, 1, "bm25")] == ["Good mug"]
    # Only floored terms match: Robertson scores everything 0, BM25Okapi still ranks (ties: later document first).
    assert _robertson_scores("the", ["the mug", "a kettle", "the cup"]).tolist() == [0, 0, 0]
    assert _assert_reference_ranking("the", ["the mug", "a kettle", "the cup"]) == [2, 0, 1]


def test_bm25_ties_put_the_later_document_first():
    docs = ["red apple", "blue sky", "red apple", "dog", "red apple pie", "sky", "green tree"]
    assert _assert_reference_ranking("red apple", docs) == [2, 0, 4, 6, 5, 3, 1]
    # n = N/2 gives idf exactly 0 (not negative, so not floored): every score is 0.
    assert _assert_reference_ranking("red", ["red", "blue", "red", "sky"]) == [3, 2, 1, 0]


def _fixture_records(tmp_path) -> list[dict]:
    records = []
    for split, n in (("train", 12), ("dev", 6)):
        questions = write_lamp(tmp_path / "lamp", split, n)
        records += sources.read_lamp(questions, sources.lamp_outputs_path(questions))
    root = write_longlamp(tmp_path / "longlamp", {"train": 12, "val": 6})
    for split in ("train", "val"):
        records += sources.read_longlamp(sources.find_longlamp(root, split=split))
    return records + [REVIEW_RECORD] + synthetic.generate(4, 6, 2, seed=0)


def test_bm25_matches_rank_bm25_get_top_n_on_the_fixtures(tmp_path):
    records = _fixture_records(tmp_path)
    assert {r["task"] for r in records} == {"LaMP-3", "product_review", "synthetic"}
    for record in records:
        task = get_task(record)
        documents = [task.document(p) for p in record["profile"]]
        order = _assert_reference_ranking(task.query(record), documents)
        assert rank(record, "bm25") == order
        assert top_k(record, 2, "bm25") == [record["profile"][i] for i in order[:2]]


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
