"""CI-sized run: a tiny model directory and data given on the command line, a few steps.

    percausal train --config configs/tiny.py --workdir /tmp/run \
        --config.model.path=DIR --config.data.train=train.jsonl --config.objective.name=perce
"""

from configs.base import get_config as base


def get_config():
    c = base()
    c.train.steps = 6
    c.train.global_batch_size = 4
    c.train.grad_accum_steps = 2
    c.data.template = "none"
    c.data.max_prompt_len = 96
    c.data.max_response_len = 48
    c.data.bucket_multiple = 16
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 1
    c.checkpoint.every_steps = 3
    return c
