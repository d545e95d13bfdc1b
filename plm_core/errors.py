"""Errors a client caused: each carries the request field it is about (`param`), set where the fault
is found, so the HTTP layer answers 400 with OpenAI's envelope without reading the message text.

Anything else raised inside the engine is a bug of ours: the server answers 500 and logs it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad client input; the message is safe to show to the client (no raw bytes, no base64).

    `param` is the path of the offending field as OpenAI writes it (`messages[1].content[0]`,
    `max_num_tiles`), or None when no single field is at fault.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptError(InputError):
    """The conversation is malformed or does not fit the model."""


class ContextLengthError(PromptError):
    """The prompt (text + media tokens), or the prompt and max_tokens, exceed the context."""


class MediaError(InputError):
    """An image or video the server cannot use (format, size, limit)."""
