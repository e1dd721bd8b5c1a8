"""``percausal eval`` as one call: a model (``--model``) or a training run's checkpoint (``--workdir``), records
read and featurized as in training, generations scored, and the predictions and metrics written as a pair that a
reader never sees apart (:func:`write_pair`).

Records with an empty required field are skipped: the kept/skipped table (counts by reason, first ids) goes to
stderr and the metrics record ``skipped`` and ``skipped_by_reason``; ``strict`` (or, with a workdir, the run's
``data.strict``) makes such a record an error (exit 2) instead."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

from percausal_jax import atomic, storage
from percausal_jax.errors import UserError
from percausal_jax.evaluation.evaluate import (DecodeConfig, generate_for_records, read_eval_records, score,
                                               teacher_forced_nll)


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """What to evaluate, on what, and where the outputs go."""

    data: str  # canonical or prompt records
    out: str  # predictions JSONL (local or gs://)
    decode: DecodeConfig
    model: str | None = None  # HF dir, hub id, gs:// or "embedded" ...
    workdir: str | None = None  # ... or a training run (its latest checkpoint, or ``step``)
    step: int | None = None
    overrides: Sequence[str] = ()  # --config.a.b=v of the run's saved config (workdir only)
    base_moved: bool = False
    metrics: str | None = None  # default: OUT with .metrics.json
    task: str | None = None  # metric family when records carry none
    template: str | None = None  # default: the run's, or chat for a model
    limit: int = 0  # only the first N records (0: all)
    meteor: bool = True
    strict: bool = False
    progress: bool = True


def run_eval(job: EvalJob) -> dict:
    """Generates for every record, scores, writes predictions then metrics; returns the metrics."""
    if job.model and job.overrides:
        raise UserError(f"{job.overrides[0]}: --config.* overrides apply to a run's config (--workdir); "
                        "--model has no config")
    records, skips = read_eval_records(job.data, strict=job.strict or _run_strict(job))
    if job.limit:
        records = records[:job.limit]
    model, tokenizer, fcfg, chunk = _model(job)
    skips.announce(f"--data={job.data}")  # every input checked: what was kept and skipped, before generating
    rows = generate_for_records(model, tokenizer, records, fcfg, job.decode, progress=job.progress)
    result = score(rows, records, job.task, meteor=job.meteor)
    # with personal_spans: teacher-forced NLL of the references' personal / generic tokens (nll_personal, ...)
    result.update(teacher_forced_nll(model, tokenizer, records, fcfg, job.decode.batch_size, chunk))
    result.update(skips.summary())  # of the whole data file (before the limit)
    write_pair(storage.path(job.out), storage.path(job.metrics) if job.metrics else None, rows, result)
    return result


def _model(job: EvalJob):
    """``(model, tokenizer, featurize settings, vocab chunk)``: a run's trained model with its own featurization, or
    a named model with the chat template."""
    if job.workdir:
        from percausal_jax.training.export import restore_model

        model, run, _, _ = restore_model(job.workdir, job.step, job.overrides, base_moved=job.base_moved)
        fcfg = run.featurize_config
        if job.template:
            fcfg = dataclasses.replace(fcfg, template=job.template)
        return model, run.tokenizer, fcfg, run.config.vocab_chunk_size
    from percausal_jax.data.featurize import FeaturizeConfig
    from percausal_jax.training.setup import pretrained

    loaded = pretrained(job.model)
    return loaded.model, loaded.tokenizer, FeaturizeConfig(template=job.template or "chat"), 8192


def write_pair(out, metrics_path, rows: list[dict], result: dict) -> None:
    """Predictions, then the metrics, each written whole (local or gs://). The metrics are written last and name
    the predictions' SHA-256 (``predictions_sha256``), and an older metrics file is removed first: a reader that
    finds the metrics finds the predictions they describe; predictions without metrics are an unfinished eval."""
    metrics_path = metrics_path or out.with_suffix(".metrics.json")
    predictions = "".join(json.dumps(r) + "\n" for r in rows)
    result["predictions_sha256"] = hashlib.sha256(predictions.encode()).hexdigest()
    if metrics_path.exists():
        metrics_path.unlink()
    atomic.write_text(out, predictions)
    atomic.write_text(metrics_path, json.dumps(result, indent=2) + "\n")


def _run_strict(job: EvalJob) -> bool:
    """``data.strict`` of the run evaluated (its saved config, with the overrides); read before its weights, so
    that bad data fails first."""
    if not job.workdir:
        return False
    import ml_collections

    from percausal_jax.config import apply_override
    from percausal_jax.training import checkpoints
    from percausal_jax.training.export import _check_workdir

    _check_workdir(job.workdir)
    cfg = ml_collections.ConfigDict(checkpoints.read_meta(job.workdir, job.step)[0]["config"])
    for item in job.overrides:
        apply_override(cfg, item, source=f"the config of {job.workdir}")
    return bool(cfg.get("data", {}).get("strict", False))
