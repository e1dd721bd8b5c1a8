"""``percausal generate``: greedy completion (KV cache) of a chat (or raw) prompt with a HF directory or the embedded model."""

from __future__ import annotations

from percausal_jax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="greedy completion of one prompt")
    p.add_argument("--model", default="embedded", help="HF model directory, hub id, or 'embedded' (SmolLM2-135M)")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --template none)")
    p.add_argument("--template", choices=("chat", "none"), default="chat")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=run)


def run(args) -> int:
    from percausal_jax.evaluation.generate import generate
    from percausal_jax.training.setup import pretrained

    loaded = pretrained(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.template == "chat":
        if not tokenizer.chat_template:
            raise UserError(f"{args.model}: the tokenizer has no chat template; use --template none")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    from percausal_jax.data.featurize import FeaturizeConfig, Featurizer

    # stop at EOS and at the end of turn that training appends (the chat template's own, e.g. <end_of_turn>)
    end = Featurizer(tokenizer, FeaturizeConfig(template=args.template)).response_end(args.template)
    eos = sorted({end[-1]} | ({tokenizer.eos_token_id} - {None}))
    (completion,) = generate(model, [list(ids)], args.max_new_tokens, eos_ids=tuple(eos),
                             pad_id=tokenizer.pad_token_id or 0)
    print(f"prompt: {args.prompt}")
    print(f"completion: {tokenizer.decode(completion, skip_special_tokens=True).strip()}")
    return 0
