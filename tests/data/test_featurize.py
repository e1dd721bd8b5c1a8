"""Featurizing: record → PairedExample (retrieval, builders, rendering, budget, tokenization), drops and stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from percausal_jax.data.featurize import Dropped, FeaturizeConfig, FeaturizeStats, Featurizer, Kept
from percausal_jax.data.pairing import PairedExample, collate
from percausal_jax.data.prompts import build_pair
from percausal_jax.data.retrieval import PromptTooLong
from percausal_jax.errors import UserError
from tests.data.tokenizer_fixture import make_tokenizer

PROFILE = [{"id": "p1", "text": "Morning coffee again.", "date": "2020-01-01"},
           {"id": "p2", "text": "Rainy day, long walk.", "date": "2021-06-01"},
           {"id": "p3", "text": "New kettle boils fast.", "date": "2019-03-03"}]
TWEET = {"id": "t1", "user_id": "u1", "task": "LaMP-7", "profile": PROFILE,
         "input": "Paraphrase the following tweet without any explanation before or after it: kettle is great",
         "output": "The kettle is really great."}
EOS = 2
IM_END = 4  # <|im_end|>: what the fixture's ChatML template writes after an assistant message


def ids(text, special):
    return make_tokenizer()(text, add_special_tokens=special)["input_ids"]


def test_canonical_raw_template_retrieves_builds_and_tokenizes_once():
    tok = make_tokenizer()
    featurizer = Featurizer(tok, FeaturizeConfig(template="none", retriever="recency", k=2))
    texts, result = featurizer.run(TWEET)
    pair = build_pair(TWEET, [PROFILE[1], PROFILE[0]], "drop")  # recency: newest first
    # both prompts end with the default separator, a line break; the response is the output's own ids + EOS
    assert (texts.prompt, texts.prompt_no_profile) == (pair.personal.user + "\n", TWEET["input"] + "\n")
    assert texts.items_used == 2 and texts.template == "none"
    assert result == Kept(PairedExample(tuple(ids(texts.prompt, True)), tuple(ids(TWEET["input"] + "\n", True)),
                                        tuple(ids(TWEET["output"], False) + [EOS])), 2)
    assert result.example.prompt_ids[0] == tok.bos_token_id  # raw text gets the tokenizer's BOS


def test_chat_template_prompts_are_tokenized_without_extra_special_tokens():
    featurizer = Featurizer(make_tokenizer(), FeaturizeConfig(template="chat", retriever="recency", k=1,
                                                              counterfactual_mode="placeholder"))
    texts, kept = featurizer.run(TWEET)
    assert texts.prompt.startswith("<|im_start|>user\n") and texts.prompt.endswith("<|im_start|>assistant\n")
    assert "None are written by a person." in texts.prompt_no_profile  # placeholder mode
    assert list(kept.example.prompt_ids) == ids(texts.prompt, False)
    assert kept.example.prompt_ids[0] == 3  # <|im_start|>, no BOS in front
    assert texts.prompt_no_profile.endswith("<|im_start|>assistant\n")  # no separator with a chat template
    assert list(kept.example.response_ids) == ids(TWEET["output"], False) + [IM_END]  # the template's end of turn


def test_budget_drops_items_and_counts_prompts_that_never_fit():
    full = Featurizer(make_tokenizer(), FeaturizeConfig(retriever="recency", k=3)).run(TWEET)[1]
    one_item = len(Featurizer(make_tokenizer(), FeaturizeConfig(retriever="recency", k=1)).run(TWEET)[1]
                   .example.prompt_ids)
    assert one_item < len(full.example.prompt_ids)
    fitted = Featurizer(make_tokenizer(), FeaturizeConfig(retriever="recency", k=3, max_prompt_len=one_item))(TWEET)
    assert fitted.items_used == 1 and len(fitted.example.prompt_ids) == one_item
    no_profile = len(full.example.prompt_no_profile_ids)
    tight = Featurizer(make_tokenizer(), FeaturizeConfig(retriever="recency", k=3, max_prompt_len=no_profile - 1))
    assert tight(TWEET) == Dropped("prompt_too_long")
    with pytest.raises(PromptTooLong):
        tight.texts(TWEET)
    # a prompt record whose profile-free prompt alone is over budget is dropped too
    record = {"id": "p", "prompt": "Hi", "prompt_no_profile": "A much longer profile-free prompt", "completion": "x"}
    assert Featurizer(make_tokenizer(), FeaturizeConfig(max_prompt_len=4))(record) == Dropped("prompt_too_long")


def test_truncate_budget_mode_shortens_item_text():
    n_full = len(Featurizer(make_tokenizer(), FeaturizeConfig(retriever="recency", k=1))(TWEET).example.prompt_ids)
    cfg = FeaturizeConfig(retriever="recency", k=1, max_prompt_len=n_full - 2, budget_mode="truncate")
    texts, kept = Featurizer(make_tokenizer(), cfg).run(TWEET)
    assert kept.items_used == 1 and len(kept.example.prompt_ids) <= n_full - 2
    assert texts.prompt.startswith('"Rainy day, long"  are written by a person.')  # 'walk.' cut to fit


def test_long_responses_are_dropped_or_truncated_without_eos():
    n = len(ids(TWEET["output"], False)) + 1
    fits = Featurizer(make_tokenizer(), FeaturizeConfig(max_response_len=n))(TWEET)
    assert fits.example.response_ids[-1] == EOS and not fits.truncated
    assert Featurizer(make_tokenizer(), FeaturizeConfig(max_response_len=n - 1))(TWEET) == Dropped("response_too_long")
    cut = Featurizer(make_tokenizer(), FeaturizeConfig(max_response_len=3, truncate_response=True))(TWEET)
    assert list(cut.example.response_ids) == ids(TWEET["output"], False)[:3] and cut.truncated
    # exactly at the limit without the end token: still truncated (the end token is what was cut)
    at = Featurizer(make_tokenizer(), FeaturizeConfig(max_response_len=n - 1, truncate_response=True))(TWEET)
    assert list(at.example.response_ids) == ids(TWEET["output"], False) and at.truncated
    chat = Featurizer(make_tokenizer(), FeaturizeConfig(template="chat", max_response_len=n, truncate_response=True))
    assert chat(TWEET).example.response_ids[-1] == IM_END and not chat(TWEET).truncated  # the end token counts
    stats = FeaturizeStats()
    for result in (fits, cut, at, Dropped("response_too_long")):
        stats.add(result)
    assert (stats.kept, stats.truncated_response, stats.dropped["response_too_long"]) == (3, 2, 1)
    assert stats.summary()["truncated_response"] == 2


def test_separator_ends_both_raw_prompts_and_never_the_response():
    tok = make_tokenizer()
    base = dict(template="none", retriever="recency", k=2)
    glued = Featurizer(tok, FeaturizeConfig(**base, separator="")).run(TWEET)
    for sep in ("\n", "\n\n", " Answer: "):
        texts, kept = Featurizer(tok, FeaturizeConfig(**base, separator=sep)).run(TWEET)
        assert texts.prompt == glued[0].prompt + sep and texts.prompt_no_profile == glued[0].prompt_no_profile + sep
        assert texts.completion == TWEET["output"]
        assert kept.example.prompt_ids == tuple(ids(texts.prompt, True))  # the separator is prompt text ...
        assert kept.example.response_ids == glued[1].example.response_ids  # ... the response ids never change
    # the budget counts it: the exact length of the one-item prompt with the separator fits, one less does not
    one = Featurizer(tok, FeaturizeConfig(**{**base, "k": 1})).run(TWEET)[1]
    limit = len(one.example.prompt_ids)
    fitted = Featurizer(tok, FeaturizeConfig(**base, max_prompt_len=limit))(TWEET)
    assert fitted.items_used == 1 and fitted.example.prompt_ids == one.example.prompt_ids
    assert Featurizer(tok, FeaturizeConfig(**base, max_prompt_len=limit - 1))(TWEET).items_used == 0
    # a prompt that already ends with it (NextQuill's Amazon message ends with a line break) gets no second one
    amazon = {"id": "a1", "user_id": "u", "task": "amazon_review", "input": "Kettle", "output": "Loved it.",
              "target": {"item_title": "Kettle", "item_description": "Steel.", "rating": 5, "title": "Wow"},
              "profile": []}
    texts = Featurizer(tok, FeaturizeConfig(template="none")).texts(amazon)
    assert texts.prompt.endswith("[Output Review Title]: Wow\n") and not texts.prompt.endswith("\n\n")
    # prompt and TRL records keep their own text; chat-rendered prompts get none
    record = {"id": "p", "prompt": "Past: x. Write.", "prompt_no_profile": "Write.", "completion": "Done."}
    assert Featurizer(tok, FeaturizeConfig()).texts(record).prompt == "Past: x. Write."
    assert Featurizer(tok, FeaturizeConfig()).texts({"prompt": "Q?", "completion": "A."}).prompt == "Q?"
    assert Featurizer(tok, FeaturizeConfig(template="chat")).texts(TWEET).prompt.endswith("assistant\n")
    with pytest.raises(UserError, match="separator=None: expected a string"):
        FeaturizeConfig(separator=None)


def test_prepared_raw_records_featurize_like_their_canonical_source():
    """What prepare writes for template none (the text with the separator) gives the canonical record's ids."""
    from percausal_jax.data.prepare import prompt_record

    tok = make_tokenizer()
    featurizer = Featurizer(tok, FeaturizeConfig(template="none", retriever="recency", k=2))
    texts, kept = featurizer.run(TWEET)
    row = prompt_record(TWEET, texts, "fallback")
    assert row["prompt"].endswith("\n") and row["template"] == "none"
    assert featurizer(row).example == kept.example


def test_prompt_records_render_unless_already_templated():
    record = {"id": "p1", "prompt": "Past: x\nWrite.", "prompt_no_profile": "Write.", "completion": "Done."}
    chat = Featurizer(make_tokenizer(), FeaturizeConfig(template="chat"))
    texts, kept = chat.run(record)
    assert texts.prompt == "<|im_start|>user\nPast: x\nWrite.<|im_end|>\n<|im_start|>assistant\n"
    assert texts.items_used == 0 and list(kept.example.prompt_ids) == ids(texts.prompt, False)
    prepared = {**record, "prompt": texts.prompt, "prompt_no_profile": texts.prompt_no_profile, "template": "chat"}
    raw = Featurizer(make_tokenizer(), FeaturizeConfig(template="none"))
    assert raw(prepared) == kept  # the record's own template wins: no re-rendering, no BOS
    assert raw(record).example.prompt_ids == tuple(ids("Past: x\nWrite.", True))
    with pytest.raises(UserError, match="record 'p1': field 'template': expected one of"):
        raw({**record, "template": "llama"})


def test_trl_records_use_the_prompt_as_counterfactual():
    kept = Featurizer(make_tokenizer(), FeaturizeConfig())({"prompt": "Q?", "completion": "A."})
    assert kept.example.prompt_ids == kept.example.prompt_no_profile_ids == tuple(ids("Q?", True))
    messages = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
                "completion": [{"role": "assistant", "content": "A."}]}
    texts, kept = Featurizer(make_tokenizer(), FeaturizeConfig(template="chat")).run(messages)
    assert texts.prompt == texts.prompt_no_profile == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert texts.completion == "A."
    with pytest.raises(UserError, match="conversational prompt .* needs template 'chat'"):
        Featurizer(make_tokenizer(), FeaturizeConfig())(messages)
    two = {**messages, "completion": messages["completion"] * 2}
    with pytest.raises(UserError, match="field 'completion': expected exactly one assistant message"):
        Featurizer(make_tokenizer(), FeaturizeConfig(template="chat"))(two)


def test_zero_token_prompt_and_bad_settings_are_user_errors():
    no_bos = Featurizer(make_tokenizer(bos=False), FeaturizeConfig())
    with pytest.raises(UserError, match="record 'e': a prompt tokenizes to zero tokens"):
        no_bos({"id": "e", "prompt": "x", "prompt_no_profile": "", "completion": "y"})
    for kwargs, message in [({"template": "jinja"}, "template='jinja': expected one of"),
                            ({"counterfactual_mode": "empty"}, "counterfactual_mode='empty'"),
                            ({"retriever": "tfidf"}, "retriever='tfidf'"),
                            ({"budget_mode": "cut"}, "budget_mode='cut'"),
                            ({"k": -1}, "k=-1: expected an integer >= 0"),
                            ({"max_prompt_len": 0}, "max_prompt_len=0: expected an integer >= 1")]:
        with pytest.raises(UserError, match=message):
            FeaturizeConfig(**kwargs)
    with pytest.raises(UserError, match="retriever 'contriever' needs an encoder"):  # only where it retrieves
        Featurizer(make_tokenizer(), FeaturizeConfig(retriever="contriever"))(TWEET)
    with pytest.raises(UserError, match="a tokenizer is needed for template 'chat'"):
        Featurizer(None, FeaturizeConfig(template="chat"))
    with pytest.raises(UserError, match="field 'output': missing"):
        Featurizer(make_tokenizer(), FeaturizeConfig())({k: v for k, v in TWEET.items() if k != "output"})


def test_collated_example_keeps_the_pairing_contract():
    ex = Featurizer(make_tokenizer(), FeaturizeConfig(retriever="recency", k=2))(TWEET).example
    batch = collate([[ex]], ex.personal_len + 3, ex.counterfactual_len + 5, len(ex.response_ids) + 2)
    r = batch.response
    n = len(ex.response_ids)
    assert list(r.ids[0, :n]) == list(ex.response_ids) and r.weight[0].sum() == n
    for seq, index, prompt in ((batch.personal, r.index_personal, ex.prompt_ids),
                               (batch.counterfactual, r.index_counterfactual, ex.prompt_no_profile_ids)):
        rows = index[0, :n]
        assert rows[0] == len(prompt) - 1  # the last prompt token predicts the first response token
        assert list(seq.tokens[0, rows[1:]]) == list(ex.response_ids[:-1])  # row t holds the token before id t
        assert list(seq.tokens[0, rows[:-1] + 1]) == list(ex.response_ids[:-1])  # tokens[index+1] == ids
        assert seq.segment_ids[0, rows[-1]] == 1 and seq.segment_ids[0, rows[-1] + 1] == 0  # EOS is never input


def test_stats_count_and_round_trip_through_json():
    stats = FeaturizeStats()
    stats.add(Kept(PairedExample((1, 2, 3), (1,), (5, 2)), 2))
    stats.add(Kept(PairedExample((1,), (1,), (5, 6, 7, 2)), 0))
    stats.add(Dropped("response_too_long"))
    summary = stats.summary()
    assert summary["kept"] == 2 and summary["dropped_total"] == 1 and summary["truncated_response"] == 0
    assert summary["dropped"] == {"prompt_too_long": 0, "response_too_long": 1}
    assert summary["mean_len"] == {"prompt": 2.0, "prompt_no_profile": 1.0, "response": 3.0}
    assert summary["max_len"] == {"prompt": 3, "prompt_no_profile": 1, "response": 4}
    assert summary["items_used"] == {0: 1, 2: 1} and summary["mean_items_used"] == 1.0
    stats.add(Kept(PairedExample((1,), (1,), (5, 6)), 1, truncated=True))
    assert stats.summary()["truncated_response"] == 1
    assert FeaturizeStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats
    old = {k: v for k, v in stats.to_json().items() if k != "truncated_response"}  # a state saved before the field
    assert FeaturizeStats.from_json(old).truncated_response == 0
    assert np.isclose(FeaturizeStats().summary()["mean_items_used"], 0.0)


def test_render_uses_system_prompt_for_amazon_records():
    amazon = {"id": "a1", "user_id": "u", "task": "amazon_review", "input": "Kettle", "output": "Loved it.",
              "target": {"item_title": "Kettle", "item_description": "Steel.", "rating": 5, "title": "Wow"},
              "profile": [{"item_title": "Mug", "item_description": "Blue.", "rating": 4.0, "title": "Nice",
                           "text": "Holds tea.", "timestamp": 2}]}
    texts = Featurizer(make_tokenizer(), FeaturizeConfig(template="chat", retriever="recency", k=8)).texts(amazon)
    assert texts.prompt.startswith("<|im_start|>system\nGiven the title and description of an item")
    assert "[Review 1]:\n- [Item Title]: Mug\n" in texts.prompt and texts.items_used == 1
