"""What a sweep compares, parsed and checked before anything trains: methods (an objective, optionally with its own
knobs: ``perce[clip_max=2]``), the learning-rate grid, the seeds and the criterion that picks each method's LR on
the validation split."""

from __future__ import annotations

import dataclasses
import difflib
import re

from percausal_jax.errors import UserError

# validation metric -> higher is better; rouge/meteor/span recall come from generating on --val, the NLLs from the
# run's last periodic eval on --val (data.eval): mean gold-token NLL, and its personal / generic split
CRITERIA = {"rougeL": True, "rouge1": True, "meteor": True, "span_recall": True,
            "nll": False, "nll_personal": False, "nll_generic": False}
GENERATION_CRITERIA = ("rougeL", "rouge1", "meteor", "span_recall")
# keys a sweep sets for each cell; an override of one of them would silently change what a cell is
RESERVED = {"seed": "--seeds", "optimizer.lr": "--lrs", "objective.name": "--objectives",
            "data.train": "--train", "data.eval": "--val"}


@dataclasses.dataclass(frozen=True)
class Method:
    """An objective and knob overrides of its config block (``objective.<name>.<knob>``), as given."""

    objective: str
    knobs: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return self.objective + (f"[{','.join(f'{k}={v}' for k, v in self.knobs)}]" if self.knobs else "")

    @property
    def slug(self) -> str:
        """A directory-name form of the label: ``perce_clip_max-2``."""
        return self.objective + "".join(f"_{k}-{re.sub(r'[^A-Za-z0-9.]', '_', v)}" for k, v in self.knobs)

    def overrides(self) -> list[str]:
        return [f"--config.objective.name={self.objective}",
                *(f"--config.objective.{self.objective}.{k}={v}" for k, v in self.knobs)]


@dataclasses.dataclass(frozen=True)
class Criterion:
    metric: str
    higher_is_better: bool

    @property
    def needs_generation(self) -> bool:
        return self.metric in GENERATION_CRITERIA

    def describe(self, seeds: tuple[int, ...]) -> str:
        source = ("generations on the validation split" if self.needs_generation else
                  "the run's last periodic eval on the validation split (teacher-forced)")
        return (f"mean over seeds {', '.join(map(str, seeds))} of validation {self.metric} "
                f"({'higher' if self.higher_is_better else 'lower'} is better; from {source})")


def criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise UserError(f"--select {name!r}: expected one of {', '.join(CRITERIA)}")
    return Criterion(name, CRITERIA[name])


def parse_methods(text: str | None) -> list[Method]:
    """``ce,perce,perce[clip_max=2,clip_min=0.5]`` (commas inside brackets separate knobs); default: every
    registered objective at its config's values. Unknown objectives and knobs are errors naming them."""
    from percausal_jax.objectives import OBJECTIVES
    from percausal_jax.objectives.registry import fields

    if text is None:
        return [Method(name) for name in OBJECTIVES]
    methods = []
    for item in _split_top(text):
        m = re.fullmatch(r"([A-Za-z_]\w*)(?:\[(.*)\])?", item)
        if not m:
            raise UserError(f"--objectives {item!r}: expected NAME or NAME[knob=value,...], e.g. perce[clip_max=2]")
        name, body = m.group(1), m.group(2)
        if name not in OBJECTIVES:
            near = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(f"--objectives {name!r}: unknown objective{hint}; choose from {', '.join(OBJECTIVES)}")
        known = fields(OBJECTIVES[name])
        knobs = []
        for part in [p.strip() for p in (body or "").split(",") if p.strip()]:
            key, eq, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not value:
                raise UserError(f"--objectives {item!r}: knob {part!r}: expected knob=value")
            if key not in known:
                near = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise UserError(f"--objectives {item!r}: {name} has no knob {key!r}{hint}; its knobs: "
                                f"{', '.join(known) or 'none'}")
            knobs.append((key, value))
        if body is not None and not knobs:
            raise UserError(f"--objectives {item!r}: empty knob list (drop the brackets)")
        methods.append(Method(name, tuple(knobs)))
    if not methods:
        raise UserError("--objectives: no method given")
    labels = [m.label for m in methods]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup:
        raise UserError(f"--objectives: {dup!r} is given twice")
    return methods


def _split_top(text: str) -> list[str]:
    """Splits at commas outside brackets."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise UserError(f"--objectives {text!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        raise UserError(f"--objectives {text!r}: unbalanced brackets")
    return [x for x in [*items, cur.strip()] if x]


def parse_numbers(flag: str, text: str, kind: type) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UserError(f"{flag} {text!r}: expected comma-separated {what}") from None
    if not values:
        raise UserError(f"{flag} {text!r}: expected at least one value")
    if len(set(values)) != len(values):
        raise UserError(f"{flag} {text!r}: a value is given twice")
    return values


def check_overrides(overrides: list[str]) -> None:
    """The sweep sets these keys itself, per cell."""
    for item in overrides:
        key = item.split("=", 1)[0].removeprefix("--").removeprefix("config.")
        if key in RESERVED:
            raise UserError(f"{item}: the sweep sets {key} for each cell; use {RESERVED[key]}")
