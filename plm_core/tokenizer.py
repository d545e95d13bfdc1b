"""Tokenizer and chat template: renders a conversation with the checkpoint's template, encodes it.

Rendering follows transformers' `apply_chat_template` (sandboxed Jinja, trim_blocks,
lstrip_blocks), and the rendered text is encoded without adding special tokens, so the prompt has
exactly the one BOS the template writes (rendering and then calling the tokenizer with defaults
would add a second). `token_bytes` gives a token's raw bytes (OpenAI's logprobs `bytes`), which a
byte-level token that splits a character has, though alone it decodes to U+FFFD.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from plm_core.model_config import ConfigError, ModelConfig


class InvalidTextError(ValueError):
    """Text that cannot be tokenized: not valid Unicode (a lone surrogate, as JSON's "\\ud800")."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to the printable character byte-level BPE spells it with."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_CHAR_OF_BYTE = bytes_to_unicode()
# the inverse: vocabulary character -> byte
_BYTE_OF_CHAR = {c: b for b, c in _CHAR_OF_BYTE.items()}


def _raise(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class PLMTokenizer:
    """Wraps the checkpoint's `tokenizer.json` and chat template."""

    @classmethod
    def for_model(cls, model_config: ModelConfig) -> PLMTokenizer:
        """The tokenizer of a checkpoint, with its chat template and special token ids."""
        return cls(
            model_config.path,
            model_config.chat_template,
            bos_token_id=model_config.bos_token_id,
            eos_token_ids=model_config.eos_token_ids,
        )

    def __init__(
        self,
        path: str | Path,
        chat_template: str,
        *,
        bos_token_id: int,
        eos_token_ids: tuple[int, ...],
    ):
        path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"cannot read tokenizer.json in {path}: {e}") from e
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token = self._tok.id_to_token(bos_token_id)
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"the checkpoint's chat template does not parse: {e}") from e
        # id -> text of the added tokens
        self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        # cache of token_bytes(); filled as tokens are asked for
        self._token_bytes: dict[int, bytes] = {}

    @cached_property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (<|eot_id|>, <|image|>, the reserved ones)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ConfigError(f"token {token!r} is not in the tokenizer")
        return tid

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """Renders template-ready messages (content as a list of {"type": ...} parts) to text."""
        eos = self._tok.id_to_token(self.eos_token_ids[-1]) if self.eos_token_ids else ""
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=eos,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with no special tokens added; InvalidTextError for invalid Unicode."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidTextError(
                    f"the text contains a lone surrogate ({text[e.start]!r} at character "
                    f"{e.start}), which is not valid Unicode"
                ) from None
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def is_byte_level(self) -> bool:
        """True for byte-level BPE vocabularies (Llama 3's, GPT-2's), spelled in GPT-2's bytes."""
        ids: dict[str, int] = {}
        for c in _BYTE_OF_CHAR:
            token_id = self._tok.token_to_id(c)
            if token_id is None:
                return False
            ids[c] = token_id
        # and its decoder must read it that way: "Ġ" is a space, "Ã" + "©" is "é"
        space = [ids[_CHAR_OF_BYTE[b]] for b in b" "]
        e_acute = [ids[_CHAR_OF_BYTE[b]] for b in "é".encode()]
        return self._tok.decode(space) == " " and self._tok.decode(e_acute) == "é"

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: part of a UTF-8 character for byte-level tokens that split
        one, the UTF-8 text of special and added tokens, b"" for ids outside the vocabulary. The
        bytes of a sequence's tokens concatenate to the UTF-8 of its decoded text (without skipping
        special tokens)."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            cached = self._compute_token_bytes(token_id)
            if 0 <= token_id < self.vocab_size:  # at most one entry per token of the vocabulary
                self._token_bytes[token_id] = cached
        return cached

    def token_text(self, token_id: int) -> str:
        """The text of one token alone; a token with part of a UTF-8 character shows U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _compute_token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        token = self._tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if token is None:
            return b""
        if self.is_byte_level:
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in token)
            except KeyError:
                # not spelled in the byte alphabet: the decoder, too, takes such a token as it is
                return token.encode()
        return self._tok.decode([token_id], skip_special_tokens=False).encode()
