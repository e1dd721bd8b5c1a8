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

from percausal_jax.data.featurize import FeaturizeConfig, Featurizer
from percausal_jax.data.records import SkipReport
from percausal_jax.errors import UserError
from percausal_jax.evaluation import metrics, token_nll
from percausal_jax.evaluation.generate import generate


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


def generate_for_records(model, tokenizer, records: Sequence[dict], fcfg: FeaturizeConfig, dcfg: DecodeConfig,
                         progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    featurizer = Featurizer(tokenizer, dataclasses.replace(fcfg, max_response_len=None, truncate_response=False))
    prompts, no_profile, rows = [], [], []
    stops = {tokenizer.eos_token_id} - {None}  # and the last id of each response end training appended
    for rec in records:
        texts, result = featurizer.run(rec)
        if texts is None:
            raise UserError(f"record {rec.get('id')}: the prompt does not fit max_prompt_len even without profile")
        prompts.append(list(result.example.prompt_ids))
        no_profile.append(list(result.example.prompt_no_profile_ids))
        stops.add(featurizer.response_end(texts.template)[-1])
        rows.append({"id": rec["id"], "task": rec.get("task"), "prompt": texts.prompt, "reference": texts.completion})
    eos = sorted(stops)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    starts = range(0, len(prompts), dcfg.batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", file=sys.stderr, disable=not progress):
        chunk = prompts[start:start + dcfg.batch_size]
        outs = generate(model, chunk, dcfg.max_new_tokens, eos_ids=tuple(set(eos)), pad_id=pad,
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

    from percausal_jax.data.featurize import Kept
    from percausal_jax.data.pairing import collate
    from percausal_jax.objectives.losses import Requirements
    from percausal_jax.objectives.passes import pass_outputs

    @nnx.jit
    def personal_logp(model, batch):  # f32[B, R]
        r = batch.response
        return pass_outputs(model, batch.personal, r.index_personal, r.ids, Requirements(), chunk_size).logp

    featurizer = Featurizer(tokenizer, dataclasses.replace(fcfg, max_response_len=None, truncate_response=False))
    examples = []
    for rec in records:
        result = featurizer(rec)
        if not isinstance(result, Kept):
            raise UserError(f"record {rec.get('id')}: the prompt does not fit max_prompt_len even without profile")
        examples.append(result.example)
    up = lambda n: -(-n // 16) * 16  # noqa: E731
    total = None
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows = [[ex] for ex in chunk] + [[] for _ in range(batch_size - len(chunk))]  # empty rows: all padding
        batch = collate(rows, up(max(e.personal_len for e in chunk)), up(max(e.counterfactual_len for e in chunk)),
                        up(max(len(e.response_ids) for e in chunk)))
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
