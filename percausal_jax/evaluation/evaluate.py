"""Generate for each record's personalized prompt and score the generations (``percausal eval``).

Records are read and featurized exactly as in training (retrieval, prompt builder, chat template), so the prompt a
model is evaluated on is the prompt it was trained on. Generations are written one JSON line per record
``{id, task, prompt, prediction, reference}``; metrics per task come from :mod:`percausal_jax.evaluation.metrics`.
Empty generations are scored as empty, never dropped. With ``DecodeConfig.contrast`` > 0 decoding is
profile-contrastive (:mod:`percausal_jax.evaluation.contrast`) against each record's profile-free prompt, the one
training's counterfactual pass sees: the featurizer's ``prompt_no_profile_ids`` (a prompt record's
``prompt_no_profile``; for a canonical record, the prompt built without profile items).

When records carry ``personal_spans``, :func:`teacher_forced_nll` also scores each reference under the personalized
prompt (teacher forced, the same featurized examples) and splits its NLL into personal and generic tokens
(:mod:`percausal_jax.evaluation.token_nll`): ``nll_personal``, ``nll_generic``, ``tokens_personal``,
``tokens_generic``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

from percausal_jax.data.featurize import FeaturizeConfig, Featurizer, Kept, Texts
from percausal_jax.data.pairing import PairedExample
from percausal_jax.data.skips import SkipReport
from percausal_jax.errors import UserError
from percausal_jax.evaluation import metrics, token_nll
from percausal_jax.evaluation.generate import generate, padding_id, stop_ids


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 8
    contrast: float = 0.0  # β of profile-contrastive decoding (0 = plain decoding)
    plausibility: float = 0.1  # α: only tokens with p ≥ α · max p given the profile are eligible


def whole_response_featurizer(tokenizer, fcfg: FeaturizeConfig) -> Featurizer:
    """``fcfg``'s featurizer with responses kept whole (no ``max_response_len``, no truncation), as generated."""
    return Featurizer(tokenizer, dataclasses.replace(fcfg, max_response_len=None, truncate_response=False))


def featurize_record(featurizer: Featurizer, record: dict) -> tuple[Texts, PairedExample]:
    """A record's texts and ids by the one featurizer path of training; a prompt that does not fit is an error."""
    texts, result = featurizer.run(record)
    if not isinstance(result, Kept):
        raise UserError(f"record {record.get('id')}: the prompt does not fit max_prompt_len even without profile")
    return texts, result.example


def generate_for_records(model, tokenizer, records: Sequence[dict], fcfg: FeaturizeConfig, dcfg: DecodeConfig,
                         progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    featurizer = whole_response_featurizer(tokenizer, fcfg)
    prompts, no_profile, rows, templates = [], [], [], set()
    for rec in records:
        texts, example = featurize_record(featurizer, rec)
        prompts.append(list(example.prompt_ids))
        no_profile.append(list(example.prompt_no_profile_ids))
        templates.add(texts.template)
        rows.append({"id": rec["id"], "task": rec.get("task"), "prompt": texts.prompt, "reference": texts.completion})
    eos, pad = stop_ids(featurizer, templates), padding_id(tokenizer)
    starts = range(0, len(prompts), dcfg.batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", file=sys.stderr, disable=not progress):
        chunk = prompts[start:start + dcfg.batch_size]
        outs = generate(model, chunk, dcfg.max_new_tokens, eos_ids=eos, pad_id=pad,
                        temperature=dcfg.temperature, top_p=dcfg.top_p, top_k=dcfg.top_k,
                        repetition_penalty=dcfg.repetition_penalty, seed=dcfg.seed + start,
                        prompts_no_profile=no_profile[start:start + dcfg.batch_size], contrast=dcfg.contrast,
                        plausibility=dcfg.plausibility)
        for row, ids in zip(rows[start:start + dcfg.batch_size], outs):
            row["prediction"] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return rows


def teacher_forced_nll(model, tokenizer, records: Sequence[dict], fcfg: FeaturizeConfig, batch_size: int = 8,
                       chunk_size: int = 8192) -> dict:
    """Personal / generic token NLL of the references under their personalized prompts (:func:`token_nll.class_means`
    keys without prefix); {} when no record carries ``personal_spans``. Responses are scored whole (no
    ``max_response_len``), as :func:`generate_for_records` generates; batch lengths are rounded up to a multiple of
    16, so few shapes compile."""
    if not any(r.get("personal_spans") is not None for r in records):
        return {}
    import numpy as np
    from flax import nnx

    from percausal_jax.data.pairing import collate_examples
    from percausal_jax.objectives.losses import Requirements
    from percausal_jax.objectives.passes import pass_outputs

    @nnx.jit
    def personal_logp(model, batch):  # f32[B, R]
        r = batch.response
        return pass_outputs(model, batch.personal, r.index_personal, r.ids, Requirements(), chunk_size).logp

    featurizer = whole_response_featurizer(tokenizer, fcfg)
    examples = [featurize_record(featurizer, rec)[1] for rec in records]
    total = None
    for start in range(0, len(examples), batch_size):
        # the spare rows are all padding: they must add nothing to the sums over the batch
        batch = collate_examples(examples[start:start + batch_size], batch_size)
        logp = np.asarray(personal_logp(model, batch), np.float64)
        total = token_nll.add_sums(total, token_nll.class_sums(logp, batch.response.weight,
                                                               batch.response.token_class))
    return token_nll.class_means(total)


def score(rows: Sequence[dict], records: Sequence[dict], task: str | None, meteor: bool) -> dict:
    """Metrics per task present (one task: a flat dict; several: ``{task: {...}}`` plus ``n``)."""
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_task.setdefault(task or row["task"] or "synthetic", []).append(i)
    results = {t: metrics.compute(t, [rows[i]["prediction"] for i in idx], [rows[i]["reference"] for i in idx],
                                  [records[i] for i in idx], meteor=meteor) for t, idx in by_task.items()}
    if len(results) == 1:
        return next(iter(results.values()))
    return {**results, "n": len(rows)}


def read_eval_records(path: str, *, strict: bool = False) -> tuple[list[dict], SkipReport]:
    """The records of ``--data`` and what was kept and skipped (``strict``: a skipped record is an error)."""
    numbered, report = SkipReport.read(path, strict=strict)
    return [record for _, record in numbered], report
