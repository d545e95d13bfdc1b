"""Tokenizer and chat template: renders a conversation with the checkpoint's Jinja template and encodes it.

Rendering follows transformers' `apply_chat_template` (sandboxed Jinja, trim_blocks, lstrip_blocks),
and the rendered text is encoded without adding special tokens, so the prompt has exactly the one
BOS the template writes (rendering and then calling the tokenizer with defaults would add a second).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from plm_core.config import ConfigError


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class PLMTokenizer:
    """Wraps the checkpoint's `tokenizer.json` and chat template."""

    def __init__(self, path: str | Path, chat_template: str, *, bos_token_id: int, eos_token_ids: tuple[int, ...]):
        path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"cannot read tokenizer.json in {path}: {e}") from e
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token = self._tok.id_to_token(bos_token_id)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"the checkpoint's chat template does not parse: {e}") from e

    @cached_property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ConfigError(f"token {token!r} is not in the tokenizer")
        return tid

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Renders template-ready messages (content as a list of {"type": ...} parts) to text."""
        eos = self._tok.id_to_token(self.eos_token_ids[-1]) if self.eos_token_ids else ""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=eos)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
