"""Incremental detokenization of one request's output: whole-character text deltas, stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# what a decoder writes for bytes that are not (yet) a whole UTF-8 character
_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded in front of the first output token, as vLLM does


class Decoder(Protocol):
    """What detokenizing needs of a tokenizer (PLMTokenizer, or a `tokenizers.Tokenizer`)."""

    def decode(self, ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns output tokens, one at a time, into text deltas, and stops at the first stop string.

    Decoding uses the prefix/read-offset technique: the new text is decode(tokens[prefix:]) minus
    decode(tokens[prefix:read]), and both offsets move on once the new text ends in a whole
    character. A delta is held back while it ends in U+FFFD (a multi-byte character split over
    byte-level tokens), and the last len(longest stop string) - 1 characters are held back so that
    a stop string arriving over several tokens is never partly emitted.

    A stop string ends the text at the point where it is first completed, reading the text
    character by character (so the result does not depend on how the text was split into tokens);
    the text is cut just before it, or just after it with include_stop_str_in_output. The deltas
    returned by add() and then flush() concatenate to tokenizer.decode(tokens) cut that way.

    With min_tokens, as in vLLM, a stop string only counts if it is completed in the text of a
    token after the first min_tokens (it may begin earlier); one completed before is ordinary text.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        prompt_token_ids: list[int] | None = None,
        min_tokens: int = 0,
    ):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        # characters held back for stop strings
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        # The last few prompt tokens give the first output tokens their decoding context.
        self._tokens = list(prompt_token_ids[-_PROMPT_CONTEXT:]) if prompt_token_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._text = ""  # output text decoded so far (the stop-string cut applied)
        self._emitted = 0  # characters of _text already returned
        self._min_tokens = min_tokens
        self._num_output = 0  # output tokens added so far
        # a stop string must end after this many characters of _text (min_tokens)
        self._stop_from = 0
        self.stop_reason: str | None = None  # the stop string that ended the text
        self.finished = False

    @property
    def text(self) -> str:
        """The output text returned so far (everything, once flush() has been called)."""
        return self._text[: self._emitted]

    def add(self, token_id: int) -> str:
        """Appends one generated token; returns the text that can now be shown (possibly "")."""
        if self.finished:
            raise RuntimeError(
                "add() after the detokenizer finished (stop string found or flushed)"
            )
        self._tokens.append(token_id)
        self._num_output += 1
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing visible yet (a special token skipped, or an unfinished character)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return self._append(new_text[len(prefix_text) :], final=False)

    def flush(self, stop_token_id: int | None = None) -> str:
        """Ends the text (for a reason other than a stop string) and returns what was held back.

        stop_token_id: the eos or stop token that ended the output, to be kept in the text
        (include_stop_str_in_output); its text is not searched for stop strings, as in vLLM.
        """
        if self.finished:
            return ""
        if stop_token_id is not None:
            self._tokens.append(stop_token_id)
        rest = ""
        # an unfinished character (or the kept stop token): decode it
        if self._read_offset < len(self._tokens):
            prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
            rest = self._decode(self._tokens[self._prefix_offset :])[len(prefix_text) :]
            self._prefix_offset = self._read_offset = len(self._tokens)
        delta = self._append(rest, final=True, check_stop=stop_token_id is None)
        self.finished = True
        return delta

    def _append(self, new: str, *, final: bool, check_stop: bool = True) -> str:
        start = len(self._text)
        self._text += new
        if self._num_output <= self._min_tokens:
            # text of the first min_tokens tokens cannot complete a stop
            self._stop_from = len(self._text)
        elif self._stop and check_stop:
            match = self._find_stop(max(0, start - self._hold))
            if match is not None:
                index, stop = match
                self._text = self._text[: index + len(stop) if self._include_stop else index]
                self.stop_reason = stop
                self.finished = True
                final = True
        end = len(self._text) if final else max(self._emitted, len(self._text) - self._hold)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """The stop string completed first in _text[start:] and after _stop_from (the longer one if
        two end together)."""
        best: tuple[tuple[int, int], tuple[int, str]] | None = None
        for stop in self._stop:
            index = self._text.find(stop, max(start, self._stop_from - len(stop) + 1))
            if index < 0:
                continue
            key = (index + len(stop), index)
            if best is None or key < best[0]:
                best = (key, (index, stop))
        return best[1] if best else None

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
