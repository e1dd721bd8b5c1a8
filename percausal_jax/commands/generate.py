"""``percausal generate``: greedy completion (KV cache) of a chat (or raw) prompt with a HF directory or the embedded model.

With ``--contrast BETA`` and ``--prompt-no-profile TEXT`` (the same request without the profile, rendered the same
way) the completion is decoded profile-contrastively (:mod:`percausal_jax.evaluation.contrast`).

The prompt ids come from the featurizer that training and eval use (:func:`~percausal_jax.evaluation.evaluate.
featurize_record`, the message as a prompt record's user message: rendered by :func:`percausal_jax.data.chat.render`
with ``--template``, tokenized as every training prompt is), and decoding stops where eval's does
(:func:`~percausal_jax.evaluation.generate.stop_ids`)."""

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
    from percausal_jax.commands._args import AT_LEAST_1, check
    from percausal_jax.data.featurize import FeaturizeConfig
    from percausal_jax.evaluation.evaluate import featurize_record, whole_response_featurizer
    from percausal_jax.evaluation.generate import generate, padding_id, stop_ids
    from percausal_jax.training.setup import pretrained

    check_flags(args)
    check(args, {"max_new_tokens": AT_LEAST_1})
    if args.contrast > 0 and args.prompt_no_profile is None:
        raise UserError(f"--contrast={args.contrast} needs --prompt-no-profile (the message without the profile)")
    loaded = pretrained(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.template == "chat" and not tokenizer.chat_template:
        raise UserError(f"{args.model}: the tokenizer has no chat template; use --template none")

    # the prompt ids as training and eval build them: a prompt record (user messages rendered with the template)
    featurizer = whole_response_featurizer(tokenizer, FeaturizeConfig(template=args.template))
    contrastive = args.contrast > 0
    record = {"id": "--prompt", "prompt": args.prompt, "completion": "",
              "prompt_no_profile": args.prompt_no_profile if contrastive else args.prompt}
    texts, example = featurize_record(featurizer, record)
    no_profile = [list(example.prompt_no_profile_ids)] if contrastive else None
    # stop at EOS and at the end of turn that training appends (the chat template's own, e.g. <end_of_turn>)
    (completion,) = generate(model, [list(example.prompt_ids)], args.max_new_tokens,
                             eos_ids=stop_ids(featurizer, [texts.template]), pad_id=padding_id(tokenizer),
                             prompts_no_profile=no_profile, contrast=args.contrast, plausibility=args.plausibility)
    print(f"prompt: {args.prompt}")
    print(f"completion: {tokenizer.decode(completion, skip_special_tokens=True).strip()}")
    return 0
