"""Turning a :class:`~percausal_jax.data.prompts.Prompt` into the exact text the model sees, and the text that closes
the model's turn.

Builders produce plain text; this step decides the wrapping, once, for both passes:

* ``"chat"``: the tokenizer's own chat template (system message if any, then the user message, then the
  assistant header via ``add_generation_prompt=True``). ``enable_thinking`` is passed through: Qwen3 templates use
  it (False = the empty think block that disables reasoning); templates that do not mention it ignore it.
  Templates without a system role (Gemma 1/2 raise "System role not supported") get the system text merged into
  the first user message as ``system + "\\n\\n" + user``, which is what Gemma 3's template does itself
  (:func:`supports_system`).
* ``"none"``: raw text, ``system + "\\n" + user`` or just ``user`` (base models, LaMP/LongLaMP-style training). The
  prompt/response separator (``FeaturizeConfig.separator``) is the featurizer's business, not this module's.

The target is appended by the caller after this text, followed by :func:`end_of_turn` with ``"chat"`` (the
template's own end-of-turn text, e.g. ``<|eot_id|>``, ``<end_of_turn>``, ``<|im_end|>``) or EOS with ``"none"``.
"""

from __future__ import annotations

from typing import Any, Literal

from percausal_jax.data.prompts import Prompt
from percausal_jax.errors import UserError

Template = Literal["chat", "none"]
TEMPLATES: tuple[Template, ...] = ("chat", "none")

# an assistant message no template produces by itself; what follows it in the rendering closes the turn
_PROBE = "PERCAUSAL_RESPONSE_PROBE"
_SYSTEM_SUPPORT: dict[str, bool] = {}  # chat template text -> whether it renders a system message


def render(tokenizer: Any, prompt: Prompt, template: Template, enable_thinking: bool = False) -> str:
    """The prompt text for one pass; ``tokenizer`` is only used (and may be None) for ``"chat"``."""
    if template == "none":
        return prompt.user if prompt.system is None else f"{prompt.system}\n{prompt.user}"
    if template != "chat":
        raise UserError(f"prompt template {template!r}: expected one of {list(TEMPLATES)}")
    messages = [{"role": "user", "content": prompt.user}]
    if prompt.system is not None:
        messages.insert(0, {"role": "system", "content": prompt.system})
    return render_messages(tokenizer, messages, enable_thinking)


def render_messages(tokenizer: Any, messages: list[dict], enable_thinking: bool = False) -> str:
    """``apply_chat_template(messages, add_generation_prompt=True)`` as text; a leading system message is merged
    into the first user message (``system + "\\n\\n" + user``) when the template has no system role."""
    _check_template(tokenizer)
    if messages and messages[0].get("role") == "system" and not supports_system(tokenizer):
        messages = _merge_system(messages)
    return _apply(tokenizer, messages, add_generation_prompt=True, enable_thinking=enable_thinking)


def supports_system(tokenizer: Any) -> bool:
    """Whether the chat template renders a system message: it is tried once per template text, and a template error
    (Gemma 1/2: ``raise_exception('System role not supported')``) means it does not."""
    import jinja2

    key = str(tokenizer.chat_template)
    if key not in _SYSTEM_SUPPORT:
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                          tokenize=False, add_generation_prompt=True)
            _SYSTEM_SUPPORT[key] = True
        except jinja2.exceptions.TemplateError:
            _SYSTEM_SUPPORT[key] = False
    return _SYSTEM_SUPPORT[key]


def end_of_turn(tokenizer: Any, enable_thinking: bool = False) -> str:
    """The text the chat template writes right after an assistant message's content, trailing whitespace removed:
    ``<|eot_id|>`` (Llama-3), ``<end_of_turn>`` (Gemma), ``<|im_end|>`` (Qwen, SmolLM2), ``</s>`` (Mistral; Llama-2
    writes ``' </s>'``, space kept). Derived by rendering ``[user, assistant PROBE]`` and taking what follows PROBE.
    The dropped whitespace (the ``\\n`` between turns) is never generated: decoding stops at the end-of-turn token.
    ``""`` if the template does not close assistant turns (the caller then uses EOS)."""
    _check_template(tokenizer)
    text = _apply(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
                  add_generation_prompt=False, enable_thinking=enable_thinking)
    at = text.rfind(_PROBE)
    if at < 0:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: its chat template does not render "
                        "an assistant message's text, so the end of an assistant turn cannot be found; use template "
                        "'none'")
    return text[at + len(_PROBE):].rstrip()


# ---------------------------------------------------------------------------------------------------- internals


def _check_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                        "use template 'none' or a tokenizer that has one (an -Instruct model)")


def _merge_system(messages: list[dict]) -> list[dict]:
    system, rest = messages[0], list(messages[1:])
    if not rest or rest[0].get("role") != "user":
        raise UserError("the chat template has no system role and the system message is not followed by a user "
                        "message to merge it into")
    rest[0] = {**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}
    return rest


def _apply(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool, enable_thinking: bool) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             enable_thinking=enable_thinking)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: its chat template failed on roles "
                        f"{[m.get('role') for m in messages]}: {e}") from None
