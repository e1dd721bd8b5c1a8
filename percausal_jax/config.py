"""Loading ml-collections configs from a file plus ``--config.a.b=value`` overrides, with clear errors."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import ml_collections

from percausal_jax.errors import UserError


def load_config(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Imports ``path`` (a Python file with ``get_config()``; ``file.py:arg`` calls ``get_config("arg")``) and
    applies ``a.b=value`` overrides (typed like the existing value; unknown keys are an error)."""
    path, _, arg = str(path).partition(":")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    root = str(p.resolve().parent.parent)  # so `from configs.base import ...` works from the repository
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location(f"_percausal_config_{p.stem}", p)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: no get_config() function")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}:{arg}: {e}") from None
    for item in overrides:
        apply_override(cfg, item, source=path)
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, item: str, source: str = "") -> str:
    """Sets ``a.b=value`` in ``cfg`` (typed like the existing value); returns the dotted key ``a.b``."""
    if "=" not in item:
        raise UserError(f"override {item!r}: expected --config.key=value")
    key, raw = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise UserError(f"override {item!r}: {source} has no config section '{part}'")
        node = node[part]
    if parts[-1] not in node:
        raise UserError(f"override {item!r}: unknown key '{key}' (not in {source})")
    old = node[parts[-1]]
    node[parts[-1]] = _parse(raw, old, key)
    return key


def _parse(raw: str, old, key: str):
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(old, int):
            return int(raw)
        if isinstance(old, float):
            return float(raw)
        if isinstance(old, (tuple, list)):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if old is None:
            try:
                return ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return raw
        return raw
    except ValueError:
        raise UserError(f"--config.{key}={raw}: expected a {type(old).__name__}") from None
