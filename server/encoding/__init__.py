"""Chat encoding for the DeepSeek-V3.2 family: OpenAI-shaped messages to prompt text (protocol.md 3-4).

  * :func:`get_chat_encoder` -- "dsv32" (V3.2 / Speciale), "v31" (V3.2-Exp) or a Jinja template path; the
    returned object has ``.render(messages, tools=None, thinking=False, add_generation_prompt=True,
    chat_template_kwargs=None) -> str``.
  * :func:`resolve_thinking` -- the request's thinking switch.

The prompt text already holds the BOS token: tokenize it without adding special tokens. All input errors are
``ValueError`` subclasses (:class:`MessageFormatError`, :class:`ChatTemplateError`) naming the field or file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Protocol, Sequence

from .common import MessageFormatError
from .dsv32 import DSV32ChatEncoder, build_prompt, encode_messages
from .template import ChatTemplateError, JinjaChatTemplate
from .v31 import V31ChatEncoder

__all__ = ["ChatEncoder", "ChatTemplateError", "DSV32ChatEncoder", "JinjaChatTemplate", "MessageFormatError",
           "V31ChatEncoder", "build_prompt", "encode_messages", "get_chat_encoder", "resolve_thinking",
           "ENCODER_NAMES"]

ENCODER_NAMES: Mapping[str, type] = {
    "dsv32": DSV32ChatEncoder, "deepseek-v3.2": DSV32ChatEncoder, "deepseekv32": DSV32ChatEncoder,
    "deepseek-v3.2-speciale": DSV32ChatEncoder,
    "v31": V31ChatEncoder, "deepseek-v3.1": V31ChatEncoder, "deepseekv31": V31ChatEncoder,
    "exp": V31ChatEncoder, "deepseek-v3.2-exp": V31ChatEncoder,
}


class ChatEncoder(Protocol):
    """What :func:`get_chat_encoder` returns."""

    name: str

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               thinking: bool = False, add_generation_prompt: bool = True,
               chat_template_kwargs: Mapping[str, Any] | None = None) -> str: ...


def get_chat_encoder(name_or_path: str | os.PathLike) -> ChatEncoder:
    """The chat encoder for a built-in name (case-insensitive: "dsv32", "deepseek-v3.2", "v31",
    "deepseek-v3.1", "exp", ...; see ``ENCODER_NAMES``) or a Jinja template file path.

    Raises ValueError for an unknown name; ChatTemplateError (a ValueError) naming the file when the path
    cannot be read or compiled.
    """
    text = os.fspath(name_or_path)
    if not isinstance(text, str) or not text:
        raise ValueError(f"chat encoder: expected a name or a template path, got {name_or_path!r}")
    cls = ENCODER_NAMES.get(text.strip().lower())
    if cls is not None:
        return cls()
    if os.path.exists(text) or text.endswith((".jinja", ".jinja2", ".j2")) or os.sep in text:
        return JinjaChatTemplate(text)
    names = ", ".join(sorted(ENCODER_NAMES))
    raise ValueError(f"chat encoder {text!r}: not a built-in encoder ({names}) nor an existing template file")


def _bool_switch(value: Any, path: str) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    raise MessageFormatError(path, f"must be true or false, got {value!r}")


def resolve_thinking(chat_template_kwargs: Mapping[str, Any] | None, thinking_obj: Any | None,
                     default: bool = False) -> bool:
    """Whether a request enables thinking.

    Switches read (absent or null means "not given"): ``chat_template_kwargs.thinking`` (bool),
    ``chat_template_kwargs.enable_thinking`` (bool), and the DeepSeek-API request field ``thinking``:
    ``{"type": "enabled" | "disabled"}`` (a bare bool is accepted too). Given switches must agree; with none
    given the result is ``default`` (False, except for a thinking-only model such as Speciale). Raises
    ValueError (naming the field) for a bad value or contradicting switches.
    """
    given: list[tuple[str, bool]] = []
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, Mapping):
            raise MessageFormatError("chat_template_kwargs", "must be an object")
        for key in ("thinking", "enable_thinking"):
            v = _bool_switch(chat_template_kwargs.get(key), f"chat_template_kwargs.{key}")
            if v is not None:
                given.append((f"chat_template_kwargs.{key}", v))
    if thinking_obj is not None:
        if isinstance(thinking_obj, bool):
            given.append(("thinking", thinking_obj))
        elif isinstance(thinking_obj, Mapping):
            kind = thinking_obj.get("type")
            if kind not in ("enabled", "disabled"):
                raise MessageFormatError("thinking.type", f"must be 'enabled' or 'disabled', got {kind!r}")
            given.append(("thinking.type", kind == "enabled"))
        else:
            raise MessageFormatError("thinking", 'must be an object like {"type": "enabled"}')
    if not given:
        return bool(default)
    values = {v for _, v in given}
    if len(values) > 1:
        desc = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in given)
        raise MessageFormatError(given[0][0], f"contradicting thinking switches ({desc})")
    return values.pop()
