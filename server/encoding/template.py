"""User-supplied Jinja chat templates (``--chat-template path.jinja``).

Contract: :class:`JinjaChatTemplate` reads and compiles the file once (errors name the file and line) and
renders it in a sandbox (``jinja2.sandbox.ImmutableSandboxedEnvironment``: no attribute access to Python
internals, no mutation of the passed messages) with Hugging Face's settings (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``) and variables:

  * ``messages`` (validated like the built-in encoders; list-of-parts content joined to a string),
    ``tools`` (the request's tools or None), ``add_generation_prompt``, ``bos_token``, ``eos_token``;
  * every ``chat_template_kwargs`` entry, then ``thinking`` and ``enable_thinking`` set to the resolved
    thinking switch;
  * helpers ``raise_exception(msg)``, ``strftime_now(fmt)`` and the ``tojson`` filter (no key sorting,
    ``ensure_ascii=False``).

Every failure raises :class:`ChatTemplateError` (a ``ValueError``) whose text starts with
``chat template <path>``.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping, Sequence

from .common import BOS, EOS, MessageFormatError, normalize_messages

try:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:  # pragma: no cover - exercised only where jinja2 is absent
    jinja2 = None

_RESERVED = ("messages", "tools", "add_generation_prompt")


class ChatTemplateError(ValueError):
    """A chat template could not be read, compiled or rendered. ``path`` is the template file."""

    def __init__(self, path: str, reason: str, lineno: int | None = None):
        self.path = path
        self.lineno = lineno
        where = f"chat template {path}" + (f", line {lineno}" if lineno else "")
        super().__init__(f"{where}: {reason}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False,
            separators: Any = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=tuple(separators) if separators else None)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _template_lineno(exc: BaseException, path: str) -> int | None:
    """Line of the innermost traceback frame that belongs to the template (Jinja maps those frames to
    template lines)."""
    lineno = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return lineno


class JinjaChatTemplate:
    """A chat encoder backed by a Jinja template file. ``bos_token`` / ``eos_token`` default to DeepSeek's.

    Raises ChatTemplateError at construction if jinja2 is missing or the file cannot be read or compiled.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str = BOS, eos_token: str = EOS):
        self.path = os.fspath(path)
        self.name = self.path
        self.bos_token = bos_token
        self.eos_token = eos_token
        if jinja2 is None:
            raise ChatTemplateError(self.path, "jinja2 is not installed (pip install jinja2)")
        try:
            with open(self.path, encoding="utf-8") as f:
                self.source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(self.path, f"cannot read the file ({e})") from None
        key = self.path

        def load(name: str):
            if name != key:
                return None  # {% include %} / {% import %} of other files is not supported
            return self.source, self.path, lambda: True

        env = ImmutableSandboxedEnvironment(loader=jinja2.FunctionLoader(load), trim_blocks=True,
                                            lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                                            autoescape=False, keep_trailing_newline=False)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.get_template(key)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(self.path, f"syntax error: {e.message}", e.lineno) from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(self.path, f"{type(e).__name__}: {e}") from None

    @staticmethod
    def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Shallow copies of the request messages with list-of-parts content joined into a string."""
        records = normalize_messages(messages, allow_empty=False)
        out = []
        for raw, rec in zip(messages, records):
            msg = dict(raw)
            if isinstance(raw.get("content"), (list, tuple)):
                msg["content"] = rec.content
            out.append(msg)
        return out

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               thinking: bool = False, add_generation_prompt: bool = True,
               chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """Render the template for a request. Raises MessageFormatError (ValueError) for malformed
        messages, ChatTemplateError (ValueError) for reserved ``chat_template_kwargs`` keys and for any error
        raised while rendering (including the template's own ``raise_exception``)."""
        msgs = self._template_messages(messages)
        ctx: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        for k, v in (chat_template_kwargs or {}).items():
            if k in _RESERVED:
                raise MessageFormatError(f"chat_template_kwargs.{k}", "reserved; pass it as a request field")
            ctx[k] = v
        ctx.update(messages=msgs, tools=list(tools) if tools else None,
                   add_generation_prompt=bool(add_generation_prompt), thinking=bool(thinking),
                   enable_thinking=bool(thinking))
        try:
            return self._template.render(**ctx)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(self.path, f"{type(e).__name__}: {e}", _template_lineno(e, self.path)) from None

    def __repr__(self) -> str:
        return f"JinjaChatTemplate({self.path!r})"
