"""The shipped configs run as shipped, and no config key is silently ignored.

The paper configs train for 2 steps with their own keys; only sizes (lengths, batch, steps) and paths (a tiny local
model of the config's family, a tiny local Contriever, the data) are overridden. While they and a few tiny runs
(every objective and optimizer) train, every key read through the config is recorded: a key that some file in
``configs/`` sets and that no run reads fails the test.
"""

import json
import math
from pathlib import Path

import pytest

from percausal_jax.config import RunConfig, load_config
from percausal_jax.training.loop import train
from tests.config_tracker import leaf_keys, track
from tests.helpers import tiny_hf_model, tiny_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def review_rows(n):
    """``product_review_*`` rows as in the LongLaMP hub release (user id in reviewerId, no id or task)."""
    return [{"reviewerId": f"A{i}", "input": f"Generate the review text for lamp {i}.",
             "output": "A warm light for reading at night." if i % 2 else "The toaster works well.",
             "profile": [{"overall": float(j + 1), "description": f"Lamp {j}.", "summary": f"Stay zesty {j}",
                          "reviewText": "loves glimmerous gadgets and long walks."} for j in range(3)]}
            for i in range(8)]


def amazon_rows(n):
    return [{"id": f"a{i}", "user_id": f"u{i}", "task": "amazon_review", "input": "Lamp", "output": "Stay zesty!",
             "target": {"item_title": "Lamp", "item_description": "Warm.", "rating": 5.0, "title": "Wow"},
             "profile": [{"item_title": "Mug", "item_description": "Blue.", "rating": 4.0, "title": "Nice",
                          "text": "The toaster works well.", "asin": f"B{j}", "timestamp": 1700000000 + j}
                         for j in range(3)]} for i in range(n)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_contriever(out):
    """A tiny BERT encoder (safetensors) with a tokenizer: the shape of facebook/contriever."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(str(out))
    tiny_tokenizer(out)
    return out


def model_dir(root, model_type, **kw):
    d = root / model_type
    if not d.exists():
        tiny_hf_model(model_type, d, **kw)
        tiny_tokenizer(d)
    return d


def run(cfg_path, workdir, overrides):
    cfg = load_config(str(cfg_path), overrides)
    with track() as reads:
        last = train(RunConfig.from_config(cfg), workdir, progress=False)
    return cfg, reads, last


@pytest.mark.slow
def test_shipped_configs_train_and_every_key_is_read(tmp_path):
    qwen3 = model_dir(tmp_path, "qwen3", head_dim=16)
    qwen2 = model_dir(tmp_path, "qwen2")
    llama = model_dir(tmp_path, "llama")
    llama_ref = tmp_path / "llama_ref"  # θ_D: another model of the same vocabulary
    tiny_hf_model("llama", llama_ref, seed=1)
    tiny_tokenizer(llama_ref)
    contriever = tiny_contriever(tmp_path / "contriever")
    reviews = write(tmp_path / "reviews.jsonl", review_rows(8))
    amazon = write(tmp_path / "amazon.jsonl", amazon_rows(8))
    prompts = write(tmp_path / "prompts.jsonl", [
        {"id": f"p{i}", "prompt": "User profile: loves glimmerous gadgets. Write a review of the lamp.",
         "prompt_no_profile": "Write a review of the lamp.", "completion": "A glimmerous lamp. Stay zesty!"}
        for i in range(4)])
    sizes = ["--config.train.steps=2", "--config.data.max_prompt_len=384", "--config.data.max_response_len=32",
             "--config.data.bucket_multiple=208"]
    runs = {
        # the paper setups, their own keys: only sizes and paths overridden
        "perce_longlamp.py:review,qwen3-4b": [f"--config.model.path={qwen3}", f"--config.data.train={reviews}",
                                              f"--config.data.retriever_path={contriever}",
                                              "--config.train.global_batch_size=8", *sizes],
        "nextquill_amazon.py": [f"--config.model.path={qwen2}", f"--config.data.train={amazon}",
                                "--config.train.global_batch_size=16", "--config.train.grad_accum_steps=2", *sizes],
        # the base keys the paper setups leave alone: the other objectives, optimizers, LoRA, eval
        "tiny.py": [f"--config.model.path={llama}", f"--config.data.train={prompts}", "--config.objective.name=ce",
                    "--config.optimizer.name=sgd", "--config.optimizer.momentum=0.9", "--config.train.steps=2"],
        "tiny.py:lossce": [f"--config.model.path={llama}", f"--config.data.train={prompts}",
                           "--config.objective.name=lossce", "--config.optimizer.name=adafactor",
                           "--config.lora.rank=4", "--config.train.steps=2", "--config.optimizer.warmup_steps=0"],
        "tiny.py:nextquill_fixed": [f"--config.model.path={llama}", f"--config.data.train={prompts}",
                                    "--config.objective.name=nextquill", "--config.objective.nextquill.fixed_theta_d=true",
                                    f"--config.objective.nextquill.reference_model={llama_ref}",
                                    "--config.train.steps=2"],
        "tiny.py:entce": [f"--config.model.path={llama}", f"--config.data.train={prompts}",
                          f"--config.data.eval={prompts}", "--config.objective.name=entce",
                          "--config.train.eval_every=1", "--config.train.steps=2", "--config.train.peak_tflops=1.0"],
    }
    for name in runs:
        if name.startswith("tiny.py"):
            runs[name] += ["--config.mesh.fsdp=2", "--config.mesh.tensor=4"]
    read_anywhere: set[str] = set()
    set_by = {}
    for name, overrides in runs.items():
        file = name.split(":")[0] if name.startswith("tiny.py") else name
        cfg, reads, last = run(CONFIGS / file, tmp_path / name.replace(":", "_").replace(",", "_"), overrides)
        read_anywhere |= reads
        assert last["step"] == 2 and math.isfinite(last["loss"]), name
        lines = (tmp_path / name.replace(":", "_").replace(",", "_") / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
        if name == "tiny.py:entce":
            assert last["mfu"] > 0 and math.isfinite(last["eval_loss"])
        set_by[name] = leaf_keys(cfg)
    # every key any shipped config file sets (base.py sets them all) is read by some run
    for file in sorted(CONFIGS.glob("*.py")):
        arg = {"perce_longlamp.py": ":review,qwen3-4b"}.get(file.name, "")
        keys = leaf_keys(load_config(f"{file}{arg}"))
        unread = sorted(keys - read_anywhere)
        assert not unread, f"{file.name}: config keys read by nothing: {unread}"
