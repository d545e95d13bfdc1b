"""Synthetic test videos whose frames all differ, and the plain full PyAV decode to compare with."""

from __future__ import annotations

import functools
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


def _pattern_frame(x: np.ndarray, y: np.ndarray, i: int) -> av.VideoFrame:
    """Frame i of a test video: a colour pattern that differs in every frame (x, y: np.mgrid of
    the size)."""
    arr = np.stack([(x * 4 + i * 7) % 256, (y * 5 + i * 3) % 256, ((x + y) * 2 + i * 11) % 256], -1)
    return av.VideoFrame.from_ndarray(arr.astype(np.uint8), format="rgb24")


def write_video(
    path: Path,
    *,
    n: int = 90,
    size=(64, 48),
    fps: int = 25,
    codec: str = "libx264",
    fmt: str | None = None,
    gop: int = 10,
    bframes: int = 2,
    pts_ms: list[int] | None = None,
) -> Path:
    """A small synthetic video whose frames all differ (moving gradients)."""
    container = av.open(str(path), mode="w", format=fmt)
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = gop
    stream.codec_context.max_b_frames = bframes
    if codec == "libx264":
        stream.options = {
            "preset": "veryfast",
            "bf": str(bframes),
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
        }
    if pts_ms is not None:
        stream.codec_context.time_base = Fraction(1, 1000)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    for i in range(n):
        frame = _pattern_frame(x, y, i)
        if pts_ms is not None:
            frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@functools.cache
def full_decode(path: str) -> torch.Tensor:
    """Every frame, in order, the plain PyAV way HF's reader uses: uint8 [T, 3, H, W]."""
    container = av.open(path)
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    container.close()
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


def write_av(
    path: Path,
    *,
    n: int = 60,
    fps: int = 30,
    codec: str = "libx264",
    audio_s: float = 0.0,
    audio_codec: str = "aac",
    skip_pts: tuple[int, ...] = (),
    size=(64, 48),
) -> Path:
    """A video whose frames all differ, optionally with an audio track of audio_s seconds (longer
    than the video) and with timestamps in skip_pts left out (a dropped frame)."""
    container = av.open(str(path), mode="w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        stream.options = {"preset": "veryfast", "g": "10", "keyint_min": "10", "sc_threshold": "0"}
    audio = container.add_stream(audio_codec, rate=48000) if audio_s else None
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    pts = [p for p in range(n + len(skip_pts)) if p not in skip_pts]
    for i, p in enumerate(pts):
        frame = _pattern_frame(x, y, i)
        frame.pts, frame.time_base = p, Fraction(1, fps)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    if audio is not None:
        samples, chunk = int(audio_s * 48000), 960
        tone = (0.2 * np.sin(np.arange(samples) * 2 * np.pi * 440 / 48000)).astype(np.float32)
        for k in range(0, samples - chunk + 1, chunk):
            af = av.AudioFrame.from_ndarray(tone[None, k : k + chunk], format="flt", layout="mono")
            af.sample_rate, af.pts, af.time_base = 48000, k, Fraction(1, 48000)
            for packet in audio.encode(af):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    container.close()
    return path
