"""Prompt builders: canonical record + chosen profile items → a personal and a counterfactual prompt.

Each task in :data:`TASKS` knows how to write the personalized prompt from the items it is given (already
retrieved and ranked, best first), how to write the profile-free *counterfactual* prompt, and which text retrieval
should compare (``document(item)`` against ``query(record)``). :func:`build_pair` is the entry point.

Counterfactual modes (a setting, not a per-task choice):

* ``"drop"``: the profile block is removed. For LaMP/LongLaMP that leaves exactly the task ``input``.
* ``"placeholder"``: the block keeps its header/connectors and the items are replaced by the literal ``None``, as
  NextQuill does (``[User's Past Reviews]:\\nNone\\n``). LaMP/LongLaMP have no header, so there the joined item list
  is replaced by ``None`` (``None. Following the given patterns {input}``): our extension, not from those papers.

A personal prompt with no items (everything retrieved was dropped to fit the budget) is the counterfactual prompt.

Templates are reimplemented from data.md §1.1/§2/§3 (the reference code is CC-BY-NC-SA; nothing is copied). Item
strings keep the reference's trailing spaces and ``", and "`` joins, so ``'... "text" , and "..." . Following'`` is
intended. Builders return plain text; applying a chat template is :func:`percausal_jax.data.chat.render`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from percausal_jax.errors import UserError

Mode = Literal["drop", "placeholder"]
MODES: tuple[Mode, ...] = ("drop", "placeholder")
PLACEHOLDER = "None"


@dataclass(frozen=True)
class Prompt:
    """One side's prompt text: an optional system message and the user message."""

    system: str | None
    user: str


@dataclass(frozen=True)
class PromptPair:
    """The with-profile prompt and the profile-free prompt; both are followed by the same target tokens."""

    personal: Prompt
    counterfactual: Prompt


@dataclass(frozen=True)
class Task:
    """Everything task-specific about prompting and retrieval.

    ``text_field`` is the long item field that budget fitting may shorten (the one the reference code truncates).
    """

    personal: Callable[[dict, list[dict]], Prompt]
    counterfactual: Callable[[dict, Mode], Prompt]
    document: Callable[[dict], str]
    query: Callable[[dict], str]
    text_field: str


def build_pair(record: dict, items: list[dict], mode: Mode = "drop") -> PromptPair:
    """Builds both prompts for a canonical record from the given (ranked) profile items."""
    if mode not in MODES:
        raise UserError(f"counterfactual mode {mode!r}: expected one of {list(MODES)}")
    task = get_task(record)
    counterfactual = task.counterfactual(record, mode)
    return PromptPair(task.personal(record, items) if items else counterfactual, counterfactual)


def get_task(record: dict) -> Task:
    """The registered :class:`Task` for ``record["task"]``; a UserError naming the record if there is none."""
    name = record.get("task")
    if name not in TASKS:
        raise UserError(f"record {record.get('id')!r}: field 'task': unknown task {name!r}; "
                        f"expected one of {sorted(TASKS)}")
    return TASKS[name]


# ------------------------------------------------------------------------------------------------ LaMP and LongLaMP


def _joined_task(item: Callable[[dict], str], template: str, document: Callable[[dict], str],
                query: Callable[[dict], str], text_field: str) -> Task:
    """A task whose prompt is ``template`` with ``{profile}`` = items joined by ``", and "`` and ``{input}``."""

    def personal(record: dict, items: list[dict]) -> Prompt:
        return Prompt(None, template.format(profile=", and ".join(map(item, items)), input=record["input"]))

    def counterfactual(record: dict, mode: Mode) -> Prompt:
        if mode == "drop":
            return Prompt(None, record["input"])
        return Prompt(None, template.format(profile=PLACEHOLDER, input=record["input"]))

    return Task(personal, counterfactual, document, query, text_field)


def _after(marker: str) -> Callable[[dict], str]:
    """Query = the input text after the first ``marker`` (the whole input if the marker is absent)."""

    def query(record: dict) -> str:
        text = record["input"]
        at = text.find(marker)
        return text if at < 0 else text[at + len(marker):].strip()

    return query


def _whole_input(record: dict) -> str:
    return record["input"]


def _fields(*names: str) -> Callable[[dict], str]:
    """Document = the named item fields joined by single spaces."""
    return lambda item: " ".join(str(item[name]) for name in names)


def _first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def _lamp1_insert(record: dict, block: str) -> str:
    """LaMP-1 puts the profile right after the first word ``title`` of the input (reference behaviour)."""
    text = record["input"]
    at = text.find("title")
    return text if at < 0 else f"{text[:at + 5]}, and {block}{text[at + 5:]}"


def _lamp1_personal(record: dict, items: list[dict]) -> Prompt:
    return Prompt(None, _lamp1_insert(record, ", and ".join(f'"{p["title"]}"' for p in items)))


def _lamp1_counterfactual(record: dict, mode: Mode) -> Prompt:
    return Prompt(None, record["input"] if mode == "drop" else _lamp1_insert(record, PLACEHOLDER))


def _lamp1_query(record: dict) -> str:
    """The two candidate references: quoted strings 2 and 3 of the input (whole input if they are missing)."""
    quoted = re.findall(r'"(.*?)"', record["input"], flags=re.DOTALL)
    return f"{quoted[1]} {quoted[2]}" if len(quoted) >= 3 else record["input"]


# ----------------------------------------------------------------------------------- Amazon reviews (NextQuill)

AMAZON_SYSTEM = (
    "Given the title and description of an item, along with the user's past reviews and the output review rating "
    "and review title, generate a personalized item review for the user.\n"
)


def _rating(value: str | int | float) -> str:
    """Ratings print as floats (``5.0``), as in the DPL data."""
    return value if isinstance(value, str) else str(float(value))


def _amazon_message(record: dict, history: str) -> str:
    """User message; whitespace follows NextQuill's personal_dataset.py (trailing newline included)."""
    target = record["target"]
    return (f"[Item Title]: {target['item_title']}\n"
            f"[Item Description]: {target['item_description']}\n"
            f"{history}"
            f"[Output Review Rating]: {_rating(target['rating'])}\n"
            f"[Output Review Title]: {target['title']}\n")


def _amazon_personal(record: dict, items: list[dict]) -> Prompt:
    blocks = "".join(
        f"[Review {i}]:\n"
        f"- [Item Title]: {p['item_title']}\n"
        f"- [Item Description]: {p['item_description']}\n"
        f"- [Review Rating]: {_rating(p['rating'])}\n"
        f"- [Review Title]: {p['title']}\n"
        f"- [Review Text]: {p['text']}\n"
        for i, p in enumerate(items, start=1)
    )
    return Prompt(AMAZON_SYSTEM, _amazon_message(record, f"[User's Past Reviews]:\n{blocks}\n"))


def _amazon_counterfactual(record: dict, mode: Mode) -> Prompt:
    history = "" if mode == "drop" else f"[User's Past Reviews]:\n{PLACEHOLDER}\n"
    return Prompt(AMAZON_SYSTEM, _amazon_message(record, history))


def _amazon_query(record: dict) -> str:
    return f"{record['target']['item_title']} {record['target']['item_description']}"


# ---------------------------------------------------------------------------------------------------- the registry

_FOLLOW = "{profile}. Following the given patterns {input}"

# Keys must match records.TASK_SCHEMAS (a test checks it); "synthetic" is added by percausal_jax.data.synthetic.
TASKS: dict[str, Task] = {
    # LongLaMP (data.md §1.1; HF field names, topic profile summary/content = the reference's input/output)
    "product_review": _joined_task(
        lambda p: (f'"{p["overall"]}" is a rating for the product with description "{p["description"]}". '
                   f'"{p["summary"]}" is summary for "{p["reviewText"]}" '),
        _FOLLOW, _fields("overall", "summary", "description", "reviewText"), _whole_input, "reviewText"),
    "abstract_generation": _joined_task(
        lambda p: f'"{_first_words(p["abstract"], 750)}" is the abstract for the title "{p["title"]}"',
        "{profile}. Use the above abstracts as context to understand the style and language of the user and, "
        "{input}",
        _fields("title", "abstract"), _after("items:"), "abstract"),
    "topic_writing": _joined_task(
        lambda p: f'"{p["summary"]}" is a summary for "{p["content"]}" ',
        "{profile}. Following the given patterns, {input}",
        _fields("summary", "content"), _whole_input, "content"),
    # LaMP (data.md §2)
    "LaMP-1": Task(_lamp1_personal, _lamp1_counterfactual, _fields("title", "abstract"), _lamp1_query, "title"),
    "LaMP-2": _joined_task(lambda p: f'the tag for the movie: "{p["description"]}" is "{p["tag"]}" ',
                          "{profile}. {input}", _fields("description"), _after("description:"), "description"),
    "LaMP-3": _joined_task(lambda p: f'{p["score"]} is the score for "{p["text"]}" ',
                          "{profile}. {input}", _fields("text"), _after("review:"), "text"),
    "LaMP-4": _joined_task(lambda p: f'"{p["title"]}" is the title for "{p["text"]}" ',
                          "{profile}. {input}", _fields("title", "text"), _after("article:"), "text"),
    "LaMP-5": _joined_task(lambda p: f'"{p["title"]}" is a title for "{p["abstract"]}" ',
                          _FOLLOW, _fields("title", "abstract"), _after(":"), "abstract"),
    "LaMP-6": _joined_task(lambda p: f'"{p["title"]}" is the title for "{p["text"]}" ',
                          "{profile}. {input}", _fields("text"), _after(":"), "text"),
    "LaMP-7": _joined_task(lambda p: f'"{p["text"]}" ',
                          "{profile} are written by a person. Following the given patterns {input}",
                          _fields("text"), _after(":"), "text"),
    # Amazon reviews as NextQuill prompts them (data.md §3, nextquill.md §4); retrieval is recency, k = 8
    "amazon_review": Task(_amazon_personal, _amazon_counterfactual,
                          _fields("item_title", "item_description", "rating", "title", "text"), _amazon_query,
                          "text"),
}
