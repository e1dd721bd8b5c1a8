"""Static batch shapes: length buckets (one example per row, padded to the smallest boundary that fits) and packed
row capacities (several examples per row, one shape). Both are derived from the featurize settings' length limits,
and every admissible example must fit the largest shape (:func:`check_packing` names the ``data.*`` key)."""

from __future__ import annotations

import dataclasses
import math

from percausal_jax.data.featurize import FeaturizeConfig
from percausal_jax.errors import UserError

ARRAYS = ("personal", "counterfactual", "response")


def boundaries(max_len: int, multiple: int) -> tuple[int, ...]:
    """``(multiple, 2·multiple, ...)`` up to the first multiple ≥ ``max_len``."""
    return tuple(range(multiple, math.ceil(max_len / multiple) * multiple + 1, multiple))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Allowed padded lengths per array, ascending; the largest is also the derived packing row capacity."""

    personal: tuple[int, ...]
    counterfactual: tuple[int, ...]
    response: tuple[int, ...]

    @classmethod
    def multiples(cls, fcfg: FeaturizeConfig, multiple: int) -> Buckets:
        """Multiples of ``multiple`` up to the longest example ``fcfg`` admits (prompt + response − 1)."""
        p, r = _maxima(fcfg)
        return cls(boundaries(p + r - 1, multiple), boundaries(p + r - 1, multiple), boundaries(r, multiple))

    def check(self, fcfg: FeaturizeConfig) -> None:
        """Every admissible example must fit the largest boundaries."""
        p, r = _maxima(fcfg)
        for name, bounds, need in zip(ARRAYS, (self.personal, self.counterfactual, self.response),
                                      (p + r - 1, p + r - 1, r)):
            if not bounds or list(bounds) != sorted(set(bounds)) or bounds[0] < 1:
                raise UserError(f"{name} bucket boundaries {bounds}: expected ascending positive integers")
            if bounds[-1] < need:
                raise UserError(f"{name} bucket boundaries {bounds}: the largest must be >= {need}, the longest "
                                "example allowed by max_prompt_len and max_response_len")

    def fit(self, lengths: tuple[int, int, int]) -> tuple[int, int, int]:
        """The smallest boundaries holding ``(personal, counterfactual, response)`` lengths."""
        return tuple(next(b for b in bounds if b >= n)  # type: ignore[return-value]
                     for bounds, n in zip((self.personal, self.counterfactual, self.response), lengths))

    @property
    def capacity(self) -> tuple[int, int, int]:
        return self.personal[-1], self.counterfactual[-1], self.response[-1]


DEFAULT_LOOKAHEAD = 64
PACK_KEYS = ("data.pack_personal_len", "data.pack_counterfactual_len", "data.pack_response_len")


@dataclasses.dataclass(frozen=True)
class Packing:
    """Packed rows: the capacity of one row per array (every packed batch has exactly this shape) and the number of
    examples kept pending for first-fit-decreasing placement (0 = first fit in reading order)."""

    personal: int
    counterfactual: int
    response: int
    lookahead: int = DEFAULT_LOOKAHEAD

    @property
    def capacity(self) -> tuple[int, int, int]:
        return self.personal, self.counterfactual, self.response

    @classmethod
    def derive(cls, fcfg: FeaturizeConfig, buckets: Buckets, personal: int = 0, counterfactual: int = 0,
               response: int = 0, lookahead: int = DEFAULT_LOOKAHEAD) -> Packing:
        """The given capacities (checked by :func:`check_packing`), each 0 replaced by the largest bucket
        boundary of its array (the longest admissible example, rounded up to the bucket multiple)."""
        p, r = _maxima(fcfg)
        check_packing(p, r, personal, counterfactual, response, lookahead)
        given = (personal, counterfactual, response)
        return cls(*(n or derived for n, derived in zip(given, buckets.capacity)), lookahead=lookahead)


def check_packing(max_prompt_len: int, max_response_len: int, personal: int = 0, counterfactual: int = 0,
                  response: int = 0, lookahead: int = 0) -> None:
    """Each packed row capacity must be 0 (derived) or hold the longest example the length limits admit:
    ``max_prompt_len + max_response_len − 1`` tokens for both sequences (a profile-free prompt may be as long as
    ``max_prompt_len``), ``max_response_len`` response slots. UserErrors name the ``data.*`` key."""
    needs = (max_prompt_len + max_response_len - 1,) * 2 + (max_response_len,)
    for key, value, need in zip(PACK_KEYS, (personal, counterfactual, response), needs):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{key}={value!r}: expected 0 (derive from the length limits) or an integer >= {need}")
        if 0 < value < need:
            raise UserError(f"{key}={value}: a packed row must hold the longest admissible example, {need} tokens "
                            f"(data.max_prompt_len={max_prompt_len}, data.max_response_len={max_response_len}); "
                            f"set it to 0 (derive) or >= {need}")
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 0:
        raise UserError(f"data.pack_lookahead={lookahead!r}: expected an integer >= 0 (0 = no lookahead)")


def _maxima(fcfg: FeaturizeConfig) -> tuple[int, int]:
    if fcfg.max_prompt_len is None or fcfg.max_response_len is None:
        raise UserError("the pipeline pads to static shapes: set max_prompt_len and max_response_len in the "
                        "featurize settings")
    return fcfg.max_prompt_len, fcfg.max_response_len
