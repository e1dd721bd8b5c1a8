"""``percausal eval --model PATH | --workdir DIR [--step N] --data FILE --out PREDS.jsonl``: generate and score.

Records with an empty required field are skipped: the kept/skipped table (counts by reason, first ids) goes to
stderr and the metrics record ``skipped`` and ``skipped_by_reason``; ``--strict`` (or, with ``--workdir``, the run's
``data.strict``, e.g. ``--config.data.strict=true``) makes such a record an error (exit 2) instead."""

from __future__ import annotations

import json

from percausal_jax.data.records import SkipReport
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
    p.add_argument("--strict", action="store_true", help=SkipReport.STRICT_HELP)
    p.add_argument("--base-moved", action="store_true",
                   help="with --workdir and --config.model.path=DIR: the run's base model now lives at DIR (the "
                        "same weights, checked by fingerprint)")
    p.set_defaults(func=run, accepts_overrides=True)  # --config.a.b=v: the run's config (with --workdir)


def run(args) -> int:
    import dataclasses

    from percausal_jax import storage
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
    records, skips = read_eval_records(args.data, strict=args.strict or _run_strict(args))
    if args.limit:
        records = records[:args.limit]
    if args.workdir:
        from percausal_jax.training.export import restore_model

        model, run_, _, _ = restore_model(args.workdir, args.step, getattr(args, "overrides", ()),
                                          base_moved=args.base_moved)
        tokenizer, fcfg, chunk = run_.tokenizer, run_.featurize_config, run_.config.vocab_chunk_size
        if args.template:
            fcfg = dataclasses.replace(fcfg, template=args.template)
    else:
        from percausal_jax.training.setup import pretrained

        loaded = pretrained(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        fcfg, chunk = FeaturizeConfig(template=args.template or "chat"), 8192
    skips.announce(f"--data={args.data}")  # every input checked: what was kept and skipped, before generating
    dcfg = DecodeConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                        args.seed, args.batch_size, args.contrast, args.plausibility)
    rows = generate_for_records(model, tokenizer, records, fcfg, dcfg, progress=not args.no_progress)
    result = score(rows, records, args.task, meteor=not args.no_meteor)
    # with personal_spans: teacher-forced NLL of the references' personal / generic tokens (nll_personal, ...)
    result.update(teacher_forced_nll(model, tokenizer, records, fcfg, args.batch_size, chunk))
    result.update(skips.summary())  # of the whole --data file (before --limit)
    write_pair(storage.path(args.out), storage.path(args.metrics) if args.metrics else None, rows, result)
    print(json.dumps(result))
    return 0


def write_pair(out, metrics_path, rows: list[dict], result: dict) -> None:
    """Predictions, then the metrics, each written whole (local or gs://). The metrics are written last and name
    the predictions' SHA-256 (``predictions_sha256``), and an older metrics file is removed first: a reader that
    finds the metrics finds the predictions they describe; predictions without metrics are an unfinished eval."""
    import hashlib

    from percausal_jax.atomic import write_text

    metrics_path = metrics_path or out.with_suffix(".metrics.json")
    predictions = "".join(json.dumps(r) + "\n" for r in rows)
    result["predictions_sha256"] = hashlib.sha256(predictions.encode()).hexdigest()
    if metrics_path.exists():
        metrics_path.unlink()
    write_text(out, predictions)
    write_text(metrics_path, json.dumps(result, indent=2) + "\n")


def _run_strict(args) -> bool:
    """``data.strict`` of the run evaluated with ``--workdir`` (its saved config, with ``--config.*`` overrides);
    read before its weights, so that bad data fails first."""
    if not args.workdir:
        return False
    import ml_collections

    from percausal_jax.config import apply_override
    from percausal_jax.training import checkpoints
    from percausal_jax.training.export import _check_workdir

    _check_workdir(args.workdir)
    cfg = ml_collections.ConfigDict(checkpoints.read_meta(args.workdir, args.step)[0]["config"])
    for item in getattr(args, "overrides", ()):
        apply_override(cfg, item, source=f"the config of {args.workdir}")
    return bool(cfg.get("data", {}).get("strict", False))
