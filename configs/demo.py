"""`make demo`: CE vs PerCE on the embedded SmolLM2-135M-Instruct and a synthetic personalization set, sized for
about two minutes of training per method on 2 CPU cores. Both methods get the same budget and learning rate."""

from configs.base import get_config as base


def get_config():
    c = base()
    c.model.path = "embedded"
    c.model.scan_layers = True
    c.data.template = "chat"
    c.data.retriever = "bm25"
    c.data.k = 2
    c.data.max_prompt_len = 256
    c.data.max_response_len = 64
    c.data.bucket_multiple = 96  # one compiled shape: personal ≈ 175 → 192, counterfactual ≈ 80 → 96, response 96
    c.objective.name = "perce"
    c.objective.vocab_chunk_size = 16384
    c.train.steps = 12
    c.train.global_batch_size = 4
    c.train.eval_batches = 2
    c.train.eval_every = 3  # held-out NLL (personal / generic tokens) every 3 steps: the report's NLL curves
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 2
    c.optimizer.grad_clip_norm = 1.0
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 1
    c.mesh.fsdp = -1
    return c
