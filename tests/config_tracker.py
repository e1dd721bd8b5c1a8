"""Which config keys does a run actually use? ``with track() as reads:`` records every read of a field of the typed
config (:class:`~percausal_jax.config.RunConfig`, its sections, the objective dataclasses) as the dotted key of
``configs/base.py`` it came from (``data.k``, ``objective.perce.clip_min``). Reads made while the config is being
read, validated or copied (``RunConfig.from_config`` / ``validate``, ``dataclasses.replace``) do not count: a key is
used when code below the spine reads its field."""

from __future__ import annotations

import contextlib
import dataclasses

import ml_collections

from percausal_jax import config
from percausal_jax.objectives import OBJECTIVES


def leaf_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out |= leaf_keys(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def _keys() -> dict[type, dict[str, str]]:
    """class → {field: dotted config key}."""
    out = {spec: {f.name: f"{section}.{f.name}" for f in dataclasses.fields(spec)}
           for section, spec in config.SECTIONS.items()}
    out.update({cls: {f.name: f"objective.{name}.{f.name}" for f in dataclasses.fields(cls)}
                for name, cls in OBJECTIVES.items()})
    out[config.RunConfig] = {"seed": "seed", "vocab_chunk_size": "objective.vocab_chunk_size",
                             "objective": "objective.name"}
    return out


@contextlib.contextmanager
def track():
    keys = _keys()
    reads: set[str] = set()
    suspended = [0]
    patched = []

    def reader(cls):
        fields = keys[cls]
        original = cls.__getattribute__

        def getattribute(self, name):
            if not suspended[0] and name in fields and type(self) is cls:
                reads.add(fields[name])
            return original(self, name)

        return original, getattribute

    def quiet(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            suspended[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                suspended[0] -= 1

        return original, wrapper

    for cls in keys:
        original, fn = reader(cls)
        patched.append((cls, "__getattribute__", original))
        cls.__getattribute__ = fn
    for owner, name in ((dataclasses, "replace"), (config.RunConfig, "validate"), (config.RunConfig, "from_config")):
        _, fn = quiet(owner, name)
        patched.append((owner, name, vars(owner)[name]))  # the raw attribute (a classmethod stays one)
        setattr(owner, name, fn)
    try:
        yield reads
    finally:
        for owner, name, original in reversed(patched):
            if name == "__getattribute__" and original is object.__getattribute__:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
