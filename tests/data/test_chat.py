"""Rendering prompts with a real (tiny, offline) HF tokenizer's chat template, or as raw text."""

from __future__ import annotations

import pytest

from percausal_jax.data.chat import render
from percausal_jax.data.prompts import Prompt
from percausal_jax.errors import UserError

# ChatML with Qwen3's switch: enable_thinking=false adds an empty think block after the assistant header.
QWEN3_LIKE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
PLAIN_CHATML = QWEN3_LIKE.split("{%- if enable_thinking")[0] + "{%- endif %}"


def tiny_tokenizer(chat_template):
    """A byte-level BPE trained on a few strings, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False)
    tok.train_from_iterator(["Past reviews of the user.", "Write a review of the kettle.", "Stay zesty!"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>",
                                   chat_template=chat_template)


PROMPT = Prompt(system="Be kind.", user="Write a review of the kettle.")
EXPECTED_HEAD = ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nWrite a review of the kettle.<|im_end|>\n"
                 "<|im_start|>assistant\n")


def test_chat_template_with_system_and_thinking_switch():
    tok = tiny_tokenizer(QWEN3_LIKE)
    assert render(tok, PROMPT, "chat") == EXPECTED_HEAD + "<think>\n\n</think>\n\n"
    assert render(tok, PROMPT, "chat", enable_thinking=True) == EXPECTED_HEAD


def test_chat_template_without_system_and_without_thinking_support():
    tok = tiny_tokenizer(PLAIN_CHATML)
    user_only = Prompt(system=None, user="Hi")
    assert render(tok, user_only, "chat") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(tok, PROMPT, "chat") == EXPECTED_HEAD


def test_raw_text_template():
    assert render(None, PROMPT, "none") == "Be kind.\nWrite a review of the kettle."
    assert render(None, Prompt(None, "Hi"), "none") == "Hi"


def test_missing_chat_template_and_unknown_template_are_user_errors():
    with pytest.raises(UserError, match="has no chat template; use template 'none'"):
        render(tiny_tokenizer(None), PROMPT, "chat")
    with pytest.raises(UserError, match="prompt template 'llama': expected one of"):
        render(None, PROMPT, "llama")
