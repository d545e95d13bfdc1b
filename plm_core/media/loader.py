"""Loads one media reference into a MediaItem with raw pixels, then preprocesses them.

Loading reads and hashes the bytes, decodes them within the MediaConfig limits and settles the
item's settings and tile or frame count; preprocessing goes by those settings. Bytes whose facts
are in the raw-media cache are not decoded: the item gets a pixel source instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from plm_core.config import MediaConfig
from plm_core.inputs import MediaItem, media_cache_key
from plm_core.media.errors import MediaError
from plm_core.media.hashing import (
    bytes_content_hash,
    pil_content_hash,
    pixels_content_hash,
    text_content_hash,
)
from plm_core.media.image import check_image_side, decode_image
from plm_core.media.preprocess import preprocess_image, preprocess_video_frames
from plm_core.media.raw_cache import MediaFacts, RawMediaCache
from plm_core.media.rgb import (
    array_to_rgb_tensor,
    frames_to_tensor,
    is_frame_sequence,
    pil_to_rgb_tensor,
)
from plm_core.media.sampling import choose_frame_indices, frame_sampling
from plm_core.media.settings import FrameSampling, ImageSettings, MediaSettings, VideoSettings
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


@dataclass(frozen=True)
class MediaBytes:
    """An item's source bytes, hashed, with the settings they are preprocessed by: what the raw
    media cache keys on, and what skipped pixels are made from.

    The bytes are read when needed: a `data:` URL whose text was seen before is known by its
    bytes' hash without decoding its base64, which then happens only if pixels must be made.
    """

    kind: Literal["image", "video"]
    content_hash: str  # sha256 of the bytes: the item's content hash
    settings: MediaSettings
    read: Callable[[], bytes] = field(repr=False)

    @classmethod
    def of(
        cls, kind: Literal["image", "video"], data: bytes, settings: MediaSettings
    ) -> MediaBytes:
        """Bytes in hand, hashed."""
        return cls(kind, bytes_content_hash(data), settings, functools.partial(bytes, data))

    @property
    def data(self) -> bytes:
        return self.read()

    @property
    def cache_key(self) -> str:
        return media_cache_key(self.kind, self.content_hash, self.settings)


@dataclass(frozen=True)
class BytesPixels:
    """A MediaItem's pixel source: decodes and preprocesses its source bytes when called, giving
    the very pixels the processor makes on a miss."""

    loader: MediaLoader = field(repr=False)
    source: MediaBytes

    def __call__(self) -> torch.Tensor:
        cache = self.loader.cache
        if cache is None:
            return self.loader.pixels_of(self.source)
        return cache.shared_pixels(
            self.source.cache_key, lambda: self.loader.pixels_of(self.source)
        )


class MediaLoader:
    """Media references -> MediaItems with raw pixels, and those pixels -> the model's input.

    With a RawMediaCache, bytes seen before with the same settings are not decoded again: the item
    is built from the cached facts and given a pixel source instead of raw pixels.
    """

    def __init__(
        self,
        pcfg: ProcessorConfig,
        media: MediaConfig,
        max_num_tiles: int,
        cache: RawMediaCache | None = None,
    ):
        """max_num_tiles: the default tile budget per image (detail "auto")."""
        self.pcfg = pcfg
        self.media = media
        self.max_num_tiles = max_num_tiles
        self.cache = cache
        local = media.allowed_local_media_path
        self._local_root = Path(local) if local is not None else None

    def load(self, ref: MediaRef, options: MediaOptions) -> tuple[MediaItem, torch.Tensor | None]:
        """The item (settings, counts, hash) and its raw pixels: an image as RGB uint8 [3, H, W],
        a video as its sampled frames uint8 [F, 3, H, W]. On a raw-cache hit nothing is decoded:
        the raw pixels are None and the item has a pixel source (`item.pixels()` makes them)."""
        with located(ref.param):
            settings: MediaSettings
            if ref.kind == "image":
                settings = image = self.image_settings(ref, options)
                if isinstance(ref.source, (Image.Image, np.ndarray, torch.Tensor)):
                    return self._load_image_in_memory(ref.source, image)
            elif is_frame_sequence(ref.source):
                return self._load_frames_in_memory(ref, options)
            else:
                sampling = frame_sampling(ref, options, self.media)
                settings = VideoSettings(self.pcfg.video_size, sampling)
            return self._load_bytes(self._source_bytes(ref, settings))

    def preprocess(self, item: MediaItem, raw: torch.Tensor) -> torch.Tensor:
        """Raw pixels -> float32 [num_tiles, 3, T, T], from the item's settings."""
        return self._preprocess(item.settings, raw)

    def pixels_of(self, src: MediaBytes) -> torch.Tensor:
        """Source bytes -> float32 [num_tiles, 3, T, T]: decoded and preprocessed, as on a miss."""
        raw, _ = self._decode(src)
        return self._preprocess(src.settings, raw)

    def image_settings(self, ref: MediaRef, options: MediaOptions) -> ImageSettings:
        """detail "low": the thumbnail alone; else the part's tile budget, the request's, or the
        default one (the model's whole budget with detail "high")."""
        if ref.detail == "low":
            return ImageSettings.thumbnail(self.pcfg.tile_size)
        default = self.pcfg.max_num_tiles if ref.detail == "high" else self.max_num_tiles
        budget = ref.max_num_tiles or options.max_num_tiles or default
        return ImageSettings(self.pcfg.tile_size, budget, self.pcfg.vision_input_type)

    def _preprocess(self, settings: MediaSettings, raw: torch.Tensor) -> torch.Tensor:
        mean, std = self.pcfg.image_mean, self.pcfg.image_std
        if isinstance(settings, ImageSettings):
            return preprocess_image(raw, settings, mean=mean, std=std)
        return preprocess_video_frames(raw, settings, mean=mean, std=std)

    # -- bytes: cached facts, or a decode ---------------------------------------------------------
    def _load_bytes(self, src: MediaBytes) -> tuple[MediaItem, torch.Tensor | None]:
        if self.cache is None:
            return self._decode_item(src)
        facts = self.cache.get(src.cache_key, count=False)
        if facts is None:
            # requests arriving together with new bytes: one decodes, the others then hit
            with self.cache.loading(src.cache_key) as first:
                if first:
                    self.cache.count(hit=False)
                    return self._decode_shared(src)
            facts = self.cache.get(src.cache_key, count=False)
            if facts is None:  # the first one failed (and reported why), or it was evicted
                self.cache.count(hit=False)
                return self._decode_item(src)
        self.cache.count(hit=True)
        item = self._item(src.kind, src.content_hash, src.settings, facts.num_tiles)
        item.meta = facts.fresh_meta()
        item.pixel_source = BytesPixels(self, src)
        return item, None

    def _decode_shared(self, src: MediaBytes) -> tuple[MediaItem, None]:
        """A miss with a cache: decoded and preprocessed at once, and the pixels offered to the
        requests waiting for the same bytes (they get them without decoding)."""
        assert self.cache is not None
        item, raw = self._decode_item(src)
        item.pixel_values = self.cache.share(src.cache_key, self.preprocess(item, raw))
        return item, None

    def _decode_item(self, src: MediaBytes) -> tuple[MediaItem, torch.Tensor]:
        """A miss: the item from decoded bytes (its facts then cached) and its raw pixels."""
        raw, meta = self._decode(src)
        num_tiles = len(raw) if src.kind == "video" else self._image_tiles(raw, src.settings)
        item = self._item(src.kind, src.content_hash, src.settings, num_tiles)
        item.meta = meta
        if self.cache is not None:
            facts = MediaFacts(num_tiles, item.num_tokens, meta)
            item.meta = facts.fresh_meta()  # the cache keeps `meta` to itself
            self.cache.put(src.cache_key, facts)
        return item, raw

    def _decode(self, src: MediaBytes) -> tuple[torch.Tensor, dict[str, Any]]:
        """(raw pixels, meta) of source bytes, decoded within the MediaConfig limits."""
        if isinstance(src.settings, ImageSettings):
            max_side = self.media.max_image_side
            img = decode_image(src.data, max_pixels=self.media.max_image_pixels, max_side=max_side)
            rgb = pil_to_rgb_tensor(img)
            return rgb, {"width": int(rgb.shape[-1]), "height": int(rgb.shape[-2])}
        frames, info, indices = decode_video_frames(src.data, src.settings.sampling, self.media)
        meta = {
            "total_frames": info.num_frames,
            "fps": info.fps,
            "width": info.width,
            "height": info.height,
            "frame_indices": indices,
        }
        return frames, meta

    def _item(
        self, kind: Literal["image", "video"], digest: str, settings: MediaSettings, num_tiles: int
    ) -> MediaItem:
        per_tile = self.pcfg.tokens_per_tile if kind == "image" else self.pcfg.tokens_per_frame
        return MediaItem(kind, digest, settings, num_tiles, num_tiles * per_tile)

    @staticmethod
    def _image_tiles(rgb: torch.Tensor, settings: MediaSettings) -> int:
        assert isinstance(settings, ImageSettings)
        height, width = (int(d) for d in rgb.shape[-2:])
        return num_image_tiles(
            width,
            height,
            tile_size=settings.tile_size,
            max_num_tiles=settings.max_num_tiles,
            vision_input_type=settings.vision_input_type,
        )

    # -- in-memory media (not cached: no bytes to hash before decoding) ---------------------------
    def _load_image_in_memory(
        self, source: Any, settings: ImageSettings
    ) -> tuple[MediaItem, torch.Tensor]:
        """Longest side checked (which bounds resizing), then the RGB pixels and their hash."""
        max_side = self.media.max_image_side
        if isinstance(source, Image.Image):
            check_image_side(*source.size, max_side)
            rgb, digest = pil_to_rgb_tensor(source), pil_content_hash(source)
        else:
            rgb = array_to_rgb_tensor(source)
            check_image_side(rgb.shape[-1], rgb.shape[-2], max_side)
            digest = pixels_content_hash(rgb)
        item = self._item("image", digest, settings, self._image_tiles(rgb, settings))
        item.meta = {"width": int(rgb.shape[-1]), "height": int(rgb.shape[-2])}
        return item, rgb

    def _load_frames_in_memory(
        self, ref: MediaRef, options: MediaOptions
    ) -> tuple[MediaItem, torch.Tensor]:
        sampling = frame_sampling(ref, options, self.media, video_fps=ref.video_fps)
        frames, digest, meta = _sample_in_memory(ref.source, sampling)
        settings = VideoSettings(self.pcfg.video_size, sampling)
        item = self._item("video", digest, settings, len(frames))
        item.meta = meta
        return item, frames

    def _source_bytes(self, ref: MediaRef, settings: MediaSettings) -> MediaBytes:
        """The source's bytes and hash. The hash of a `data:` URL's bytes is remembered by the
        URL's text, so that the same text sent again is not decoded until pixels are needed."""
        source = ref.source
        if self.cache is None or not (isinstance(source, str) and source.startswith("data:")):
            return MediaBytes.of(ref.kind, self._read(source), settings)
        text_key = text_content_hash(source)
        digest = self.cache.content_hash_of(text_key)
        if digest is not None:
            return MediaBytes(ref.kind, digest, settings, functools.partial(self._read, source))
        src = MediaBytes.of(ref.kind, self._read(source), settings)
        self.cache.remember_content_hash(text_key, src.content_hash)
        return src

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
