"""``percausal score``: per-token PIR / DCE / weights of gold completions, as JSONL and an HTML heatmap.

``--contrast BETA`` (off by default) adds, per token, what profile-contrastive decoding would change at that step
(teacher-forced on the gold prefix): ``argmax_personal`` / ``argmax_contrast`` (ids) and their decoded
``argmax_personal_token`` / ``argmax_contrast_token``; the heatmap marks the tokens where the two differ.

Records with an empty required field (``prompt``, ``completion``) are skipped: the kept/skipped table (counts by
reason, first ids) goes to stderr, and ``--summary`` (default ``OUT`` with ``.summary.json``) records
``{"scored", "skipped", "skipped_by_reason"}``; ``--strict`` makes such a record an error (exit 2) instead."""

from __future__ import annotations

import dataclasses
import json
import sys

from percausal_jax.data.skips import SkipReport
from percausal_jax.errors import UserError
from percausal_jax.evaluation.contrast_flags import add_flags, check_flags

ID_KEYS = ("id", "prompt_ids", "prompt_no_profile_ids", "completion_ids", "tokens")
# the objectives' hyper-parameters with a flag here (``--clip-min`` ...): default, bound and help are the fields'
FLAGGED = {"perce": ("clip_min", "clip_max"), "nextquill": ("delta",)}


def _flagged():
    """``(objective class, field)`` of every flagged hyper-parameter."""
    from percausal_jax.objectives import OBJECTIVES

    fields = {name: {f.name: f for f in dataclasses.fields(OBJECTIVES[name])} for name in FLAGGED}
    return [(OBJECTIVES[name], fields[name][field]) for name, names in FLAGGED.items() for field in names]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_objective_flags(p) -> None:
    for cls, f in _flagged():
        bound = f.metadata["bound"]
        admits = f", {bound.expected(f.default)}" if bound else ""
        p.add_argument(_flag(f.name), type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (objective.{cls.name}.{f.name}{admits}; default {f.default})")


def _check_objective_flags(args) -> None:
    """The flags' bounds, then the objectives' ordered pairs (``Objective.ordered``), as the config checks them."""
    flagged = _flagged()
    for _, f in flagged:
        if f.metadata["bound"]:
            f.metadata["bound"].check(_flag(f.name), getattr(args, f.name))
    names = {f.name: f for _, f in flagged}
    for cls in dict.fromkeys(cls for cls, _ in flagged):
        for low, high in cls.ordered:
            if low not in names or high not in names:
                continue
            a, b = getattr(args, low), getattr(args, high)
            if a > b:
                bound = names[low].metadata["bound"]
                floor = f"{bound.low:g} ≤ " if bound and bound.low is not None else ""
                raise UserError(f"{_flag(low)}={a} {_flag(high)}={b}: expected {floor}{_flag(low)[2:]} ≤ "
                                f"{_flag(high)[2:]}")


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="per-token causal scores (PIR, DCE, weights) of gold completions")
    p.add_argument("--model", required=True, help="HF model directory, hub id, or 'embedded'")
    p.add_argument("--data", required=True, help="prompt records JSONL/parquet: {id, prompt, prompt_no_profile, "
                                                 "completion}")
    p.add_argument("--out", required=True, help="output JSONL, one line per example")
    p.add_argument("--summary", default=None,
                   help="summary JSON: examples scored, records skipped by reason (default: OUT with .summary.json)")
    p.add_argument("--strict", action="store_true", help=SkipReport.STRICT_HELP)
    p.add_argument("--html", default=None, help="also write a self-contained HTML token heatmap")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--template", choices=("none", "chat"), default="none",
                   help="for records without a 'template' field (as in training): none = prompt text as is "
                        "(tokenizer's BOS if it adds one); chat = wrap in the chat template")
    p.add_argument("--enable-thinking", action="store_true",
                   help="passed to the chat template (Qwen3), as data.enable_thinking in training: for records "
                        "rendered here (no 'template' field, --template chat) and the template's end-of-turn")
    p.add_argument("--batch-size", type=int, default=4)
    _add_objective_flags(p)
    add_flags(p, "also record, per token, the greedy choice from z_h and from the contrasted logits (the heatmap "
                 "marks where they differ)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from percausal_jax import storage
    from percausal_jax.atomic import write_text
    from percausal_jax.data import records
    from percausal_jax.data.featurize import FeaturizeConfig, Featurizer
    from percausal_jax.objectives import OBJECTIVES
    from percausal_jax.scoring import CONTRAST_KEYS, output_keys, scorable, score_examples
    from percausal_jax.training.setup import pretrained

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    _check_objective_flags(args)
    check_flags(args)
    contrast = (args.contrast, args.plausibility) if args.contrast > 0 else None
    numbered, skips = SkipReport.read(args.data, strict=args.strict)
    for line, row in numbered:
        if records.detect_kind(row, args.data, line) != "prompt":
            raise UserError(f"{args.data}:{line}: expected prompt records with fields "
                            "'id', 'prompt', 'prompt_no_profile', 'completion'")
    rows = [row for _, row in numbered]
    knobs = {name: {field: getattr(args, field) for field in fields} for name, fields in FLAGGED.items()}
    objectives = scorable(cls(**knobs.get(name, {})) for name, cls in OBJECTIVES.items())
    loaded = pretrained(args.model, dtype=args.dtype)
    tokenizer = loaded.tokenizer
    skips.announce(f"--data={args.data}")  # every input checked: what was kept and skipped, before scoring
    # the featurizer training uses: a record's own `template` wins; records without one get --template
    featurizer = Featurizer(tokenizer, FeaturizeConfig(template=args.template, enable_thinking=args.enable_thinking))
    examples = [featurizer(row).example for row in rows]
    progress = lambda it: tqdm(it, desc="scoring", unit="batch", file=sys.stderr)  # noqa: E731
    keys = ID_KEYS + output_keys(objectives, contrast)
    if contrast is not None:
        keys += tuple(f"{k}_token" for k in CONTRAST_KEYS)
    scored = []
    for row, ex, s in zip(rows, examples, score_examples(loaded.model, examples, objectives, args.batch_size,
                                                         progress, contrast)):
        rec = {"id": row["id"], "prompt_ids": list(ex.prompt_ids),
               "prompt_no_profile_ids": list(ex.prompt_no_profile_ids), "completion_ids": list(ex.response_ids),
               "tokens": [tokenizer.decode([t]) for t in ex.response_ids], **s}
        rec.update({f"{k}_token": [tokenizer.decode([t]) for t in s[k]] for k in CONTRAST_KEYS if k in s})
        scored.append({k: rec[k] for k in keys})
    out = storage.path(args.out)
    write_text(out, "".join(json.dumps(r) + "\n" for r in scored))
    summary = storage.path(args.summary) if args.summary else out.with_suffix(".summary.json")
    write_text(summary, json.dumps({"scored": len(scored), **skips.summary()}, indent=2) + "\n")
    if args.html:
        from percausal_jax.evaluation.heatmap import heatmap_page

        write_text(storage.path(args.html), heatmap_page(scored, args.clip_min, args.clip_max, args.delta))
    print(f"scored {len(scored)} examples, skipped {skips.skipped} records -> {args.out}, {summary}"
          + (f", {args.html}" if args.html else ""))
    return 0
