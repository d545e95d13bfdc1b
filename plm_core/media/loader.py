"""Loads one media reference into a MediaItem with raw pixels, then preprocesses them.

Loading reads and hashes the bytes, decodes them within the MediaConfig limits and settles the
item's settings and tile or frame count; preprocessing goes by those settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from plm_core.config import MediaConfig
from plm_core.inputs import MediaItem
from plm_core.media.errors import MediaError
from plm_core.media.hashing import bytes_content_hash, pil_content_hash, pixels_content_hash
from plm_core.media.image import check_image_side, decode_image
from plm_core.media.preprocess import preprocess_image, preprocess_video_frames
from plm_core.media.rgb import (
    array_to_rgb_tensor,
    frames_to_tensor,
    is_frame_sequence,
    pil_to_rgb_tensor,
)
from plm_core.media.sampling import choose_frame_indices, frame_sampling
from plm_core.media.settings import FrameSampling, ImageSettings, VideoSettings
from plm_core.media.sources import read_media_url
from plm_core.media.tiling import num_image_tiles
from plm_core.media.video import decode_video_frames
from plm_core.messages import MediaOptions, MediaRef
from plm_core.model_config import ProcessorConfig


@contextmanager
def located(param: str) -> Iterator[None]:
    """Gives a MediaError raised inside the field `param`, unless it names a field already: errors
    raised deep in decoding do not know which part of the request they are about."""
    try:
        yield
    except MediaError as e:
        if e.param is None:
            e.param = param
        raise


class MediaLoader:
    """Media references -> MediaItems with raw pixels, and those pixels -> the model's input."""

    def __init__(self, pcfg: ProcessorConfig, media: MediaConfig, max_num_tiles: int):
        """max_num_tiles: the default tile budget per image (detail "auto")."""
        self.pcfg = pcfg
        self.media = media
        self.max_num_tiles = max_num_tiles
        local = media.allowed_local_media_path
        self._local_root = Path(local) if local is not None else None

    def load(self, ref: MediaRef, options: MediaOptions) -> tuple[MediaItem, torch.Tensor]:
        """The item (settings, counts, hash) and its raw pixels: an image as RGB uint8 [3, H, W],
        a video as its sampled frames uint8 [F, 3, H, W]."""
        with located(ref.param):
            if ref.kind == "image":
                return self._load_image(ref, options)
            return self._load_video(ref, options)

    def preprocess(self, item: MediaItem, raw: torch.Tensor) -> torch.Tensor:
        """Raw pixels -> float32 [num_tiles, 3, T, T], from the item's settings."""
        mean, std = self.pcfg.image_mean, self.pcfg.image_std
        if isinstance(item.settings, ImageSettings):
            return preprocess_image(raw, item.settings, mean=mean, std=std)
        return preprocess_video_frames(raw, item.settings, mean=mean, std=std)

    def image_settings(self, ref: MediaRef, options: MediaOptions) -> ImageSettings:
        """detail "low": the thumbnail alone; else the part's tile budget, the request's, or the
        default one (the model's whole budget with detail "high")."""
        if ref.detail == "low":
            return ImageSettings.thumbnail(self.pcfg.tile_size)
        default = self.pcfg.max_num_tiles if ref.detail == "high" else self.max_num_tiles
        budget = ref.max_num_tiles or options.max_num_tiles or default
        return ImageSettings(self.pcfg.tile_size, budget, self.pcfg.vision_input_type)

    # -- images -----------------------------------------------------------------------------------
    def _load_image(self, ref: MediaRef, options: MediaOptions) -> tuple[MediaItem, torch.Tensor]:
        rgb, digest = self._image_pixels(ref.source)
        height, width = (int(d) for d in rgb.shape[-2:])
        settings = self.image_settings(ref, options)
        num_tiles = num_image_tiles(
            width,
            height,
            tile_size=settings.tile_size,
            max_num_tiles=settings.max_num_tiles,
            vision_input_type=settings.vision_input_type,
        )
        num_tokens = num_tiles * self.pcfg.tokens_per_tile
        meta = {"width": width, "height": height}
        return MediaItem("image", digest, settings, num_tiles, num_tokens, meta=meta), rgb

    def _image_pixels(self, source: Any) -> tuple[torch.Tensor, str]:
        """(RGB uint8 [3, H, W], content hash). Sizes are checked before decoding (pixels, longest
        side); in-memory images have their longest side checked, which bounds resizing them."""
        max_side = self.media.max_image_side
        if isinstance(source, Image.Image):
            check_image_side(*source.size, max_side)
            return pil_to_rgb_tensor(source), pil_content_hash(source)
        if isinstance(source, (np.ndarray, torch.Tensor)):
            rgb = array_to_rgb_tensor(source)
            check_image_side(rgb.shape[-1], rgb.shape[-2], max_side)
            return rgb, pixels_content_hash(rgb)
        data = self._read(source)
        img = decode_image(data, max_pixels=self.media.max_image_pixels, max_side=max_side)
        return pil_to_rgb_tensor(img), bytes_content_hash(data)

    # -- videos -----------------------------------------------------------------------------------
    def _load_video(self, ref: MediaRef, options: MediaOptions) -> tuple[MediaItem, torch.Tensor]:
        """Decodes only the sampled frames; the decoded pixels (frames x width x height) are
        checked against the limit before decoding."""
        if is_frame_sequence(ref.source):
            sampling = frame_sampling(ref, options, self.media, video_fps=ref.video_fps)
            frames, digest, meta = _sample_in_memory(ref.source, sampling)
        else:
            sampling = frame_sampling(ref, options, self.media)
            data = self._read(ref.source)
            frames, info, indices = decode_video_frames(data, sampling, self.media)
            digest = bytes_content_hash(data)
            meta = {
                "total_frames": info.num_frames,
                "fps": info.fps,
                "width": info.width,
                "height": info.height,
                "frame_indices": indices,
            }
        settings = VideoSettings(self.pcfg.video_size, sampling)
        n = len(frames)
        item = MediaItem("video", digest, settings, n, n * self.pcfg.tokens_per_frame, meta=meta)
        return item, frames

    def _read(self, source: Any) -> bytes:
        """The bytes of a source given as bytes (fetched by the server) or as a URL or path."""
        if isinstance(source, (bytes, bytearray)):
            return bytes(source)
        return read_media_url(
            source,
            allowed_root=self._local_root,
            allow_local=self._local_root is not None,
            max_bytes=self.media.max_media_bytes,
        )


def _sample_in_memory(
    source: Any, sampling: FrameSampling
) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """(sampled frames uint8 [F, 3, H, W], content hash of all frames, meta) of in-memory frames."""
    every = frames_to_tensor(source)
    indices = choose_frame_indices(len(every), sampling, sampling.video_fps)
    frames = every[torch.as_tensor(indices, dtype=torch.long)]
    meta = {"total_frames": len(every), "frame_indices": indices}
    return frames, pixels_content_hash(every), meta
