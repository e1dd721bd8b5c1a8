"""Mean ± standard deviation over seeds: the one summary the sweep report, its tables and its plots share."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class Stat:
    """``mean`` and the sample standard deviation (ddof = 1; None for fewer than 2 values) of ``n`` values."""

    mean: float
    std: float | None
    n: int

    def format(self, digits: int = 4) -> str:
        if self.n == 0:
            return "–"
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def summarize(values: Iterable[float | None]) -> Stat:
    """The finite values' mean ± sample std; missing (None) and non-finite values are left out (``n`` counts the
    rest), so a metric absent from one seed's run does not poison the others."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return Stat(math.nan, None, 0)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return Stat(mean, std, len(xs))
