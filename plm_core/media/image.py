"""Image decoding with limits, as HF loads images: sniff, check the header, decode.

The format is sniffed from magic bytes and the size checked from the header before any pixel
is decoded; then Pillow decodes and the EXIF orientation is applied.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from plm_core.config import DEFAULT_MAX_IMAGE_SIDE
from plm_core.media.errors import MediaError, describe_error

__all__ = ["check_image_side", "decode_image"]

_FORMAT_NAMES = "PNG, JPEG, GIF, WebP, BMP or TIFF"
_EXIF_ORIENTATION = 0x0112


def _sniff_format(head: bytes) -> str | None:
    """The Pillow format implied by the magic bytes, or None if not allowed; only that plugin then
    parses the data (an MPO, a multi-picture JPEG, opens through "JPEG")."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def check_image_side(width: int, height: int, max_side: int | None, what: str = "image") -> None:
    """Raises MediaError if the longest side is over max_side (None: no limit).

    The antialiased resize of a very elongated image costs about 1 us and 200 bytes per pixel of
    its long side (a 46 KB 1x12,000,000 PNG: 10 s and 2 GB), hence this limit.
    """
    if max_side is not None and max(width, height) > max_side:
        raise MediaError(
            f"{what} size {width}x{height} has a side longer than the limit of {max_side} pixels"
        )


def _open(data: bytes) -> Image.Image:
    """The image opened lazily (its header read) by the one plugin its magic bytes name."""
    fmt = _sniff_format(data[:16])
    if fmt is None:
        raise MediaError(f"unsupported image format: expected {_FORMAT_NAMES}")
    try:
        return Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is too large to decode safely ({describe_error(e)})") from None
    except UnidentifiedImageError:
        raise MediaError(
            f"could not decode image: not a valid {fmt} file (corrupt or truncated)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"could not decode image: {describe_error(e)}") from None


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int | None = None,
    max_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
    exif_transpose: bool = True,
) -> Image.Image:
    """Decodes PNG/JPEG/GIF/WebP/BMP/TIFF bytes to a loaded PIL image (first frame if animated).

    The size is checked against `max_pixels` (default: Pillow's decompression-bomb limit) and the
    longest side against `max_side` (None: no limit) from the header, before any pixel data is
    decoded. With `exif_transpose`, an EXIF orientation tag is applied, as HF's `load_image` does
    for paths and URLs. Raises MediaError for anything unusable.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MediaError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise MediaError("image data is empty")
    img = _open(data)
    width, height = img.size
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and width * height > limit:
        raise MediaError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limit}"
        )
    check_image_side(width, height, max_side)
    if width < 1 or height < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    try:
        img.load()  # the first frame of an animated GIF/WebP/TIFF
        if exif_transpose:
            img = _apply_exif_orientation(img)
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is too large to decode safely ({describe_error(e)})") from None
    # Pillow raises many types for corrupt data (OSError, SyntaxError, struct.error...)
    except Exception as e:
        raise MediaError(f"could not decode image: {describe_error(e)}") from None
    return img


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is not a reason to reject the pixels
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        transposed = ImageOps.exif_transpose(img)
        return transposed if transposed is not None else img
    return img
