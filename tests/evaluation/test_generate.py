"""KV-cache decoding (`generate`) against full recomputation (`greedy_generate`) and transformers' `generate`."""

import jax
import numpy as np
import pytest

import percausal_jax as pj
from percausal_jax.evaluation.generate import generate, greedy_generate, left_pad, process_logits
from tests.helpers import cached_and_full_hidden, tiny_hf_model

FAMILIES = {
    "llama_gqa": ("llama", {}),  # 4 query heads, 2 KV heads
    "qwen3": ("qwen3", {}),
    "mistral_window4": ("mistral", {"sliding_window": 4}),
    "gemma2_window4_softcap": ("gemma2", {"sliding_window": 4, "attn_logit_softcapping": 1.0,
                                          "final_logit_softcapping": 2.0}),
}
PROMPT_LENGTHS = (9, 3, 6)  # the longest prompt exceeds the window of 4


def _prompts(seed: int = 0, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 256, n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    model_type, overrides = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    tiny_hf_model(model_type, d, **overrides)
    return d


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return pj.load_pretrained(tiny_llama_dir), AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()


def _hf_generate(torch_model, prompts, max_new_tokens, **kwargs) -> list[list[int]]:
    """transformers' greedy continuation of each prompt on its own (no padding)."""
    import torch

    out = []
    for p in prompts:
        with torch.no_grad():
            ids = torch_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                       max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_cached_decode_equals_full_forward(family_dir, scan):
    """Prefill + one token per step through the cache gives the full-sequence hidden states of every real token."""
    model = pj.load_pretrained(family_dir, scan_layers=scan)
    prompts, extra = _prompts(), 5
    tokens, seg, positions, P = left_pad(prompts, max(PROMPT_LENGTHS) + extra)
    tokens[:, P:] = np.random.RandomState(1).randint(3, 256, (len(prompts), extra))

    cached, full = cached_and_full_hidden(model, tokens, seg, positions, P)  # one program
    real = seg == 1
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_greedy_equals_full_recomputation(family_dir, scan):
    """Batched prompts of different lengths; an EOS taken from the reference ends one row early (finished rows
    are cut after their EOS)."""
    model = pj.load_pretrained(family_dir, scan_layers=scan)
    prompts = _prompts()
    eos = greedy_generate(model, prompts, 8)[1][2]
    ref = greedy_generate(model, prompts, 8, eos_ids=[eos])
    assert ref[1][-1] == eos and len(ref[1]) <= 3
    assert generate(model, prompts, 8, eos_ids=[eos]) == ref


def test_greedy_equals_transformers(llama):
    ours, torch_model = llama
    prompts = _prompts(seed=3, lengths=(7, 4, 10))
    eos = torch_model.generation_config.eos_token_id
    assert generate(ours, prompts, 12, eos_ids=[eos]) == _hf_generate(torch_model, prompts, 12)


def test_repetition_penalty_equals_transformers(llama):
    ours, torch_model = llama
    prompts = _prompts(seed=4, lengths=(7, 4, 10))
    got = generate(ours, prompts, 12, repetition_penalty=1.3)
    assert got == _hf_generate(torch_model, prompts, 12, repetition_penalty=1.3, eos_token_id=None)
    assert got != generate(ours, prompts, 12)  # the penalty changes the tiny model's (repetitive) output


def test_single_and_zero_new_tokens(llama):
    ours, _ = llama
    prompts = _prompts()
    assert generate(ours, prompts, 1) == greedy_generate(ours, prompts, 1)
    assert generate(ours, prompts, 0) == [[], [], []]


def test_top_k_1_and_tiny_top_p_equal_greedy(llama):
    ours, _ = llama
    prompts = _prompts()
    greedy = generate(ours, prompts, 8)
    assert generate(ours, prompts, 8, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(ours, prompts, 8, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_sampling_is_seeded(llama):
    ours, _ = llama
    prompts = _prompts()
    sample = lambda seed: generate(ours, prompts, 8, temperature=1.0, top_p=0.95, top_k=50, seed=seed)  # noqa: E731
    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert all(len(row) == 8 for row in sample(0))


def test_process_logits_equals_transformers_processors():
    """Repetition penalty → temperature → top-k → top-p, value for value, against HF's processors."""
    import torch
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rs = np.random.RandomState(0)
    logits = (rs.randn(4, 64) * 3).astype(np.float32)
    ids = rs.randint(0, 64, (4, 10))
    seen = np.zeros((4, 64), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    for temperature, top_k, top_p in [(0.7, 0, 0.8), (1.3, 10, 0.5), (1.0, 5, 1.0), (0.5, 0, 1.0)]:
        ref = torch.tensor(logits)
        processors = [RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(temperature)]
        processors += [TopKLogitsWarper(top_k)] if top_k else []
        processors += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        for processor in processors:
            ref = processor(torch.tensor(ids), ref)
        got = np.asarray(jax.jit(process_logits, static_argnames="top_k")(
            logits, seen, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=1.3))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref.numpy()))
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)


def test_smollm2_greedy_equals_transformers(smollm2_dir):
    """The embedded SmolLM2-135M-Instruct: two chat prompts in one left-padded batch, 20 new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    torch_model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval()
    texts = ["Explain in two sentences why the sky is blue.", "Write a short poem about autumn leaves."]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for p in texts]
    assert len(set(map(len, prompts))) == 2  # really padded
    got = generate(pj.load_pretrained(smollm2_dir), prompts, 20, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    ref = _hf_generate(torch_model, prompts, 20)
    assert got == ref, [(tok.decode(a), tok.decode(b)) for a, b in zip(got, ref)]
    assert all(len(row) == 20 for row in got)
