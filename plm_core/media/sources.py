"""Reads the bytes behind a media URL: `data:` URLs, local paths and `file://` URLs.

http(s) URLs are not fetched here: the HTTP server fetches them first (server/media_fetch.py, with
an SSRF guard and byte caps) and hands the processor bytes; anywhere else they are refused with a
clear message.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from plm_core.media.errors import MediaError


def parse_data_url(url: str, *, max_bytes: int | None = None) -> tuple[str, bytes]:
    """Returns (media type, payload bytes) of a `data:` URL; errors never echo the payload."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise MediaError("malformed data URL: expected 'data:<type>;base64,<payload>'")
    params = header[5:].split(";")
    media_type = params[0].strip().lower() or "text/plain"
    if "base64" in (p.strip().lower() for p in params[1:]):
        if max_bytes is not None and len(payload) * 3 // 4 > max_bytes:
            raise MediaError(f"data URL payload exceeds the {max_bytes}-byte limit")
        data = _strict_base64(payload)
    else:
        data = unquote(payload).encode("latin-1", errors="replace")
    if max_bytes is not None and len(data) > max_bytes:
        raise MediaError(f"data URL payload exceeds the {max_bytes}-byte limit")
    return media_type, data


def _strict_base64(payload: str) -> bytes:
    """Standard base64, whitespace allowed (line-wrapped payloads), anything else refused."""
    try:
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error:  # maybe whitespace: strip it (a copy) and try again
            return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("data URL payload is not valid base64") from None


def local_path_of(url: str) -> Path | None:
    """The filesystem path a `file://` URL or bare path names, or None for other schemes."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"file URL with a remote host is not supported: {parsed.netloc}")
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(os.path.expanduser(url))
    return None


def read_local_file(
    path: Path, *, allowed_root: Path | None = None, max_bytes: int | None = None
) -> bytes:
    """Reads a local media file, optionally only from under `allowed_root` (symlinks resolved)."""
    try:
        return _read_local_file(path, allowed_root, max_bytes)
    # a NUL in the name, a name too long, a directory, no permission, ...
    except (ValueError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise MediaError(f"cannot read local media file: {reason}") from None


def _read_local_file(path: Path, allowed_root: Path | None, max_bytes: int | None) -> bytes:
    resolved = path.resolve()
    if allowed_root is not None:
        root = allowed_root.resolve()
        if resolved != root and root not in resolved.parents:
            raise MediaError(f"local media path is outside the allowed directory: {path}")
    if not resolved.is_file():
        raise MediaError(f"media file not found: {path}")
    size = resolved.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise MediaError(f"media file {path} is {size} bytes, over the {max_bytes}-byte limit")
    return resolved.read_bytes()


def read_media_url(
    url: str,
    *,
    allowed_root: Path | None = None,
    allow_local: bool = True,
    max_bytes: int | None = None,
) -> bytes:
    """Bytes of a `data:` URL, `file://` URL or local path; http(s) is the server's job."""
    if not isinstance(url, str) or not url:
        raise MediaError("media URL must be a non-empty string")
    if url.startswith("data:"):
        return parse_data_url(url, max_bytes=max_bytes)[1]
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise MediaError(
            "http(s) media URLs are not supported here; send the media as a data: URL (the offline "
            "API also takes local paths, file:// URLs, PIL images and arrays)"
        )
    path = local_path_of(url)
    if path is None:
        raise MediaError(f"unsupported media URL scheme {scheme!r}")
    if not allow_local:
        raise MediaError(
            "local file media is not enabled on this server (the server's operator can allow a "
            "directory with --allowed-local-media-path DIR; offline: allowed_local_media_path=DIR)"
        )
    return read_local_file(path, allowed_root=allowed_root, max_bytes=max_bytes)
