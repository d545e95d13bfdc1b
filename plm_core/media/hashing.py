"""Content hashes of media (sha256 hex): of the source bytes, or of in-memory pixels."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image


def bytes_content_hash(data: bytes | bytearray | memoryview) -> str:
    """sha256 hex of an image's or video's source bytes."""
    return hashlib.sha256(data).hexdigest()


def text_content_hash(text: str) -> str:
    """sha256 hex of a text (e.g. a `data:` URL), its UTF-8 bytes with surrogates passed."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def pil_content_hash(img: Image.Image) -> str:
    """sha256 hex of an in-memory image: mode, size, palette, transparency and pixel bytes."""
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    if img.mode in ("P", "PA"):
        h.update(bytes(img.getpalette() or []))
    transparency = img.info.get("transparency")
    if transparency is not None:
        h.update(repr(transparency).encode())
    h.update(img.tobytes())
    return h.hexdigest()


def pixels_content_hash(pixels: torch.Tensor) -> str:
    """sha256 hex of uint8 pixels [..., 3, H, W] (an image or video frames): shape and values."""
    h = hashlib.sha256()
    h.update(f"{pixels.dtype}:{tuple(pixels.shape)}:".encode())
    hwc = pixels.movedim(-3, -1).contiguous()  # free for the channels-last views decoders give
    h.update(hwc.numpy().data)
    return h.hexdigest()
