"""PLM's pixel preprocessing from an item's settings, pixel-equal to HF's.

An image becomes its thumbnail and tiles, video frames become squares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from plm_core.media.errors import MediaError
from plm_core.media.pixels import (
    as_triple,
    empty_output,
    fused_mean_std,
    normalize_into,
    resize_bicubic,
)
from plm_core.media.settings import ImageSettings, VideoSettings
from plm_core.media.tiling import tile_grid

Channels = float | Sequence[float]
_HALF = (0.5, 0.5, 0.5)
_FRAME_CHUNK = 8  # frames resized at once


def preprocess_image(
    rgb: torch.Tensor,
    settings: ImageSettings = ImageSettings(),
    *,
    mean: Channels = _HALF,
    std: Channels = _HALF,
) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 [N, 3, T, T]: the thumbnail, then the tiles row-major (HF's
    pixels).

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
    tsz = settings.tile_size
    m, s = fused_mean_std(as_triple(mean), as_triple(std))
    x = rgb[None].contiguous(memory_format=torch.channels_last)  # [1, 3, H, W], HWC in memory
    n_w, n_h = tile_grid(width, height, tsz, settings.max_num_tiles) if settings.tiled else (0, 0)
    out = empty_output((1 + n_w * n_h, 3, tsz, tsz))  # [N, 3, T, T]
    normalize_into(out[0], resize_bicubic(x, tsz, tsz)[0], m, s)
    if n_w:
        canvas = resize_bicubic(x, n_h * tsz, n_w * tsz)[0]  # [3, n_h*T, n_w*T]
        for r in range(n_h):
            for c in range(n_w):
                tile = canvas[:, r * tsz : (r + 1) * tsz, c * tsz : (c + 1) * tsz]  # [3, T, T]
                normalize_into(out[1 + r * n_w + c], tile, m, s)
    return out


def preprocess_video_frames(
    frames: torch.Tensor,
    settings: VideoSettings = VideoSettings(),
    *,
    mean: Channels = _HALF,
    std: Channels = _HALF,
) -> torch.Tensor:
    """uint8 [F, 3, H, W] -> float32 [F, 3, T, T]: each frame squashed to T x T and normalized
    (HF's pixels); channels-last input takes the fast uint8 resize, with the same pixels."""
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise MediaError(
            f"expected uint8 frames [F, 3, H, W], got {tuple(frames.shape)} {frames.dtype}"
        )
    size = settings.frame_size
    m, s = fused_mean_std(as_triple(mean), as_triple(std))
    out = empty_output((frames.shape[0], 3, size, size))  # [F, 3, T, T]
    for k in range(0, frames.shape[0], _FRAME_CHUNK):
        chunk = frames[k : k + _FRAME_CHUNK].contiguous(memory_format=torch.channels_last)
        resized = resize_bicubic(chunk, size, size)  # [<=8, 3, T, T] uint8
        normalize_into(out[k : k + resized.shape[0]], resized, m, s)
    return out
