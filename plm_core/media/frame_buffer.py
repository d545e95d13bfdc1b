"""Where decoded video frames land: one uint8 buffer, within the decoded-pixel budget.

Any number of decoder threads fill it; `to_rgb` and `DecodeStats` serve both decoders.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plm_core.media.errors import MediaError


@dataclass
class DecodeStats:
    """How a decode went (for tests and benchmarks): frames out of the decoder, seeks, path."""

    decoded: int = 0
    seeks: int = 0
    mode: str = ""  # "seek" or "sequential"


def check_decoded_pixels(frames: int, width: int, height: int, limit: int | None) -> None:
    """Raises MediaError if decoding this many frames of this size is over the pixel budget."""
    if limit is not None and frames * width * height > limit:
        raise MediaError(
            f"decoding {frames} frames of {width}x{height} would take {frames * width * height} "
            f"pixels, over the per-video limit of {limit}; ask for fewer frames "
            "(num_frames or fps) or send a smaller video"
        )


def to_rgb(reformatter: Any, frame: Any) -> np.ndarray:
    """frame.to_ndarray(format="rgb24") (the same swscale call), reusing one VideoReformatter:
    [H, W, 3] uint8."""
    return reformatter.reformat(frame, format="rgb24").to_ndarray()


class FrameBuffer:
    """The wanted frames' RGB pixels, written as they are decoded into one uint8 [F, H, W, 3]
    buffer.

    Slot k holds the k-th wanted index. The buffer is allocated at the first frame, from its size,
    so no frame is held twice; decoders on several threads fill disjoint slots.
    """

    def __init__(self, wanted: list[int], max_decoded_pixels: int | None = None):
        self.slots = {i: k for k, i in enumerate(wanted)}
        self.max_decoded_pixels = max_decoded_pixels
        self.buffer: torch.Tensor | None = None  # [F, H, W, 3]
        self.filled: set[int] = set()
        self._lock = threading.Lock()

    def __contains__(self, index: int) -> bool:
        return index in self.filled

    def __len__(self) -> int:
        return len(self.filled)

    def put(self, index: int, rgb: np.ndarray) -> None:
        """Stores frame `index` ([H, W, 3] uint8); every frame must have the first one's size."""
        with self._lock:
            if self.buffer is None:
                h, w = rgb.shape[:2]
                check_decoded_pixels(len(self.slots), w, h, self.max_decoded_pixels)
                self.buffer = torch.empty((len(self.slots), h, w, 3), dtype=torch.uint8)
            elif tuple(rgb.shape) != tuple(self.buffer.shape[1:]):
                raise MediaError("unsupported video: the frame size changes within the stream")
            buffer = self.buffer
        buffer[self.slots[index]].copy_(torch.from_numpy(rgb))
        self.filled.add(index)

    def frames(self, indices: list[int]) -> torch.Tensor:
        """uint8 [len(indices), 3, H, W] (channels-last memory); copies only for repeats or
        reordering."""
        if self.buffer is None:
            raise MediaError("unsupported or corrupt video: no frame could be decoded")
        order = [self.slots[i] for i in indices]
        out = (
            self.buffer
            if order == list(range(len(self.slots)))
            else self.buffer[torch.tensor(order)]
        )
        return out.permute(0, 3, 1, 2)
