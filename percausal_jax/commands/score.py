"""``percausal score``: per-token PIR / DCE / weights of gold completions, as JSONL and an HTML heatmap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from percausal_jax.errors import UserError

OUTPUT_KEYS = ("id", "prompt_ids", "prompt_no_profile_ids", "completion_ids", "tokens", "logp_personal",
               "logp_counterfactual", "pir", "perce_weight", "dce", "nextquill_weight", "ce_loss", "perce_loss",
               "nextquill_loss")


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="per-token causal scores (PIR, DCE, weights) of gold completions")
    p.add_argument("--model", required=True, help="HF model directory, hub id, or 'embedded'")
    p.add_argument("--data", required=True, help="prompt records JSONL/parquet: {id, prompt, prompt_no_profile, "
                                                 "completion}")
    p.add_argument("--out", required=True, help="output JSONL, one line per example")
    p.add_argument("--html", default=None, help="also write a self-contained HTML token heatmap")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--template", choices=("none", "chat"), default="none",
                   help="none: prompt text as is (tokenizer's BOS if it adds one); chat: wrap in the chat template")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--clip-min", type=float, default=0.8)
    p.add_argument("--clip-max", type=float, default=5.0)
    p.add_argument("--delta", type=float, default=0.05)
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from percausal_jax import storage
    from percausal_jax.atomic import write_text
    from percausal_jax.data import chat, records
    from percausal_jax.data.pairing import pair_example
    from percausal_jax.data.prompts import Prompt
    from percausal_jax.hf.checkpoint import load_pretrained, resolve_model_dir
    from percausal_jax.hf.gguf import resolve_model_arg
    from percausal_jax.objectives import default_config
    from percausal_jax.scoring import score_examples

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    rows = records.read_records(args.data)
    for i, row in enumerate(rows, 1):
        if records.detect_kind(row, args.data, i) != "prompt":
            raise UserError(f"{args.data}:{i}: expected prompt records with fields "
                            "'id', 'prompt', 'prompt_no_profile', 'completion'")
    model_dir = resolve_model_dir(resolve_model_arg(args.model)).local
    tokenizer = _tokenizer(model_dir)
    examples = []
    for row in rows:
        texts = [row["prompt"], row["prompt_no_profile"]]
        if args.template == "chat":
            texts = [chat.render(tokenizer, Prompt(None, t), "chat") for t in texts]
        examples.append(pair_example(tokenizer, *texts, row["completion"],
                                     add_special_tokens=args.template == "none"))
    model = load_pretrained(model_dir, dtype=args.dtype)
    cfg = default_config()
    cfg.perce.clip_min, cfg.perce.clip_max, cfg.nextquill.delta = args.clip_min, args.clip_max, args.delta
    progress = lambda it: tqdm(it, desc="scoring", unit="batch", file=sys.stderr)  # noqa: E731
    scored = []
    for row, ex, s in zip(rows, examples, score_examples(model, examples, cfg, args.batch_size, progress)):
        rec = {"id": row["id"], "prompt_ids": list(ex.prompt_ids), "prompt_no_profile_ids": list(ex.prompt_no_profile_ids),
               "completion_ids": list(ex.response_ids),
               "tokens": [tokenizer.decode([t]) for t in ex.response_ids], **s}
        scored.append({k: rec[k] for k in OUTPUT_KEYS})
    write_text(storage.path(args.out), "".join(json.dumps(r) + "\n" for r in scored))
    if args.html:
        from percausal_jax.evaluation.heatmap import heatmap_page

        write_text(storage.path(args.html), heatmap_page(scored, args.clip_min, args.clip_max, args.delta))
    print(f"scored {len(scored)} examples -> {args.out}" + (f", {args.html}" if args.html else ""))
    return 0


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - any failure here means the directory lacks usable tokenizer files
        raise UserError(f"{model_dir}: no usable tokenizer files ({type(e).__name__})") from None
