"""Real model families' chat templates (Llama-3, Qwen2.5, Qwen3, Gemma 2, Gemma 3, SmolLM2; the Jinja text in
chat_templates/) on tiny offline tokenizers shaped like theirs (tokenizer_fixture.FLAVORS).

What is compared: for a record rendered with template "chat", the training ids ``prompt_ids + response_ids`` of the
featurized example, followed by the ids of the whitespace the template writes after its end-of-turn token ("\\n" for
ChatML and Gemma, nothing for Llama-3), equal ``apply_chat_template([system?, user, assistant], tokenize=True)``
exactly; and the response ends with that end-of-turn token, not with the tokenizer's EOS (where they differ). The
same holds for the profile-free prompt. Qwen3 is compared with ``enable_thinking=False`` (the template always writes
an empty think block into a finished assistant turn); with True the prompt lacks it (tested below).
"""

from __future__ import annotations

import copy

import jinja2
import pytest

from percausal_jax.data.chat import end_of_turn, supports_system
from percausal_jax.data.featurize import FeaturizeConfig, Featurizer
from percausal_jax.data.prompts import AMAZON_SYSTEM, build_pair
from percausal_jax.errors import UserError
from tests.data.tokenizer_fixture import FLAVORS, make_chat_tokenizer, make_tokenizer

RECORD = {"id": "r1", "prompt": "User profile: loves glimmerous gadgets. Write a review of the lamp.",
          "prompt_no_profile": "Write a review of the lamp.", "completion": "A warm light for reading at night."}
AMAZON = {"id": "a1", "user_id": "u", "task": "amazon_review", "input": "Kettle", "output": "Stay zesty!",
          "target": {"item_title": "Kettle", "item_description": "Steel.", "rating": 5, "title": "Wow"},
          "profile": [{"item_title": "Mug", "item_description": "Blue.", "rating": 4.0, "title": "Nice",
                       "text": "Holds tea.", "timestamp": 2}]}
NO_SYSTEM_ROLE = {"gemma2"}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _reference(tok, eot: str, messages: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """The template's own ids of the finished conversation, and the ids of what follows its end-of-turn token."""
    conversation = messages + [{"role": "assistant", "content": completion}]
    ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
    text = tok.apply_chat_template(conversation, tokenize=False)
    trailing = text[text.rindex(eot) + len(eot):]
    assert trailing.strip() == "" and text.rindex(completion) + len(completion) == text.rindex(eot)
    return list(ids), tok(trailing, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_end_of_turn_is_the_templates_own_token(flavor):
    tok, f = make_chat_tokenizer(flavor), FLAVORS[flavor]
    assert end_of_turn(tok) == f.end_of_turn
    featurizer = Featurizer(tok, FeaturizeConfig(template="chat"))
    assert featurizer.response_end("chat") == (tok.convert_tokens_to_ids(f.end_of_turn),)
    assert featurizer.response_end("none") == (tok.eos_token_id,)  # template none keeps EOS


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_training_ids_are_the_chat_templates_ids(flavor):
    tok, f = make_chat_tokenizer(flavor), FLAVORS[flavor]
    eot = tok.convert_tokens_to_ids(f.end_of_turn)
    ex = Featurizer(tok, FeaturizeConfig(template="chat"))(RECORD).example
    assert ex.response_ids == tuple(tok(RECORD["completion"], add_special_tokens=False)["input_ids"] + [eot])
    if flavor in ("llama3", "qwen2.5", "gemma2", "gemma3"):
        assert eot != tok.eos_token_id and tok.eos_token_id not in ex.response_ids
    for field, prompt_ids in (("prompt", ex.prompt_ids), ("prompt_no_profile", ex.prompt_no_profile_ids)):
        full, trailing = _reference(tok, f.end_of_turn, [_user(RECORD[field])], RECORD["completion"])
        assert list(prompt_ids) + list(ex.response_ids) + trailing == full, f"{flavor}: {field}"
    assert len(trailing) == (0 if flavor == "llama3" else 1)

    # a canonical record with a system prompt (NextQuill's Amazon prompt), personal and counterfactual
    cfg = FeaturizeConfig(template="chat", retriever="recency", k=8, counterfactual_mode="placeholder")
    kept = Featurizer(tok, cfg)(AMAZON)
    assert kept.items_used == 1
    pair = build_pair(AMAZON, AMAZON["profile"], "placeholder")
    for prompt, prompt_ids in ((pair.personal, kept.example.prompt_ids),
                               (pair.counterfactual, kept.example.prompt_no_profile_ids)):
        if flavor in NO_SYSTEM_ROLE:  # what Gemma 3's template does with a system message itself
            messages = [_user(f"{prompt.system}\n\n{prompt.user}")]
        else:
            messages = [{"role": "system", "content": prompt.system}, _user(prompt.user)]
        full, trailing = _reference(tok, f.end_of_turn, messages, AMAZON["output"])
        assert list(prompt_ids) + list(kept.example.response_ids) + trailing == full, flavor


def test_qwen3_enable_thinking_changes_the_prompt_ids_only():
    tok = make_chat_tokenizer("qwen3")
    off = Featurizer(tok, FeaturizeConfig(template="chat"))(RECORD).example
    on = Featurizer(tok, FeaturizeConfig(template="chat", enable_thinking=True))(RECORD).example
    think = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    assert on.prompt_ids != off.prompt_ids and off.prompt_ids == on.prompt_ids + tuple(think)
    assert off.prompt_no_profile_ids == on.prompt_no_profile_ids + tuple(think)
    assert on.prompt_ids == tuple(tok.apply_chat_template([_user(RECORD["prompt"])], add_generation_prompt=True,
                                                          enable_thinking=True, tokenize=True, return_dict=False))
    assert on.response_ids == off.response_ids  # the same <|im_end|>-terminated response follows both


def test_system_prompt_is_merged_into_the_first_user_turn_without_a_system_role():
    gemma2, gemma3 = make_chat_tokenizer("gemma2"), make_chat_tokenizer("gemma3")
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        gemma2.apply_chat_template([{"role": "system", "content": "S"}, _user("U")], tokenize=False)
    assert [supports_system(make_chat_tokenizer(f)) for f in FLAVORS] == [f not in NO_SYSTEM_ROLE for f in FLAVORS]

    cfg = FeaturizeConfig(template="chat", retriever="recency", k=8)
    texts2, kept2 = Featurizer(gemma2, cfg).run(AMAZON)
    texts3, kept3 = Featurizer(gemma3, cfg).run(AMAZON)
    assert texts2.prompt.startswith(f"<bos><start_of_turn>user\n{AMAZON_SYSTEM}\n\n[Item Title]: Kettle\n")
    assert texts2.prompt_no_profile.startswith(f"<bos><start_of_turn>user\n{AMAZON_SYSTEM}\n\n[Item Title]: Kettle\n")
    assert (texts2.prompt, texts2.prompt_no_profile) == (texts3.prompt, texts3.prompt_no_profile)
    assert kept2 == kept3  # same vocabulary: the same ids as Gemma 3's own system handling

    conversational = {"prompt": [{"role": "system", "content": "Be brief."}, _user("Q?")],
                      "completion": [{"role": "assistant", "content": "A."}]}
    texts = Featurizer(gemma2, FeaturizeConfig(template="chat")).texts(conversational)
    assert texts.prompt == "<bos><start_of_turn>user\nBe brief.\n\nQ?<end_of_turn>\n<start_of_turn>model\n"
    stray = {**conversational, "prompt": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}
    with pytest.raises(UserError, match="no system role and the system message is not followed by a user message"):
        Featurizer(gemma2, FeaturizeConfig(template="chat")).texts(stray)


def test_end_of_turn_fallbacks_and_errors():
    tok = copy.deepcopy(make_tokenizer())
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"  # never closes
    featurizer = Featurizer(tok, FeaturizeConfig(template="chat"))
    assert end_of_turn(tok) == "" and featurizer.response_end("chat") == (tok.eos_token_id,)
    assert featurizer({"id": "x", "prompt": "Q", "prompt_no_profile": "Q", "completion": "A"}).example \
        .response_ids[-1] == tok.eos_token_id
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(UserError, match="does not render an assistant message's text"):
        Featurizer(tok, FeaturizeConfig(template="chat")).response_end("chat")
    tok.chat_template = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    with pytest.raises(UserError, match="chat template failed on roles \\['user'\\]: Only user and assistant"):
        Featurizer(tok, FeaturizeConfig(template="chat")).texts(RECORD)
