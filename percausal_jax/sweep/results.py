"""A sweep's cells (method × LR × seed), the choice of each method's LR on validation, and the per-method summary
over seeds on the test split. Plain typed values; the runner (:mod:`percausal_jax.sweep.runner`) fills them."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

from percausal_jax.errors import UserError
from percausal_jax.evaluation.stats import Stat, summarize
from percausal_jax.sweep.spec import Criterion

# the test-split columns of the report (each shown when some run has it): teacher-forced NLL of personal / generic
# tokens (``percausal eval``, records with personal_spans), then the generation metrics
TEST_METRICS = ("nll_personal", "nll_generic", "rouge1", "rougeL", "meteor", "span_recall")
# a run's periodic-eval keys (metrics.jsonl) -> validation metric names
EVAL_KEYS = {"eval_nll": "nll", "eval_nll_personal": "nll_personal", "eval_nll_generic": "nll_generic"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run and its evaluations. ``test`` is filled only at the LR chosen on validation."""

    method: str
    lr: float
    seed: int
    workdir: str
    val: dict[str, float]
    test: dict[str, float] | None = None
    train_s: float | None = None
    val_eval_s: float | None = None
    test_eval_s: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Cell:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def run_s(self) -> float | None:
        """Wall time of one run of the method: training plus evaluating on the test split."""
        if self.train_s is None or self.test_eval_s is None:
            return None
        return self.train_s + self.test_eval_s

    @property
    def spent_s(self) -> float:
        """Everything the sweep spent on this cell (train, validation and test evaluation)."""
        return sum(t for t in (self.train_s, self.val_eval_s, self.test_eval_s) if t is not None)


def final_eval(rows: Iterable[dict]) -> dict[str, float]:
    """The last periodic-eval line of a run's metrics.jsonl as validation metrics (``nll``, and ``nll_personal`` /
    ``nll_generic`` when the run reports them)."""
    last = next((r for r in reversed(list(rows)) if "eval_nll" in r), {})
    return {name: float(last[key]) for key, name in EVAL_KEYS.items() if isinstance(last.get(key), (int, float))}


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclasses.dataclass(frozen=True)
class Choice:
    """A method's LR chosen on validation: the criterion's mean ± std over seeds at every LR, and the best one."""

    method: str
    lr: float
    by_lr: dict[float, Stat]


def select(cells: Sequence[Cell], crit: Criterion) -> dict[str, Choice]:
    """Per method, the LR whose mean over seeds of the validation ``crit.metric`` is best (ties: the first LR in
    grid order). Test metrics are never read here."""
    choices = {}
    for method in _ordered(c.method for c in cells):
        lrs = _ordered(c.lr for c in cells if c.method == method)
        by_lr = {lr: summarize(c.val.get(crit.metric) for c in cells if c.method == method and c.lr == lr)
                 for lr in lrs}
        scored = [(lr, s.mean) for lr, s in by_lr.items() if s.n > 0]
        if not scored:
            raise UserError(f"{method}: no validation {crit.metric} in any cell (meteor needs WordNet; span_recall "
                            "and nll_personal / nll_generic need records with personal_spans); choose another "
                            "--select")
        sign = 1.0 if crit.higher_is_better else -1.0
        best = max(scored, key=lambda kv: sign * kv[1])[0]  # max keeps the first of equal scores
        choices[method] = Choice(method, best, by_lr)
    return choices


@dataclasses.dataclass(frozen=True)
class MethodSummary:
    """A method at its chosen LR: the validation criterion, each test metric and the run time (train + test
    eval), as mean ± std over seeds; ``spent_s`` is everything the sweep spent on the method (its whole LR grid)."""

    method: str
    lr: float
    seeds: tuple[int, ...]
    val: Stat
    test: dict[str, Stat]
    run_s: Stat
    spent_s: float

    def to_json(self) -> dict:
        return {"method": self.method, "lr": self.lr, "seeds": list(self.seeds), "val": self.val.to_json(),
                "test": {k: s.to_json() for k, s in self.test.items()}, "run_s": self.run_s.to_json(),
                "spent_s": self.spent_s}


def summarize_methods(cells: Sequence[Cell], choices: dict[str, Choice]) -> list[MethodSummary]:
    out = []
    for method, choice in choices.items():
        chosen = [c for c in cells if c.method == method and c.lr == choice.lr]
        keys = [k for k in TEST_METRICS if any(c.test and k in c.test for c in chosen)]
        out.append(MethodSummary(
            method, choice.lr, tuple(c.seed for c in chosen), choice.by_lr[choice.lr],
            {k: summarize((c.test or {}).get(k) for c in chosen) for k in keys},
            summarize(c.run_s for c in chosen), sum(c.spent_s for c in cells if c.method == method)))
    return out


def _ordered(xs: Iterable) -> list:
    seen: list = []
    for x in xs:
        if x not in seen and not (isinstance(x, float) and math.isnan(x)):
            seen.append(x)
    return seen
