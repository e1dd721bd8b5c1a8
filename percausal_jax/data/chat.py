"""Turning a :class:`~percausal_jax.data.prompts.Prompt` into the exact text the model sees.

Builders produce plain text; this step decides the wrapping, once, for both passes:

* ``"chat"``: the tokenizer's own chat template (system message if any, then the user message, then the
  assistant header via ``add_generation_prompt=True``). ``enable_thinking`` is passed through: Qwen3 templates use
  it (False = the empty think block that disables reasoning); templates that do not mention it ignore it.
* ``"none"``: raw text, ``system + "\\n" + user`` or just ``user`` (base models, LaMP/LongLaMP-style training).

The target is appended by the caller after this text (plus EOS / end-of-turn), so loss masks line up.
"""

from __future__ import annotations

from typing import Any, Literal

from percausal_jax.data.prompts import Prompt
from percausal_jax.errors import UserError

Template = Literal["chat", "none"]
TEMPLATES: tuple[Template, ...] = ("chat", "none")


def render(tokenizer: Any, prompt: Prompt, template: Template, enable_thinking: bool = False) -> str:
    """The prompt text for one pass; ``tokenizer`` is only used (and may be None) for ``"chat"``."""
    if template == "none":
        return prompt.user if prompt.system is None else f"{prompt.system}\n{prompt.user}"
    if template != "chat":
        raise UserError(f"prompt template {template!r}: expected one of {list(TEMPLATES)}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                        "use template 'none' or a tokenizer that has one (an -Instruct model)")
    messages = [{"role": "user", "content": prompt.user}]
    if prompt.system is not None:
        messages.insert(0, {"role": "system", "content": prompt.system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
