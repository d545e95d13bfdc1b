"""Engine-side request types: a processed prompt and the media items inside it.

Every media item carries its content hash from the moment its bytes are read, plus the
preprocessing settings that change its pixels; `cache_key` (hash + settings) is what the prefix
cache and the vision-encoder cache key on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class MediaItem:
    """One image or video in a prompt, with the token range its features fill."""

    kind: Literal["image", "video"]
    content_hash: str  # sha256 of the source bytes (or of the decoded pixels for in-memory media)
    settings: tuple  # preprocessing settings that change the pixels, e.g. ("tiles", 448, 36)
    num_tiles: int  # image: thumbnail + grid tiles; video: sampled frames
    num_tokens: int  # placeholder tokens in the prompt: num_tiles * tokens per tile
    offset: int = -1  # index of the item's first placeholder token in the prompt
    pixel_values: torch.Tensor | None = None  # [num_tiles, 3, T, T] float32, normalised
    meta: dict = field(default_factory=dict)  # e.g. source size, frame indices; for logs, not keys

    @property
    def cache_key(self) -> str:
        return f"{self.kind}:{self.content_hash}:{':'.join(map(str, self.settings))}"

    @property
    def token_range(self) -> range:
        return range(self.offset, self.offset + self.num_tokens)


@dataclass
class ProcessedPrompt:
    """A conversation turned into prompt token ids plus its media, ready for the model runner."""

    prompt_token_ids: list[int]
    media: list[MediaItem]
    prompt_text: (
        str  # the rendered template, media placeholders unexpanded (for logs and debugging)
    )

    @property
    def num_media_tokens(self) -> int:
        return sum(m.num_tokens for m in self.media)
