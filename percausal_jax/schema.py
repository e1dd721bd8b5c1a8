"""A config key is declared once, on the field of its typed dataclass: :func:`key` gives the field its default and
records its help text and admissible values (``choices`` or a numeric :class:`Bound`) in the field's metadata.

Everything else is read from those declarations: the default config (``configs/base.py``), the checks of
:class:`~percausal_jax.config.RunConfig`, the "did you mean" hints of unknown keys (:func:`closest_hint`) and the
help listing (:func:`describe`). This module knows nothing of the particular keys and imports neither jax nor
ml_collections at module level, so dataclasses anywhere in the library (the objectives, the featurizer) can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Iterator

from percausal_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Bound:
    """The admissible range of a numeric key: ``low`` / ``high`` (None: unbounded), each inclusive or not."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def expected(self, value) -> str:
        kind = "an integer" if isinstance(value, int) else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '≥'} {self.low:g}"
        return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def check(self, key: str, value) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high or value != value:  # NaN is out of every range
            raise UserError(f"{key}={value!r}: expected {self.expected(value)}")


POSITIVE, NONNEGATIVE, UNIT = Bound(0, low_open=True), Bound(0), Bound(0, 1)


def key(default, help: str, choices: Iterable[str] | None = None, bound: Bound | None = None) -> dataclasses.Field:
    """The field of one config key: its default, and in its metadata its help text and admissible values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                                        "bound": bound})


def like(owner: type, name: str, default, **changes) -> dataclasses.Field:
    """The declaration of ``owner``'s field ``name`` (help, choices, bound; ``changes`` replace some) with another
    default: a key that configures the same setting in another context, declared by the owner of that setting."""
    meta = {**next(f for f in dataclasses.fields(owner) if f.name == name).metadata, **changes}
    return dataclasses.field(default=default, metadata=meta)


def declared(cls_or_obj, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """``(prefix + name, field)`` of each field declared with :func:`key` (others, like computed ones, are not
    config keys)."""
    for f in dataclasses.fields(cls_or_obj):
        if "help" in f.metadata:
            yield prefix + f.name, f


def choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get("choices")


def check_choice(key: str, value, f: dataclasses.Field, where: str = "") -> None:
    allowed = choices(f)
    if allowed and value not in allowed:
        raise UserError(f"{where + ': ' if where else ''}{key}={value!r}: expected one of {', '.join(allowed)}")


def check_bounds(obj, prefix: str = "") -> None:
    """Every declared bound of the dataclass instance ``obj``; errors name the key as ``prefix + field``."""
    for name, f in declared(obj, prefix):
        if f.metadata.get("bound") is not None:
            f.metadata["bound"].check(name, getattr(obj, f.name))


def closest_hint(key: str, candidates: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'prefix+X'?)`` for the candidate closest to a mistyped ``key``, or ``""``."""
    match = difflib.get_close_matches(key, list(candidates), n=1)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def describe(name: str, f: dataclasses.Field) -> str:
    """One line of help: ``name = default (admissible values): help``."""
    allowed, bound = choices(f), f.metadata.get("bound")
    admits = f"one of {' | '.join(allowed)}" if allowed else bound.expected(f.default) if bound else ""
    return f"{name} = {f.default!r}{f' ({admits})' if admits else ''}: {f.metadata['help']}"


def config_dict(items: Iterable[tuple[str, object]]):
    """A ConfigDict from ``(dotted key, value)`` pairs, sections created in the order they first appear."""
    import ml_collections

    root = ml_collections.ConfigDict()
    for dotted, value in items:
        *path, leaf = dotted.split(".")
        node = root
        for part in path:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[leaf] = value
    return root
