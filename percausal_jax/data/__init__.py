"""Data front end: read records, retrieve profile items, build personal/counterfactual prompts, render them.

Importing the package also registers the ``synthetic`` task (percausal_jax.data.synthetic) in ``prompts.TASKS``.
"""

from percausal_jax.data import synthetic as _synthetic  # noqa: F401  (registers TASKS["synthetic"])
from percausal_jax.data.chat import render
from percausal_jax.data.files import write_jsonl
from percausal_jax.data.prompts import TASKS, Prompt, PromptPair, build_pair
from percausal_jax.data.records import detect_kind, read_records
from percausal_jax.data.retrieval import Contriever, PromptTooLong, fit_to_budget, top_k

__all__ = [
    "TASKS", "Contriever", "Prompt", "PromptPair", "PromptTooLong", "build_pair", "detect_kind", "fit_to_budget",
    "read_records", "render", "top_k", "write_jsonl",
]
