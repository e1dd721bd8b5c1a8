"""NextQuill on Amazon reviews (DPL Books / Movies_and_TV / CDs_and_Vinyl) with Qwen2.5-3B, as the reference code
trains it (../shared/specs/nextquill.md §3–5): full fine-tuning, bf16, AdamW lr 5e-6, weight decay 0.025, warm-up
ratio 0.01, linear schedule, grad clip 1.0, global batch 32 (1 × GA 16 × 2 GPUs), 5 epochs; δ = 0.05, λ = 0.9,
ε = 0.1, α = 0.1; the 8 most recent reviews, fitted into 2,048 prompt tokens by dropping whole reviews; the
counterfactual keeps the header with the literal ``None``. Unlike the reference code, examples are not duplicated,
batches are length-bucketed instead of left-padded to 4,097, and the loss is normalized over the global batch.

    percausal train --config configs/nextquill_amazon.py --workdir runs/nq --config.data.train=prepared/amazon.jsonl
"""

import math

from configs.base import get_config as base

TRAIN_EXAMPLES = 8 * 2000  # DPL: 8 training reviews per user; set to your prepared file's size


def get_config():
    c = base()
    c.model.path = "Qwen/Qwen2.5-3B"
    c.model.dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.template = "chat"
    c.data.counterfactual_mode = "placeholder"
    c.data.retriever = "recency"
    c.data.k = 8
    c.data.budget_mode = "drop"
    c.data.max_prompt_len = 2048
    c.data.max_response_len = 2048
    c.data.bucket_multiple = 256
    c.objective.name = "nextquill"
    nq = c.objective.nextquill
    nq.delta, nq.high, nq.low, nq.alpha = 0.05, 0.9, 0.1, 0.1
    nq.per_sequence = True  # compute_loss normalizes each sequence (batch 1 per device) by its own Σω and length
    c.train.global_batch_size = 32
    c.train.grad_accum_steps = 16
    c.train.steps = math.ceil(5 * TRAIN_EXAMPLES / 32)
    c.optimizer.name = "adamw"
    c.optimizer.lr = 5e-6
    c.optimizer.weight_decay = 0.025
    c.optimizer.warmup_ratio = 0.01
    c.optimizer.schedule = "linear"
    c.optimizer.grad_clip_norm = 1.0
    c.seed = 42
    return c
