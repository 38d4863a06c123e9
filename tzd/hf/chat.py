"""Chat templates from tokenizer_config.json, rendered as transformers' apply_chat_template renders them.

The same Jinja environment (sandboxed, trim_blocks + lstrip_blocks, loop controls, a `tojson` that
keeps non-ASCII text, `raise_exception`, `strftime_now`) and the same variables (`messages`,
`add_generation_prompt`, the special-token strings), so that a prompt TZD builds is the prompt the
model was fine-tuned on. tests/test_hf_families.py checks it against transformers itself.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its own raise_exception) or could not render it."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """One compiled template plus the special-token strings it may refer to."""

    def __init__(self, source: str, tokenizer_config: dict[str, Any]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat_template: {e.message} (line {e.lineno})") from None
        self.source = source
        self.variables: dict[str, Any] = {}
        for key in SPECIAL_TOKEN_KEYS:
            text = token_text(tokenizer_config.get(key))
            if text is not None:
                self.variables[key] = text
        extra = [token_text(t) for t in tokenizer_config.get("additional_special_tokens") or []]
        if extra:
            self.variables["additional_special_tokens"] = [t for t in extra if t is not None]

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text, ending with the assistant's turn opened."""
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"messages: the model's chat template refused them: {e}") from None


def template_source(tokenizer_config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of named ones (the `default` is used)."""
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) and source.strip() else None
