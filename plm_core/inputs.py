"""Engine-side request types: a processed prompt and the media items inside it.

Every media item carries its content hash from the moment its bytes are read, plus the typed
settings that change its pixels; `cache_key` (kind, hash and settings) is what the prefix cache,
the vision-encoder cache and the processor's raw-media cache key on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from plm_core.media.settings import ImageSettings, MediaSettings, VideoSettings

if TYPE_CHECKING:
    import torch

__all__ = [
    "ImageSettings",
    "MediaItem",
    "MediaSettings",
    "PixelSource",
    "ProcessedPrompt",
    "VideoSettings",
    "media_cache_key",
]

# Makes an item's pixels when called, float32 [num_tiles, 3, T, T], exactly as the processor would
# have (e.g. plm_core.media.loader.BytesPixels: decode + preprocess of the source bytes).
PixelSource = Callable[[], "torch.Tensor"]


def media_cache_key(kind: str, content_hash: str, settings: MediaSettings) -> str:
    """The string naming an item's pixels (`MediaItem.cache_key`), known before decoding."""
    return f"{kind}:{content_hash}:{settings.key}"


@dataclass
class MediaItem:
    """One image or video in a prompt, with the token range its features fill.

    Its pixels are either made (`pixel_values`) or deferred (`pixel_source`, set when the
    processor skipped them because the engine held the item's encoder output); `pixels()` gives
    them either way.
    """

    kind: Literal["image", "video"]
    # sha256 of the source bytes (or of the decoded pixels for in-memory media)
    content_hash: str
    settings: MediaSettings  # what changes the pixels besides the content
    num_tiles: int  # image: thumbnail + grid tiles; video: sampled frames
    num_tokens: int  # placeholder tokens in the prompt: num_tiles * tokens per tile
    offset: int = -1  # index of the item's first placeholder token in the prompt
    pixel_values: torch.Tensor | None = None  # [num_tiles, 3, T, T] float32, normalised
    # e.g. source size, frame indices; for logs, not keys
    meta: dict[str, Any] = field(default_factory=dict)
    # makes pixel_values when they were skipped (None once they are made)
    pixel_source: PixelSource | None = field(default=None, repr=False, compare=False)

    @property
    def cache_key(self) -> str:
        """A plain string naming the item's pixels: kind, content hash and settings."""
        return media_cache_key(self.kind, self.content_hash, self.settings)

    @property
    def has_pixels(self) -> bool:
        """Whether `pixels()` is free (made already) rather than a decode and preprocess."""
        return self.pixel_values is not None

    def pixels(self) -> torch.Tensor:
        """float32 [num_tiles, 3, T, T]: pixel_values, made from the pixel source on first use
        (then kept, and the source, which holds the source bytes, dropped). Not thread-safe: the
        processor's worker or the engine thread calls it, never both."""
        if self.pixel_values is None:
            if self.pixel_source is None:
                raise RuntimeError(f"{self.kind} {self.cache_key[:32]} has no pixels to encode")
            self.pixel_values = self.pixel_source()
            self.pixel_source = None
        return self.pixel_values


@dataclass
class ProcessedPrompt:
    """A conversation turned into prompt token ids plus its media, ready for the model runner."""

    prompt_token_ids: list[int]
    media: list[MediaItem]
    prompt_text: str  # the rendered template, media placeholders unexpanded (for logs)
