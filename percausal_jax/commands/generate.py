"""``percausal generate``: greedy completion (KV cache) of a chat (or raw) prompt with a HF directory or the embedded model.

With ``--contrast BETA`` and ``--prompt-no-profile TEXT`` (the same request without the profile, rendered the same
way) the completion is decoded profile-contrastively (:mod:`percausal_jax.evaluation.contrast`)."""

from __future__ import annotations

from percausal_jax.errors import UserError
from percausal_jax.evaluation.contrast_flags import add_flags, check_flags


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="greedy completion of one prompt")
    p.add_argument("--model", default="embedded", help="HF model directory, hub id, or 'embedded' (SmolLM2-135M)")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --template none)")
    p.add_argument("--template", choices=("chat", "none"), default="chat")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-no-profile", default=None,
                   help="the same message without the profile (needed by --contrast)")
    add_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from percausal_jax.evaluation.generate import generate
    from percausal_jax.training.setup import pretrained

    from percausal_jax.commands._args import AT_LEAST_1, check

    check_flags(args)
    check(args, {"max_new_tokens": AT_LEAST_1})
    if args.contrast > 0 and args.prompt_no_profile is None:
        raise UserError(f"--contrast={args.contrast} needs --prompt-no-profile (the message without the profile)")
    loaded = pretrained(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.template == "chat" and not tokenizer.chat_template:
        raise UserError(f"{args.model}: the tokenizer has no chat template; use --template none")

    def encode(text: str) -> list[int]:
        if args.template == "chat":
            return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"])
        return list(tokenizer(text)["input_ids"])

    ids = encode(args.prompt)
    no_profile = [encode(args.prompt_no_profile)] if args.contrast > 0 else None
    from percausal_jax.data.featurize import FeaturizeConfig, Featurizer

    # stop at EOS and at the end of turn that training appends (the chat template's own, e.g. <end_of_turn>)
    end = Featurizer(tokenizer, FeaturizeConfig(template=args.template)).response_end(args.template)
    eos = sorted({end[-1]} | ({tokenizer.eos_token_id} - {None}))
    (completion,) = generate(model, [ids], args.max_new_tokens, eos_ids=tuple(eos),
                             pad_id=tokenizer.pad_token_id or 0, prompts_no_profile=no_profile,
                             contrast=args.contrast, plausibility=args.plausibility)
    print(f"prompt: {args.prompt}")
    print(f"completion: {tokenizer.decode(completion, skip_special_tokens=True).strip()}")
    return 0
