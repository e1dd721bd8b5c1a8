"""Factories for tiny random transformers models with non-trivial weights (shared by the tests). ``TINY``'s vocabulary
covers :func:`tiny_tokenizer`'s 259 entries (its byte alphabet and 3 special tokens), as a real model's does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_hf_model(model_type: str, out_dir: Path | None = None, seed: int = 0, **overrides):
    """Builds ``AutoModelForCausalLM.from_config`` with every parameter perturbed (so norms, biases and the q/k
    norms are not at their trivial init), optionally saves it, and returns the torch model in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**TINY, **overrides}
    if model_type.startswith("gemma"):
        kw.setdefault("head_dim", 16)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
    return model


def torch_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def tiny_tokenizer(out_dir: Path | None = None, vocab_size: int = 200):
    """A byte-level BPE tokenizer trained offline on a few sentences (ids < vocab_size), with BOS/EOS/PAD and a
    ChatML chat template; saved to ``out_dir`` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The toaster works well and heats evenly.", "Stay zesty, friends!", "Write a review of the lamp.",
              "User profile: loves glimmerous gadgets and long walks.", "A warm light for reading at night."] * 4
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def hub_snapshot(cache: Path, repo_id: str, repo_type: str = "model", revision: str = "c" * 40) -> Path:
    """An empty snapshot folder of ``repo_id`` at ``revision`` in a Hugging Face hub cache (the layout
    huggingface_hub reads offline: ``{type}s--{org}--{name}/snapshots/{rev}`` and ``refs/main``)."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snap


def with_config(model, **changes):
    """``model``'s parameters (shared, not copied) under ``dataclasses.replace(model.config, **changes)``: the same
    weights built with a config that differs only in switches owning no parameters (soft-caps, windows, RoPE).
    Keeps the layer layout, dtypes, remat policy and attention kernel of ``model``."""
    import dataclasses

    from flax import nnx

    from percausal_jax.models.decoder import CausalLM

    cfg = dataclasses.replace(model.config, **changes)
    layers = model.model.layers
    attn = (layers if model.scan_layers else layers[0]).self_attn
    abstract = nnx.eval_shape(lambda: CausalLM(
        cfg, dtype=model.compute_dtype, param_dtype=model.model.embed_tokens.embedding[...].dtype,
        scan_layers=model.scan_layers, remat_policy=model.model.remat_policy, attention_impl=attn.attention_impl,
        rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.state(model))


def cached_and_full_hidden(model, tokens, seg, positions, prompt_len: int):
    """One jitted program: a KV-cached prefill of ``tokens[:, :prompt_len]`` then single-token decode steps, and the
    uncached forward of all ``tokens`` → (cached hidden states, full hidden states), both [B, L, D]."""
    import functools

    import jax.numpy as jnp
    from flax import nnx

    @functools.partial(nnx.jit, static_argnames="P")
    def run(model, tokens, seg, positions, P):
        hidden, cache = model.decode(tokens[:, :P], model.init_cache(seg, positions), 0)
        chunks = [hidden]
        for t in range(P, tokens.shape[1]):
            hidden, cache = model.decode(tokens[:, t:t + 1], cache, t)
            chunks.append(hidden)
        return jnp.concatenate(chunks, axis=1), model.hidden_states(tokens, positions, seg)

    return run(model, tokens, seg, positions, P=prompt_len)
