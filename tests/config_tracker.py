"""Which config keys does a run actually read? ``with track(cfg) as reads:`` records every leaf key read through
``ConfigDict.__getitem__`` (which attribute access and ``get`` go through) on ``cfg`` and its sub-dicts, as dotted
paths. Whole-config dumps (``to_json_best_effort``, ``to_dict``: the checkpoint metadata) are not reads."""

from __future__ import annotations

import contextlib

import ml_collections


def leaf_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out |= leaf_keys(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def _paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[int, str]:
    out = {id(cfg): prefix}
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_paths(v, f"{prefix}{k}."))
    return out


@contextlib.contextmanager
def track(cfg: ml_collections.ConfigDict):
    cls = ml_collections.ConfigDict
    paths = _paths(cfg)
    reads: set[str] = set()
    suspended = [0]
    original = {name: getattr(cls, name) for name in ("__getitem__", "to_json_best_effort", "to_dict")}

    def getitem(self, key):
        value = original["__getitem__"](self, key)
        if not suspended[0] and id(self) in paths and not isinstance(value, cls):
            reads.add(paths[id(self)] + str(key))
        return value

    def dump(name):
        def wrapper(self, *args, **kwargs):
            suspended[0] += 1
            try:
                return original[name](self, *args, **kwargs)
            finally:
                suspended[0] -= 1
        return wrapper

    cls.__getitem__ = getitem
    cls.to_json_best_effort = dump("to_json_best_effort")
    cls.to_dict = dump("to_dict")
    try:
        yield reads
    finally:
        for name, fn in original.items():
            setattr(cls, name, fn)
