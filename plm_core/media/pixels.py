"""Pixel helpers for images and frames: output buffers, bicubic resize, HF's normalise."""

from __future__ import annotations

import functools
import math
import mmap
import sys
import threading
from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import functional as tvF

RESCALE_FACTOR = 1 / 255  # HF's default `rescale_factor`


class OutputBuffers:
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


_OUTPUTS = OutputBuffers()


def empty_output(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized float32 tensor for pixel outputs; the caller must write every element."""
    return _OUTPUTS.empty(shape)


def as_triple(v: float | Sequence[float]) -> tuple[float, ...]:
    """A per-channel value (mean or std) as a tuple of three floats."""
    return tuple(float(x) for x in v) if isinstance(v, Sequence) else (float(v),) * 3


@functools.lru_cache(maxsize=16)
def fused_mean_std(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's fused rescale+normalize constants: mean/rescale and std/rescale, float32 [3, 1, 1]."""
    m = torch.tensor(mean, dtype=torch.float32) * (1.0 / RESCALE_FACTOR)
    s = torch.tensor(std, dtype=torch.float32) * (1.0 / RESCALE_FACTOR)
    return m.view(-1, 1, 1), s.view(-1, 1, 1)


def normalize_into(out: torch.Tensor, src: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> None:
    """out = (float(src) - m) / s, the same float32 ops as HF's normalize, written in place."""
    torch.sub(src, m, out=out)
    out.div_(s)


def resize_bicubic(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, height, width]: torchvision's bicubic with antialias."""
    return tvF.resize(
        x, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True
    )
