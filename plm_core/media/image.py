"""Image decoding (Pillow, with limits) and PLM's thumb+tile preprocessing, pixel-equal to HF's."""

from __future__ import annotations

import functools
import hashlib
import io
import math
import mmap
import operator
import re
import sys
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as tvF

from plm_core.media.errors import MediaError

_FORMAT_NAMES = "PNG, JPEG, GIF, WebP, BMP or TIFF"
_EXIF_ORIENTATION = 0x0112
_RESCALE_FACTOR = 1 / 255  # HF's default `rescale_factor`
# The longest image side decoded by default. The antialiased resize of a very elongated image costs
# about 1 us and 200 bytes per pixel of its long side (a 46 KB 1x12,000,000 PNG: 10 s and 2 GB).
DEFAULT_MAX_IMAGE_SIDE = 32768
# The largest tile budget any grid is computed for: enumerating the grids costs O(n^1.5) (PLM uses 36).
MAX_TILE_BUDGET = 1024
# Object reprs, errnos and placeholder file names in library messages say nothing about the input.
_NOISE = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>|\[Errno -?\d+\]\s*|:\s*'<none>'")


# -- decoding -------------------------------------------------------------------------------------


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


def _describe(exc: BaseException) -> str:
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


def decode_image(
    data: bytes,
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
    fmt = _sniff_format(data[:16])
    if fmt is None:
        raise MediaError(f"unsupported image format: expected {_FORMAT_NAMES}")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is too large to decode safely ({_describe(e)})") from None
    except UnidentifiedImageError:
        raise MediaError(
            f"could not decode image: not a valid {fmt} file (corrupt or truncated)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"could not decode image: {_describe(e)}") from None
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
        raise MediaError(f"image is too large to decode safely ({_describe(e)})") from None
    except (
        Exception
    ) as e:  # Pillow raises many types for corrupt data (OSError, SyntaxError, struct.error...)
        raise MediaError(f"could not decode image: {_describe(e)}") from None
    return img


def check_image_side(width: int, height: int, max_side: int | None, what: str = "image") -> None:
    """Raises MediaError if the longest side is over max_side (None: no limit)."""
    if max_side is not None and max(width, height) > max_side:
        raise MediaError(
            f"{what} size {width}x{height} has a side longer than the limit of {max_side} pixels"
        )


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is not a reason to reject the pixels
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


# -- to RGB tensors -------------------------------------------------------------------------------


def pil_to_rgb_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W], converted like HF (transparency composited onto white).

    The tensor is a channels-last view of the pixels' HWC memory (no transposing copy); call
    .contiguous() where CHW memory is needed.
    """
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        elif img.mode != "RGB":
            rgb = img.convert("RGB")
        else:
            rgb = img
        arr = np.array(rgb)  # [H, W, 3], a writable copy
    except (OSError, ValueError) as e:
        raise MediaError(
            f"could not convert image of mode {img.mode} to RGB: {_describe(e)}"
        ) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise MediaError(f"could not convert image of mode {img.mode} to 8-bit RGB")
    return torch.from_numpy(arr).permute(2, 0, 1)  # [3, H, W] over [H, W, 3] memory


def array_to_rgb_tensor(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 array/tensor, [H, W], HWC or CHW with 1, 3 or 4 channels -> uint8 [3, H, W], like HF.

    As in HF, a shape whose first and last dims both look like channels is read as CHW, one channel
    is repeated, and a fourth (alpha) channel is composited onto white. An HWC input comes back as a
    channels-last view where no conversion was needed.
    """
    t = torch.from_numpy(np.ascontiguousarray(arr)) if isinstance(arr, np.ndarray) else arr
    if not isinstance(t, torch.Tensor):
        raise MediaError(
            f"image array must be a numpy array or torch tensor, got {type(arr).__name__}"
        )
    if t.dtype != torch.uint8:
        raise MediaError(f"image array must be uint8, got {t.dtype}")
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 3:
        if t.shape[0] not in (1, 3, 4):
            if t.shape[2] not in (1, 3, 4):
                raise MediaError(
                    f"image array must have 1, 3 or 4 channels, got shape {tuple(t.shape)}"
                )
            t = t.permute(2, 0, 1)  # HWC -> CHW
    else:
        raise MediaError(f"image array must be 2-D or 3-D, got shape {tuple(t.shape)}")
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise MediaError(f"image array has an empty size, shape {tuple(t.shape)}")
    t = tvF.grayscale_to_rgb(t)
    if t.shape[0] == 4:
        x = tvF.to_dtype(t.movedim(0, -1), torch.float32, scale=True)  # [H, W, 4] in [0, 1]
        x = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
        t = tvF.to_dtype(x, torch.uint8, scale=True).movedim(-1, 0)
    return t  # [3, H, W]


# -- tiling ---------------------------------------------------------------------------------------


def _factors(n: int) -> list[int]:
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return sorted(set(small) | {n // i for i in small})


def _tile_budget(max_num_tiles: int) -> int:
    """The budget as an int; refuses booleans, non-integers and budgets over MAX_TILE_BUDGET."""
    if isinstance(max_num_tiles, bool):
        raise MediaError("max_num_tiles must be an integer, not a boolean")
    try:
        budget = operator.index(max_num_tiles)
    except TypeError:
        raise MediaError(
            f"max_num_tiles must be an integer, got {type(max_num_tiles).__name__}"
        ) from None
    if budget > MAX_TILE_BUDGET:
        raise MediaError(
            f"max_num_tiles {budget} is over the largest supported budget of {MAX_TILE_BUDGET}"
        )
    return budget


@functools.lru_cache(maxsize=64, typed=True)
def _aspect_ratio_table(
    max_num_tiles: int,
) -> tuple[tuple[float, tuple[tuple[int, int], ...]], ...]:
    """(ratio n_w/n_h, grids with that ratio) for every grid of at most max_num_tiles tiles.

    The order is HF's and decides ties: tile counts from max_num_tiles down, within a count the
    width factors ascending; a ratio keeps the place where it first appeared. The work grows as
    n^1.5, so budgets over MAX_TILE_BUDGET are refused.
    """
    max_num_tiles = _tile_budget(max_num_tiles)
    table: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_num_tiles, 0, -1):
        for n_w in _factors(count):
            n_h = count // n_w
            table.setdefault(n_w / n_h, []).append((n_w, n_h))
    return tuple((ratio, tuple(grids)) for ratio, grids in table.items())


def _size_in_canvas(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[float, float]:
    """The image's size when scaled into the canvas keeping its aspect ratio (HF's float arithmetic)."""
    scale = width / height
    factor = min(canvas_w / width, canvas_h / height)
    if scale > 1.0:
        new_w = factor * width
        return new_w, math.floor(new_w / scale)
    new_h = factor * height
    return math.floor(new_h * scale), new_h


def _fit_to_canvas(
    width: int, height: int, tile_size: int, max_num_tiles: int
) -> tuple[int, int] | None:
    """The grid whose canvas holds the image without downscaling and upscales it most, else None."""
    scale = width / height
    best, best_size = None, None
    for _, grids in _aspect_ratio_table(max_num_tiles):
        for n_w, n_h in grids:
            canvas_w, canvas_h = n_w * tile_size, n_h * tile_size
            if canvas_w < width or canvas_h < height:
                continue
            size = _size_in_canvas(width, height, canvas_w, canvas_h)
            if best is None or (
                size[0] >= best_size[0] if scale < 1.0 else size[1] >= best_size[1]
            ):
                best, best_size = (n_w, n_h), size
    return best


def _closest_aspect_ratio(width: int, height: int, max_num_tiles: int) -> tuple[int, int]:
    """The grid of the closest ratio not wider (landscape) / narrower (portrait) than the image."""
    target = width / height
    table = _aspect_ratio_table(max_num_tiles)
    if target >= 1:
        ratio, grids = min(
            ((r, g) for r, g in table if r <= target), key=lambda rg: abs(rg[0] - target)
        )
        return max(grids, key=lambda g: g[0])
    ratio, grids = min(
        ((r, g) for r, g in table if r > target), key=lambda rg: abs(1 / rg[0] - 1 / target)
    )
    return max(grids, key=lambda g: g[1])


@functools.lru_cache(maxsize=4096, typed=True)  # typed: True is not a cached budget of 1
def tile_grid(width: int, height: int, tile_size: int, max_num_tiles: int) -> tuple[int, int]:
    """(n_w, n_h) tiles for an image, as HF's PerceptionLM resize picks them, honoring this budget.

    The largest canvas the image fits into without downscaling wins; if none fits, the closest
    aspect ratio. A budget of 1 or less gives (1, 1); one over MAX_TILE_BUDGET is a MediaError.
    """
    if width < 1 or height < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    max_num_tiles = _tile_budget(max_num_tiles)
    if max_num_tiles <= 1:
        return 1, 1
    grid = _fit_to_canvas(width, height, tile_size, max_num_tiles)
    return grid if grid is not None else _closest_aspect_ratio(width, height, max_num_tiles)


def num_image_tiles(
    width: int,
    height: int,
    *,
    tile_size: int,
    max_num_tiles: int,
    vision_input_type: str = "thumb+tile",
) -> int:
    """Tiles (thumbnail included) HF produces for an image of this size; no pixels are touched.

    thumb+tile gives 1 + n_w * n_h, so a budget of 1 still gives 2 (thumbnail and one tile);
    any other vision_input_type gives the single squashed tile.
    """
    if vision_input_type != "thumb+tile":
        return 1
    n_w, n_h = tile_grid(width, height, tile_size, max_num_tiles)
    return 1 + n_w * n_h


# -- pixels ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _fused_mean_std(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's fused rescale+normalize constants: mean/rescale and std/rescale in float32, [3, 1, 1]."""
    m = torch.tensor(mean, dtype=torch.float32) * (1.0 / _RESCALE_FACTOR)
    s = torch.tensor(std, dtype=torch.float32) * (1.0 / _RESCALE_FACTOR)
    return m.view(-1, 1, 1), s.view(-1, 1, 1)


def _as_triple(v: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(x) for x in v) if isinstance(v, Sequence) else (float(v),) * 3


class _OutputBuffers:
    """Recycles the memory of large float32 outputs once nothing references them any more.

    A fresh 37-tile output (89 MB) costs more to page-fault in than to compute, so large outputs
    are views of anonymous mmaps (transparent huge pages where the OS allows) that this pool keeps.
    A tensor made by torch.frombuffer holds a reference to its mmap until the tensor, its views and
    any numpy views are gone; an mmap with no reference beyond the pool's is free to hand out again,
    and every caller overwrites all of the elements it is given.
    """

    MIN_BYTES = 8 << 20
    MAX_BUFFERS = 4
    _ALIGN = 2 << 20  # round capacities to huge pages so that nearby sizes share buffers

    def __init__(self) -> None:
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * 4
        if nbytes < self.MIN_BYTES:
            return torch.empty(shape, dtype=torch.float32)
        with self._lock:
            buf = self._take(nbytes)
            if buf is None:
                return torch.empty(shape, dtype=torch.float32)
            # the tensor references buf from here on, so no other caller can take it
            return torch.frombuffer(buf, dtype=torch.float32, count=numel).view(shape)

    def _take(self, nbytes: int) -> mmap.mmap | None:
        # a free buffer is referenced only by the list and by getrefcount's own argument
        free = [i for i in range(len(self._buffers)) if sys.getrefcount(self._buffers[i]) == 2]
        for i in free:
            if len(self._buffers[i]) >= nbytes:
                return self._buffers[i]
        try:
            buf = mmap.mmap(
                -1,
                -(-nbytes // self._ALIGN) * self._ALIGN,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            )
            if hasattr(mmap, "MADV_HUGEPAGE"):
                buf.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError, AttributeError):
            return None
        if free:  # replace a free buffer that was too small
            self._buffers[free[0]] = buf
        elif len(self._buffers) < self.MAX_BUFFERS:
            self._buffers.append(buf)
        return buf


_OUTPUTS = _OutputBuffers()


def empty_output(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized float32 tensor for pixel outputs; the caller must write every element."""
    return _OUTPUTS.empty(shape)


def _normalize_into(out: torch.Tensor, src: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> None:
    """out = (float(src) - m) / s, the same float32 ops as HF's normalize, written in place."""
    torch.sub(src, m, out=out)
    out.div_(s)


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # x: [B, 3, H, W] uint8 -> [B, 3, height, width] uint8, torchvision's bicubic with antialias
    return tvF.resize(
        x, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True
    )


def preprocess_image(
    rgb: torch.Tensor,
    *,
    tile_size: int = 448,
    max_num_tiles: int = 36,
    vision_input_type: str = "thumb+tile",
    mean: float | Sequence[float] = (0.5, 0.5, 0.5),
    std: float | Sequence[float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 [N, 3, T, T]: the thumbnail, then the tiles row-major (HF's pixels).

    The resizes read the image in channels-last memory, where torch's uint8 kernel runs about twice
    as fast as on the CHW layout HF passes it, with identical results; each tile is then normalized
    once, from a view of the resized canvas, into the output.
    """
    if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.dtype != torch.uint8:
        raise MediaError(
            f"expected an RGB uint8 tensor [3, H, W], got {tuple(rgb.shape)} {rgb.dtype}"
        )
    height, width = (int(d) for d in rgb.shape[-2:])
    if height < 1 or width < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    tsz = tile_size
    m, s = _fused_mean_std(_as_triple(mean), _as_triple(std))
    x = rgb[None].contiguous(memory_format=torch.channels_last)  # [1, 3, H, W], HWC in memory
    n_w, n_h = (
        tile_grid(width, height, tsz, max_num_tiles)
        if vision_input_type == "thumb+tile"
        else (0, 0)
    )
    out = empty_output((1 + n_w * n_h, 3, tsz, tsz))  # [N, 3, T, T]
    _normalize_into(out[0], _resize(x, tsz, tsz)[0], m, s)
    if n_w:
        canvas = _resize(x, n_h * tsz, n_w * tsz)[0]  # [3, n_h*T, n_w*T]
        for r in range(n_h):
            for c in range(n_w):
                tile = canvas[:, r * tsz : (r + 1) * tsz, c * tsz : (c + 1) * tsz]  # view [3, T, T]
                _normalize_into(out[1 + r * n_w + c], tile, m, s)
    return out


# -- content hashes -------------------------------------------------------------------------------


def image_content_hash(data: bytes) -> str:
    """sha256 hex of an image's source bytes."""
    return hashlib.sha256(data).hexdigest()


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
