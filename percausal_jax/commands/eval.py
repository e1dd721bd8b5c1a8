"""``percausal eval --model PATH | --workdir DIR [--step N] --data FILE --out PREDS.jsonl``: generate and score."""

from __future__ import annotations

import json

from percausal_jax.evaluation.contrast_flags import add_flags, check_flags


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="generate for each record and compute ROUGE / METEOR / LaMP metrics")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory, hub id, or 'embedded'")
    src.add_argument("--workdir", help="a training run (its latest checkpoint, or --step)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--data", required=True, help="canonical or prompt records (JSONL/parquet)")
    p.add_argument("--out", required=True, help="predictions JSONL")
    p.add_argument("--metrics", default=None, help="metrics JSON (default: OUT with .metrics.json)")
    p.add_argument("--task", default=None, help="metric family when records carry no task (e.g. product_review)")
    p.add_argument("--template", choices=("chat", "none"), default=None,
                   help="prompt template (default: the run's, or chat for --model)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    add_flags(p, "decode profile-contrastively against each record's profile-free prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="only the first N records")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs WordNet)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, accepts_overrides=True)  # --config.a.b=v: the run's config (with --workdir)


def run(args) -> int:
    import dataclasses

    from percausal_jax import storage
    from percausal_jax.atomic import write_text
    from percausal_jax.data.featurize import FeaturizeConfig
    from percausal_jax.evaluation.evaluate import (DecodeConfig, generate_for_records, read_eval_records, score,
                                                   teacher_forced_nll)

    from percausal_jax.commands._args import DECODE, check

    check_flags(args)
    check(args, {**DECODE, "step": DECODE["limit"]})
    if args.model and getattr(args, "overrides", ()):
        from percausal_jax.errors import UserError

        raise UserError(f"{args.overrides[0]}: --config.* overrides apply to a run's config (--workdir); "
                        "--model has no config")
    records = read_eval_records(args.data)
    if args.limit:
        records = records[:args.limit]
    if args.workdir:
        from percausal_jax.training.export import restore_model

        model, run_, _, _ = restore_model(args.workdir, args.step, getattr(args, "overrides", ()))
        tokenizer, fcfg, chunk = run_.tokenizer, run_.featurize_config, run_.config.vocab_chunk_size
        if args.template:
            fcfg = dataclasses.replace(fcfg, template=args.template)
    else:
        from percausal_jax.training.setup import pretrained

        loaded = pretrained(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        fcfg, chunk = FeaturizeConfig(template=args.template or "chat"), 8192
    dcfg = DecodeConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                        args.seed, args.batch_size, args.contrast, args.plausibility)
    rows = generate_for_records(model, tokenizer, records, fcfg, dcfg, progress=not args.no_progress)
    result = score(rows, records, args.task, meteor=not args.no_meteor)
    # with personal_spans: teacher-forced NLL of the references' personal / generic tokens (nll_personal, ...)
    result.update(teacher_forced_nll(model, tokenizer, records, fcfg, args.batch_size, chunk))
    out = storage.path(args.out)  # local or gs://; each file written whole
    write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    metrics_path = storage.path(args.metrics) if args.metrics else out.with_suffix(".metrics.json")
    write_text(metrics_path, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0
