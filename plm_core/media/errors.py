"""The one error type media decoding and preprocessing raise for bad client input."""

from __future__ import annotations


class MediaError(ValueError):
    """An image or video the server cannot use; the message is safe to show to the client.

    Messages name the problem (format, size, limit) and never include the raw bytes or base64.
    """
