"""The typed settings that decide a media item's pixels besides its content.

`key` is their part of the item's cache key (prefix cache and vision-encoder cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

THUMB_AND_TILES = "thumb+tile"  # HF's vision_input_type for a thumbnail followed by a tile grid


@dataclass(frozen=True)
class ImageSettings:
    """How an image becomes tiles. With vision_input_type "thumb+tile": a tile_size thumbnail, then
    a grid of at most max_num_tiles tiles; with any other value, one squashed tile."""

    tile_size: int = 448
    # grid budget, the thumbnail not counted (unused when not tiled)
    max_num_tiles: int = 36
    vision_input_type: str = THUMB_AND_TILES

    @classmethod
    def thumbnail(cls, tile_size: int) -> ImageSettings:
        """The thumbnail alone (detail "low")."""
        return cls(tile_size, 1, "thumbnail")

    @property
    def tiled(self) -> bool:
        return self.vision_input_type == THUMB_AND_TILES

    @property
    def key(self) -> str:
        if self.tiled:
            return f"tiles:{self.tile_size}:{self.max_num_tiles}"
        return f"single:{self.tile_size}"


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video are taken: num_frames spread evenly (HF's i * T // N), or `fps`
    frames per second of video (with num_frames None), or every frame when both are None; never
    more than max_frames (more are sampled again, evenly, down to max_frames)."""

    num_frames: int | None = 32
    fps: float | None = None
    max_frames: int | None = None
    # the frame rate of in-memory frames, which sampling by fps needs (a container states its own)
    video_fps: float | None = None

    @property
    def key(self) -> str:
        cap = "" if self.max_frames is None else f":max{self.max_frames}"
        if self.fps is not None:
            rate = "" if self.video_fps is None else f":at{self.video_fps!r}"
            return f"fps{self.fps!r}{rate}{cap}"
        if self.num_frames is None:
            return f"all{cap}"
        n = self.num_frames if self.max_frames is None else min(self.num_frames, self.max_frames)
        return f"n{n}"


@dataclass(frozen=True)
class VideoSettings:
    """How a video becomes frames: which frames are sampled, each squashed to frame_size."""

    frame_size: int = 448
    sampling: FrameSampling = field(default_factory=FrameSampling)

    @property
    def key(self) -> str:
        return f"frames:{self.frame_size}:{self.sampling.key}"


MediaSettings = ImageSettings | VideoSettings
