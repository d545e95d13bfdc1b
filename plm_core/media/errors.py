"""Media errors: MediaError (from plm_core.errors) and safe descriptions of library errors."""

from __future__ import annotations

import re

from plm_core.errors import MediaError

__all__ = ["MediaError", "describe_error"]

# Object reprs, errnos and placeholder file names in library messages say nothing about the input.
_NOISE = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>|\[Errno -?\d+\]\s*|:\s*'<none>'")


def describe_error(exc: BaseException) -> str:
    """A short, printable description of a decoder error that cannot echo the input's bytes.

    FFmpeg errors give their plain message (no errno, no file name); object reprs such as
    `<_io.BytesIO object at 0x...>` are dropped.
    """
    strerror = getattr(exc, "strerror", None)
    text = strerror if isinstance(strerror, str) and strerror else str(exc)
    text = _NOISE.sub("", text).strip()
    if not text or "b'" in text or 'b"' in text or "\\x" in text or not text.isprintable():
        return type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
