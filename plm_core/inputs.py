"""Engine-side request types: a processed prompt and the media items inside it.

Every media item carries its content hash from the moment its bytes are read, plus the typed
settings that change its pixels; `cache_key` (kind, hash and settings) is what the prefix cache and
the vision-encoder cache key on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from plm_core.media.settings import ImageSettings, MediaSettings, VideoSettings

if TYPE_CHECKING:
    import torch

__all__ = ["ImageSettings", "MediaItem", "MediaSettings", "ProcessedPrompt", "VideoSettings"]


@dataclass
class MediaItem:
    """One image or video in a prompt, with the token range its features fill."""

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

    @property
    def cache_key(self) -> str:
        """A plain string naming the item's pixels: kind, content hash and settings."""
        return f"{self.kind}:{self.content_hash}:{self.settings.key}"


@dataclass
class ProcessedPrompt:
    """A conversation turned into prompt token ids plus its media, ready for the model runner."""

    prompt_token_ids: list[int]
    media: list[MediaItem]
    prompt_text: str  # the rendered template, media placeholders unexpanded (for logs)
