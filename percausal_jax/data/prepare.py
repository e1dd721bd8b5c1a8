"""Raw or canonical data → ready prompt records (retrieved, templated, within budget): ``percausal prepare``.

Output rows (JSONL, written atomically; the output may be a ``gs://`` URL) are prompt records that ``percausal
score`` and training read as they are::

    {id, user_id, task, prompt, prompt_no_profile, completion, template, profile_items_used, ...extra keys}

``template`` records how the prompts were rendered (``"chat"``: the text already holds the chat template's special
tokens, so it is tokenized without adding any). Extra keys of the source record (``personal_spans``, ...) are
kept; the consumed ``input``/``output``/``profile``/``target`` are not. TRL rows have no id: theirs is
``{input file stem}-{line}``.

The records are featurized as training will (:class:`~percausal_jax.data.featurize.Featurizer`) when a tokenizer
is given, so what is dropped here (over the prompt budget) is what training would drop, and the token statistics
are those training sees.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from percausal_jax import storage
from percausal_jax.data import records as records_lib
from percausal_jax.data import sources
from percausal_jax.data.featurize import FeaturizeConfig, Featurizer, Kept, Texts
from percausal_jax.data.files import with_split, write_jsonl
from percausal_jax.data.skips import SkipReport
from percausal_jax.data.retrieval import Contriever
from percausal_jax.errors import UserError

SOURCES = ("longlamp", "lamp", "amazon", "jsonl")
CONSUMED = {"input", "output", "profile", "target", "prompt", "prompt_no_profile", "completion", "template",
            "profile_items_used"}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the records come from (see ``percausal prepare --help`` for what each kind accepts)."""

    kind: str  # one of SOURCES
    input: str  # file, folder, gs:// URL or hub id
    config: str | None = None  # LongLaMP config, DPL category or LaMP folder
    split: str | None = None
    meta: str | None = None  # DPL-meta rows (amazon)
    task: str | None = None  # LaMP task (lamp)


@dataclasses.dataclass(frozen=True)
class Prepare:
    """A ``percausal prepare`` run: the source, where to write, and how to featurize."""

    source: Source
    out: str  # .jsonl, local path or gs:// URL
    featurize: FeaturizeConfig
    tokenizer: str | None = None  # needed for chat templates, budgets and token statistics
    contriever: str | None = None  # encoder for the contriever retriever
    strict: bool = False  # a row with an empty required field is an error instead of skipped


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What was written, and the statistics printed after it."""

    out: str
    records: list[dict]
    report: SkipReport
    truncated: list[str]  # ids of completions over max_response_len, written in full
    max_response_len: int | None
    lengths: dict[str, list[int]] | None  # token lengths (with a tokenizer)

    def summary(self) -> str:
        lines = [f"wrote {len(self.records)} prompt records to {self.out}", self.report.table()]
        if self.truncated:
            lines.append(f"truncated responses: {len(self.truncated)} over --max-response-len {self.max_response_len} "
                         f"tokens, written in full (training cuts them to data.max_response_len, without EOS): "
                         f"{', '.join(self.truncated[:5])}{', ...' if len(self.truncated) > 5 else ''}")
        if self.lengths is not None:
            lines.append("tokens (p50 / p90 / p99 / max):")
            for key, values in self.lengths.items():
                p50, p90, p99 = np.percentile(values, [50, 90, 99], method="higher")
                lines.append(f"  {key:<18} {p50} / {p90} / {p99} / {max(values)}")
        used = [r["profile_items_used"] for r in self.records]
        histogram = dict(sorted(Counter(used).items()))
        lines.append(f"profile items used: mean {np.mean(used):.2f}; examples per item count {histogram}")
        return "\n".join(lines)


def prepare(spec: Prepare) -> Prepared:
    """Reads, featurizes and writes the prompt records atomically. Rows with an empty required field are skipped
    (``spec.strict``: an error naming file, row and field), examples over the prompt budget dropped, each counted
    by reason; completions over the response budget are counted as truncated and written in full, or dropped."""
    report = SkipReport()
    numbered = load_records(spec.source, spec.strict, report)
    tokenizer = storage.load_tokenizer(spec.tokenizer) if spec.tokenizer is not None else None
    contriever = Contriever(spec.contriever) if spec.contriever is not None else None
    featurizer = Featurizer(tokenizer, spec.featurize, contriever=contriever)

    out, lengths = [], {"prompt": [], "prompt_no_profile": [], "completion+end": []}
    truncated: list[str] = []
    for fallback_id, record in numbered:
        if tokenizer is None:
            texts = featurizer.texts(record)
        else:
            texts, result = featurizer.run(record)
            if not isinstance(result, Kept):
                report.kept -= 1  # read, but not written
                report.skip(result.reason, record.get("id", fallback_id))
                continue
            ex = result.example
            n_response = len(ex.response_ids)
            if result.truncated:  # the table shows the full length (what --max-response-len is chosen from)
                truncated.append(str(record.get("id", fallback_id)))
                n_response = (len(tokenizer(texts.completion, add_special_tokens=False)["input_ids"])
                              + len(featurizer.response_end(texts.template)))
            for key, n in zip(lengths, (len(ex.prompt_ids), len(ex.prompt_no_profile_ids), n_response)):
                lengths[key].append(n)
        out.append(prompt_record(record, texts, fallback_id))
    if not out:
        raise UserError(f"{spec.source.input}: no example is left (dropped: {dict(sorted(report.counts.items()))}); "
                        "raise --max-prompt-len or --max-response-len")
    write_jsonl(spec.out, out)
    return Prepared(spec.out, out, report, truncated, spec.featurize.max_response_len,
                    lengths if tokenizer is not None else None)


def load_records(source: Source, strict: bool = False, report: SkipReport | None = None) -> list[tuple[str, dict]]:
    """``(fallback id, record)`` pairs per source kind: canonical records (for jsonl, any kind); the fallback id
    (``{file stem}-{line}``) names rows without an id. Skipped rows are counted in ``report``."""
    split, config = source.split, source.config
    if source.kind == "longlamp":
        files = sources.find_longlamp(source.input, split=split, config=config)
        return _with_ids(sources.read_longlamp(files, strict=strict, report=report))
    if source.kind == "lamp":
        questions = sources.find_lamp(source.input, split=split, config=config)
        outputs = sources.lamp_outputs_path(questions)
        if outputs is None:
            raise UserError(f"{questions}: no outputs file beside it "
                            f"({questions.name.replace('_questions', '_outputs')}); prepare needs the gold outputs "
                            "(the LaMP test split has none)")
        return _with_ids(sources.read_lamp(questions, outputs, task=source.task, strict=strict, report=report))
    if source.kind == "amazon":
        main, meta = sources.find_amazon(source.input, source.meta, split=split, config=config)
        return _with_ids(sources.read_amazon(main, meta, strict=strict, report=report))
    path = with_split(source.input, split)
    if split is not None and path == storage.path(source.input):
        raise UserError(f"{source.input}: --split {split} applies to a DatasetDict folder (datasets.save_to_disk), "
                        "and this is not one")
    stem = records_lib.file_stem(path)
    return [(f"{stem}-{line}", record)
            for line, record in records_lib.read_numbered(path, strict=strict, report=report)]


def _with_ids(records) -> list[tuple[str, dict]]:
    return [(record["id"], record) for record in records]


def prompt_record(record: dict, texts: Texts, fallback_id: str) -> dict:
    """The prompt record written for ``record``: id/user_id/task first, then the texts, then extra keys."""
    head = {"id": record.get("id", fallback_id)}
    head.update({key: record[key] for key in ("user_id", "task") if key in record})
    extra = {k: v for k, v in record.items() if k not in CONSUMED and k not in head}
    return {**head, "prompt": texts.prompt, "prompt_no_profile": texts.prompt_no_profile,
            "completion": texts.completion, "template": texts.template, "profile_items_used": texts.items_used,
            **extra}
