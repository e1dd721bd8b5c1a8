"""One record → one :class:`~percausal_jax.data.pairing.PairedExample` (or a counted drop).

Per record kind (:mod:`percausal_jax.data.records`):

* **canonical**: retrieve ``k`` profile items (:func:`retrieval.top_k`), build both prompts
  (:func:`prompts.build_pair`), render them (:func:`chat.render`), and when ``max_prompt_len`` is set fit the
  personal prompt into that many tokens (:func:`retrieval.fit_to_budget`, items dropped or their text truncated
  per ``budget_mode``). With template ``"none"`` both rendered prompts end with ``separator`` (default ``"\\n"``;
  appended unless the prompt already ends with it, as NextQuill's Amazon message does): LaMP/LongLaMP builders end
  with the task input, and without it the response would be glued to it (``...is "Nice".The lamp works well.``).
  The separator is **prompt text**, part of both prompts and counted in their budget, never part of the
  response: the response ids stay the completion's own ids (+ end token), identical after both prompts, and the
  prompt ``eval`` generates from ends where training's prompt ends. ``""`` glues as before.
* **prompt** ``{id, prompt, prompt_no_profile, completion}``: no retrieval. If the record has a ``template`` field
  (``"chat"`` | ``"none"``, written by ``percausal prepare``) its prompts are final text rendered with that template
  and are used as they are, whatever ``FeaturizeConfig.template`` says; otherwise both prompts are user messages
  rendered with ``FeaturizeConfig.template``. Either way their text is kept as it is: no separator is added
  (``prepare`` already wrote it into records built from canonical ones).
* **trl** ``{prompt, completion}``: there is no profile-free prompt, so **the counterfactual prompt is the prompt
  itself**: both passes see the same tokens, every causal (personal − counterfactual) difference is exactly zero and
  only plain fine-tuning terms learn from such data. Conversational prompts (lists of ``{role, content}``) need
  ``template="chat"``; the conversational completion must be one assistant message. No separator is added either
  (TRL's prompt-completion convention: the prompt carries its own).

With ``"chat"``, a system message is merged into the first user turn for templates without a system role
(:func:`chat.render_messages`), and ``enable_thinking`` is passed to the template (Qwen3).

Tokenization (:mod:`pairing`'s contract): the completion is tokenized once without special tokens and an
end token is appended: with template ``"chat"`` the template's own end-of-turn (:func:`chat.end_of_turn`: the text
the template writes after an assistant message, e.g. ``<|eot_id|>``, ``<end_of_turn>``, ``<|im_end|>``; tokenized
once per featurizer; EOS if the template writes nothing there), with ``"none"`` the tokenizer's EOS. So for a chat
example ``prompt_ids + response_ids`` are the ids of ``apply_chat_template([user, assistant], tokenize=True)`` up to
the whitespace the template writes after the end-of-turn token (``"\\n"`` for ChatML and Gemma), which is never
generated, provided the template renders the completion unchanged (Llama-3 and Gemma ``trim`` it: a completion with
surrounding whitespace differs there) and no BPE merge crosses the prompt/response boundary (the contract's
choice). Prompts get the tokenizer's BOS (``add_special_tokens=True``) only with template ``"none"``, since a
chat-rendered prompt already holds its special tokens.

A record with ``personal_spans`` also gets each response token's class, personal or generic (the end token
generic), by the character-overlap rule of :mod:`percausal_jax.evaluation.token_nll`: evaluation splits the NLL
by it; training ignores it.

Examples that cannot be used are *dropped and counted*, not errors: ``prompt_too_long`` (a prompt exceeds
``max_prompt_len`` even with zero profile items; the counterfactual prompt is checked too) and
``response_too_long`` (more than ``max_response_len`` ids including the end token, unless ``truncate_response``:
then the first ``max_response_len`` ids are kept *without* the end token, so the model is never taught to stop
mid-text, and the example is counted in :attr:`FeaturizeStats.truncated_response`). Malformed input still raises
:class:`~percausal_jax.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from percausal_jax.data.chat import TEMPLATES, Template, end_of_turn, render, render_messages
from percausal_jax.data.pairing import PairedExample
from percausal_jax.data.prompts import MODES, Mode, Prompt, build_pair, get_task
from percausal_jax.data.records import detect_kind
from percausal_jax.data.retrieval import METHODS, Contriever, Method, PromptTooLong, fit_to_budget, top_k
from percausal_jax.errors import UserError
from percausal_jax.evaluation.token_nll import response_classes
from percausal_jax.schema import choices, declared, key

BudgetMode = Literal["drop", "truncate"]
BUDGET_MODES: tuple[BudgetMode, ...] = ("drop", "truncate")
DROP_REASONS = ("prompt_too_long", "response_too_long")
LENGTH_KEYS = ("prompt", "prompt_no_profile", "response")


@dataclasses.dataclass(frozen=True)
class FeaturizeConfig:
    """Every knob that turns records into token ids (validated once, here), each declared with its help and choices
    (:func:`~percausal_jax.schema.key`); the training config's ``data.*`` keys share these declarations.

    ``max_prompt_len`` / ``max_response_len`` are token counts (prompt incl. special tokens and separator; response
    incl. its end token); None = unlimited. ``seed`` only seeds the ``random`` retriever. ``separator`` ends both
    prompts of canonical records rendered with template ``"none"`` (see the module doc). The defaults here are the
    library's (template ``"none"``, no length limits, over-long responses dropped); ``configs/base.py`` and
    ``percausal prepare`` train with template ``"chat"``, length limits and ``truncate_response``.
    """

    template: Template = key("none", "none = prompt text as is; chat = the tokenizer's chat template",
                             choices=TEMPLATES)
    counterfactual_mode: Mode = key("drop", "the profile-free prompt: profile dropped, or replaced by a placeholder",
                                    choices=MODES)
    retriever: Method = key("bm25", "how the k profile items are chosen", choices=METHODS)
    k: int = key(4, "profile items retrieved into the personal prompt")
    seed: int = key(0, "seeds the random retriever")
    max_prompt_len: int | None = key(None, "token budget of a prompt (special tokens and separator included)")
    max_response_len: int | None = key(None, "response tokens, its end token included")
    budget_mode: BudgetMode = key("drop", "over the prompt budget: drop profile items, or truncate their text",
                                  choices=BUDGET_MODES)
    truncate_response: bool = key(False, "over max_response_len: keep the first tokens, without the end token "
                                         "(False = drop the example)")
    enable_thinking: bool = key(False, "passed to chat templates (Qwen3: False = the empty think block)")
    separator: str = key("\n", "ends both prompts of canonical records with template none (\"\" = glued)")

    def __post_init__(self):
        for name, f in declared(self):
            if choices(f) and getattr(self, name) not in choices(f):
                raise UserError(f"featurize setting {name}={getattr(self, name)!r}: expected one of "
                                f"{list(choices(f))}")
        if not isinstance(self.separator, str):
            raise UserError(f"featurize setting separator={self.separator!r}: expected a string")
        if self.k < 0:
            raise UserError(f"featurize setting k={self.k}: expected an integer >= 0")
        for name in ("max_prompt_len", "max_response_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"featurize setting {name}={value}: expected an integer >= 1 or None")


@dataclasses.dataclass(frozen=True)
class Texts:
    """The exact texts of one example, before tokenization."""

    prompt: str
    prompt_no_profile: str
    completion: str
    template: Template  # how the prompts were rendered; "chat" text already holds its special tokens
    items_used: int  # profile items in the personal prompt (0 for prompt and TRL records)


@dataclasses.dataclass(frozen=True)
class Kept:
    example: PairedExample
    items_used: int
    truncated: bool = False  # the response was cut to max_response_len (truncate_response), its end token dropped


@dataclasses.dataclass(frozen=True)
class Dropped:
    reason: str  # one of DROP_REASONS


class Featurizer:
    """``featurizer(record) -> Kept | Dropped``; ``texts(record)`` gives the texts only, ``run(record)`` both.

    Stateless after construction but for a cache of the end-token ids (filled idempotently), so one instance may
    serve several threads. ``tokenizer`` may be None for ``texts`` with template ``"none"`` and no
    ``max_prompt_len``. ``contriever`` is required for that retriever on canonical records (prompt records are
    already retrieved; :func:`retrieval.rank` names the missing encoder).
    """

    def __init__(self, tokenizer: Any, cfg: FeaturizeConfig, *, contriever: Contriever | None = None):
        if tokenizer is None and (cfg.template == "chat" or cfg.max_prompt_len is not None):
            raise UserError("a tokenizer is needed for template 'chat' and for a max_prompt_len token budget")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.contriever = contriever
        self._end: dict[str, tuple[int, ...]] = {}  # template -> ids appended to every response (computed once)

    def texts(self, record: dict) -> Texts:
        """Retrieval, prompt building, rendering and prompt budget; raises PromptTooLong if nothing fits."""
        return self._texts(record, self._encoder())

    def __call__(self, record: dict) -> Kept | Dropped:
        return self.run(record)[1]

    def run(self, record: dict) -> tuple[Texts | None, Kept | Dropped]:
        """The texts (None if no prompt fits the budget) and the tokenized result."""
        if self.tokenizer is None:
            raise UserError("featurizing needs a tokenizer")
        encode = self._encoder()
        try:
            texts = self._texts(record, encode)
        except PromptTooLong:
            return None, Dropped("prompt_too_long")
        return texts, self._tokenize(record, texts, encode)

    def _tokenize(self, record: dict, texts: Texts, encode: Callable[[str, bool], list[int]]) -> Kept | Dropped:
        add_special = texts.template == "none"
        prompt = encode(texts.prompt, add_special)
        prompt_no_profile = encode(texts.prompt_no_profile, add_special)
        limit = self.cfg.max_prompt_len
        if limit is not None and max(len(prompt), len(prompt_no_profile)) > limit:
            return Dropped("prompt_too_long")
        text_ids = encode(texts.completion, False)
        response = text_ids + list(self.response_end(texts.template))
        limit = self.cfg.max_response_len
        truncated = limit is not None and len(response) > limit
        if truncated:
            if not self.cfg.truncate_response:
                return Dropped("response_too_long")
            response = response[:limit]
        if not prompt or not prompt_no_profile:
            raise UserError(f"record {_name(record)}: a prompt tokenizes to zero tokens, but the first response "
                            "token must be predicted from at least one; use template 'chat' or a tokenizer that "
                            "adds a BOS token")
        classes = response_classes(self.tokenizer, texts.completion, text_ids, len(response),
                                   record.get("personal_spans") if detect_kind(record) != "trl" else None)
        return Kept(PairedExample(tuple(prompt), tuple(prompt_no_profile), tuple(response), classes),
                    texts.items_used, truncated)

    def response_end(self, template: Template) -> tuple[int, ...]:
        """The ids appended to every response of prompts rendered with ``template``: the chat template's
        end-of-turn (:func:`chat.end_of_turn`) for ``"chat"``, EOS for ``"none"`` (and for a chat template that
        writes nothing after an assistant message). Tokenized once per featurizer and template."""
        if template not in self._end:
            tok = self.tokenizer
            text = end_of_turn(tok, self.cfg.enable_thinking) if template == "chat" else ""
            ids = tuple(tok(text, add_special_tokens=False)["input_ids"]) if text else ()
            if not ids:
                if tok.eos_token_id is None:
                    raise UserError("featurizing needs a tokenizer with an eos_token_id"
                                    + (" (its chat template writes nothing after an assistant message)"
                                       if template == "chat" else ""))
                ids = (tok.eos_token_id,)
            self._end[template] = ids
        return self._end[template]

    # ------------------------------------------------------------------------------------------------- internals

    def _encoder(self) -> Callable[[str, bool], list[int]]:
        """A per-call memoized ``encode(text, add_special_tokens)`` (budget fitting re-measures the same texts)."""
        cache: dict[tuple[str, bool], list[int]] = {}

        def encode(text: str, add_special: bool) -> list[int]:
            key = (text, add_special)
            if key not in cache:
                cache[key] = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
            return cache[key]

        return encode

    def _texts(self, record: dict, encode: Callable[[str, bool], list[int]]) -> Texts:
        kind = detect_kind(record)
        if kind == "canonical":
            return self._canonical(record, encode)
        if kind == "prompt":
            template = record.get("template")
            if template is None:
                return Texts(self._render(record["prompt"]), self._render(record["prompt_no_profile"]),
                             record["completion"], self.cfg.template, 0)
            if template not in TEMPLATES:
                raise UserError(f"record {_name(record)}: field 'template': expected one of {list(TEMPLATES)} "
                                f"(how the prompts were rendered), got {template!r}")
            return Texts(record["prompt"], record["prompt_no_profile"], record["completion"], template, 0)
        prompt = self._trl_prompt(record)
        return Texts(prompt, prompt, self._trl_completion(record), self.cfg.template, 0)

    def _canonical(self, record: dict, encode: Callable[[str, bool], list[int]]) -> Texts:
        cfg = self.cfg
        if "output" not in record:
            raise UserError(f"record {_name(record)}: field 'output': missing; featurizing needs the target text")
        items = top_k(record, cfg.k, cfg.retriever, seed=cfg.seed, contriever=self.contriever)
        counterfactual = self._prompt_text(build_pair(record, [], cfg.counterfactual_mode).counterfactual)

        def personal(kept: list[dict]) -> str:
            return self._prompt_text(build_pair(record, kept, cfg.counterfactual_mode).personal)

        if cfg.max_prompt_len is None:
            prompt, kept = personal(items), items
        else:
            add_special = cfg.template == "none"
            prompt, kept = fit_to_budget(personal, items, lambda text: len(encode(text, add_special)),
                                         cfg.max_prompt_len, cfg.budget_mode, get_task(record).text_field)
        return Texts(prompt, counterfactual, record["output"], cfg.template, len(kept))

    def _prompt_text(self, prompt: Prompt) -> str:
        """A canonical record's rendered prompt; with template "none" it ends with the separator (module doc)."""
        text = self._render(prompt)
        sep = self.cfg.separator
        if self.cfg.template == "none" and sep and not text.endswith(sep):
            text += sep
        return text

    def _render(self, prompt: Prompt | str) -> str:
        if isinstance(prompt, str):
            prompt = Prompt(None, prompt)
        return render(self.tokenizer, prompt, self.cfg.template, self.cfg.enable_thinking)

    def _trl_prompt(self, record: dict) -> str:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return self._render(prompt)
        if self.cfg.template != "chat":
            raise UserError(f"record {_name(record)}: field 'prompt': a conversational prompt (list of messages) "
                            "needs template 'chat'")
        return render_messages(self.tokenizer, prompt, self.cfg.enable_thinking)

    @staticmethod
    def _trl_completion(record: dict) -> str:
        completion = record["completion"]
        if isinstance(completion, str):
            return completion
        if len(completion) != 1 or completion[0].get("role") != "assistant":
            raise UserError(f"record {_name(record)}: field 'completion': expected exactly one assistant message, "
                            f"got roles {[m.get('role') for m in completion]}")
        return completion[0]["content"]


def _name(record: dict) -> str:
    """How errors name a record: its id, or the start of its prompt (TRL rows have no id)."""
    if "id" in record:
        return repr(record["id"])
    return f"with prompt {str(record.get('prompt'))[:40]!r}"


# ---------------------------------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class FeaturizeStats:
    """Running counts over featurized examples; JSON round-trips through :meth:`to_json` / :meth:`from_json`.

    Lengths are token counts of the prompt, the profile-free prompt and the response (with its end token).
    ``truncated_response`` counts kept examples whose response was cut to ``max_response_len`` (``truncate_response``).
    """

    kept: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    items_used: dict[int, int] = dataclasses.field(default_factory=dict)  # items in the prompt -> examples
    length_sum: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(LENGTH_KEYS, 0))
    length_max: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(LENGTH_KEYS, 0))
    truncated_response: int = 0

    def add(self, result: Kept | Dropped) -> None:
        if isinstance(result, Dropped):
            self.dropped[result.reason] += 1
            return
        ex = result.example
        self.kept += 1
        self.truncated_response += int(result.truncated)
        self.items_used[result.items_used] = self.items_used.get(result.items_used, 0) + 1
        for key, ids in zip(LENGTH_KEYS, (ex.prompt_ids, ex.prompt_no_profile_ids, ex.response_ids)):
            self.length_sum[key] += len(ids)
            self.length_max[key] = max(self.length_max[key], len(ids))

    def merged(self, other: FeaturizeStats) -> FeaturizeStats:
        """The counts of both (e.g. of several row blocks); maxima are maxima."""
        add = lambda a, b: {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}  # noqa: E731
        return FeaturizeStats(self.kept + other.kept, add(self.dropped, other.dropped),
                              add(self.items_used, other.items_used), add(self.length_sum, other.length_sum),
                              {k: max(self.length_max[k], other.length_max[k]) for k in self.length_max},
                              self.truncated_response + other.truncated_response)

    def summary(self) -> dict:
        """Plain numbers for logging: kept, dropped by reason, truncated responses, mean/max lengths, items-used
        histogram and mean."""
        n = max(self.kept, 1)
        return {"kept": self.kept, "dropped": dict(self.dropped), "dropped_total": sum(self.dropped.values()),
                "truncated_response": self.truncated_response,
                "mean_len": {k: v / n for k, v in self.length_sum.items()}, "max_len": dict(self.length_max),
                "items_used": dict(sorted(self.items_used.items())),
                "mean_items_used": sum(k * v for k, v in self.items_used.items()) / n}

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "items_used": {str(k): v for k, v in self.items_used.items()}}

    @classmethod
    def from_json(cls, state: dict) -> FeaturizeStats:
        return cls(state["kept"], dict(state["dropped"]), {int(k): v for k, v in state["items_used"].items()},
                   dict(state["length_sum"]), dict(state["length_max"]),
                   state.get("truncated_response", 0))  # absent in iterator states saved before it existed
