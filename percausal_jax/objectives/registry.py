"""The registry of objectives and the one place an objective's name (and its config block) is read.

``objective`` block of a training config (``configs/base.py``)::

    objective.name              one of OBJECTIVES
    objective.vocab_chunk_size  vocabulary chunk of the log-softmax head (read by the run spine)
    objective.<name>.<field>    the hyper-parameters of each method (fields of its dataclass)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from percausal_jax.errors import UserError
from percausal_jax.objectives.losses import CE, EntCE, LossCE, NextQuill, Objective, PerCE
from percausal_jax.schema import NONNEGATIVE, closest_hint, config_dict, declared, key

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CE, PerCE, NextQuill, LossCE, EntCE)}


@dataclasses.dataclass(frozen=True)
class Block:
    """The declarations of the objective block's own keys (beside one block of hyper-parameters per method)."""

    name: str = key("perce", "the method trained; each method's block holds its hyper-parameters",
                    choices=OBJECTIVES)
    vocab_chunk_size: int = key(8192, "vocabulary chunk of the log-softmax head (read by the run spine)",
                                bound=NONNEGATIVE)


BLOCK_KEYS = tuple(f.name for f in dataclasses.fields(Block))


def get(name: str, where: str = "objective") -> type[Objective]:
    if not isinstance(name, str) or name not in OBJECTIVES:
        hint = closest_hint(name, OBJECTIVES) if isinstance(name, str) else ""
        raise UserError(f"{where}.name={name!r}: unknown objective{hint} (choose from {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def fields(cls: type[Objective]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build(name: str, params: Mapping, where: str = "objective") -> Objective:
    """``OBJECTIVES[name](**params)`` with every key checked (unknown keys and wrong types name the key)."""
    cls = get(name, where)
    if not hasattr(params, "items"):  # a dict or a ConfigDict
        raise UserError(f"{where}.{name}: expected a block of {name}'s hyper-parameters, got {params!r}")
    known = fields(cls)
    kwargs = {}
    for key, value in params.items():
        if key not in known:
            raise UserError(f"{where}.{name}.{key}: unknown hyper-parameter of {name}{closest_hint(key, known)} "
                            f"(has {', '.join(known)})")
        default = known[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise UserError(f"{where}.{name}.{key}={value!r}: expected a {type(default).__name__}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as e:  # a combination of values the method refuses
        raise UserError(f"{where}.{name}: {e}") from None


def from_config(block: Mapping, where: str = "objective") -> Objective:
    """The objective named by ``block["name"]`` with its hyper-parameters from ``block[name]``; every method's
    block is checked, so a typo in any of them is an error, not a silently ignored key."""
    for key in block:
        if key not in BLOCK_KEYS and key not in OBJECTIVES:
            raise UserError(f"{where}.{key}: unknown key{closest_hint(key, [*BLOCK_KEYS, *OBJECTIVES])} "
                            f"(an objective block has {', '.join(BLOCK_KEYS)} and one block per method: "
                            f"{', '.join(OBJECTIVES)})")
    if "name" not in block:
        raise UserError(f"{where}.name: missing (one of {', '.join(OBJECTIVES)})")
    built = {name: build(name, block[name], where) for name in OBJECTIVES if name in block}
    name = block["name"]
    return built.get(name) or build(name, {}, where)


def declarations(prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every key of the objective block, dotted under ``prefix``, with its declaring field: the block's own keys,
    then each method's hyper-parameters."""
    return [*declared(Block, prefix), *(item for name, cls in OBJECTIVES.items()
                                        for item in declared(cls, f"{prefix}{name}."))]


def default_config():
    """The ``objective`` block of ``configs/base.py``: the declared defaults (an ml_collections ConfigDict)."""
    return config_dict((name, f.default) for name, f in declarations())
