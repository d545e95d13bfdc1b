"""Decoding a video's sampled frames: limits from the probe, then seeking or sequential.

The seeking decoder is tried where the container has an index; where timestamps cannot be
trusted, frames are decoded in order. Frame i is the i-th frame a full decode yields, as in
HF's PyAV reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from av.video.reformatter import VideoReformatter

from plm_core.config import MediaConfig
from plm_core.media.containers import (
    DECODE_ERRORS,
    SEEKABLE_FORMATS,
    ContainerSource,
    VideoInfo,
    VideoSource,
    configure_decoder,
    video_stream,
)
from plm_core.media.errors import MediaError, describe_error
from plm_core.media.frame_buffer import DecodeStats, FrameBuffer, check_decoded_pixels, to_rgb
from plm_core.media.image import check_image_side
from plm_core.media.sampling import choose_frame_indices
from plm_core.media.seek_decoder import Unreliable, decode_seeking
from plm_core.media.settings import FrameSampling


class StreamEnded(MediaError):
    """The stream held fewer frames than the indices asked for; `frames` is how many it held."""

    def __init__(self, wanted: int, frames: int):
        super().__init__(f"unsupported or corrupt video: it ended before frame {wanted}")
        self.frames = frames


def check_video_limits(info: VideoInfo, limits: MediaConfig) -> None:
    """Raises MediaError for a video over the duration, frame-size or side limits, or with no
    frames; all read from the container, before anything is decoded."""
    if limits.max_video_duration and info.duration_s > limits.max_video_duration:
        raise MediaError(
            f"video is {info.duration_s:.1f} s long, over the limit of "
            f"{limits.max_video_duration:g} s"
        )
    if info.width * info.height > limits.max_image_pixels:
        raise MediaError(
            f"video frames are {info.width}x{info.height}, over the limit of "
            f"{limits.max_image_pixels} pixels"
        )
    check_image_side(info.width, info.height, limits.max_image_side, what="video frame")
    if info.num_frames <= 0:
        raise MediaError(
            "unsupported or corrupt video: no video frames found (the file may be truncated)"
        )


def decode_video_frames(
    source: VideoSource,
    sampling: FrameSampling = FrameSampling(),
    limits: MediaConfig | None = None,
) -> tuple[torch.Tensor, VideoInfo, list[int]]:
    """Decodes only the sampled frames: (uint8 [F, 3, H, W], info, frame indices).

    The frames tensor is a view of [F, H, W, 3] memory (channels-last), as PyAV's RGB frames come.
    `limits` (default: MediaConfig's defaults) are checked from the metadata before any frame is
    decoded: the video's duration, its frame size and longest side, and the frames to decode times
    width * height (max_video_pixels). Where the container has no frame count (Matroska/WebM,
    MPEG-TS) the packets are counted first (one frame each); if the stream then ends before a
    sampled index (packets without a frame), the frames are sampled again over those it held.
    """
    limits = limits or MediaConfig()
    src = ContainerSource(source)
    info = src.info()
    check_video_limits(info, limits)
    budget = limits.max_video_pixels
    indices = choose_frame_indices(info.num_frames, sampling, info.fps)
    check_decoded_pixels(len(indices), info.width, info.height, budget)
    try:
        frames, _ = decode_indices(src, indices, max_decoded_pixels=budget)
    except StreamEnded as e:
        if not src.scanned or e.frames < 1:  # a frame count from the header is not second-guessed
            raise
        info = replace(info, num_frames=e.frames)
        indices = choose_frame_indices(e.frames, sampling, info.fps)
        frames, _ = decode_indices(src, indices, allow_seek=False, max_decoded_pixels=budget)
    return frames, info, indices


def decode_indices(
    src: ContainerSource,
    indices: Sequence[int],
    *,
    allow_seek: bool = True,
    max_decoded_pixels: int | None = None,
) -> tuple[torch.Tensor, DecodeStats]:
    """Frames at these indices (any order, repeats allowed) -> (uint8 [F, 3, H, W], stats).

    If the stream ends before the last index, raises StreamEnded (a MediaError) with the number of
    frames it held. max_decoded_pixels bounds the buffer from the first decoded frame's real size.
    """
    wanted = sorted(set(indices))
    stats = DecodeStats()
    sink = FrameBuffer(wanted, max_decoded_pixels)
    try:
        if allow_seek and src.format in SEEKABLE_FORMATS:
            try:
                decode_seeking(src, wanted, sink, stats)
                stats.mode = "seek"
                return sink.frames(list(indices)), stats
            except Unreliable:
                sink.filled.clear()  # stats keep the work the attempt cost; slots are rewritten
        frames_in_stream = _decode_sequential(src, wanted, sink, stats)
        stats.mode = "sequential"
        if len(sink) < len(wanted):
            if not len(sink):
                raise MediaError("unsupported or corrupt video: no frame could be decoded")
            raise StreamEnded(wanted[len(sink)], frames_in_stream)
    except MediaError:
        raise
    except DECODE_ERRORS as e:
        raise MediaError(f"unsupported or corrupt video: {describe_error(e)}") from None
    return sink.frames(list(indices)), stats


def _decode_sequential(
    src: ContainerSource, wanted: list[int], sink: FrameBuffer, stats: DecodeStats
) -> int:
    """Decodes from the start, counting frames, and stops after the last wanted index (HF's way).

    Returns the number of frames decoded: the stream's length if it ended before the last index.
    """
    container = src.open()
    try:
        stream = video_stream(container)
        configure_decoder(stream)
        need, last = set(wanted), wanted[-1]
        reformatter = VideoReformatter()
        count = 0
        for i, frame in enumerate(container.decode(stream)):
            stats.decoded += 1
            count = i + 1
            if i in need:
                sink.put(i, to_rgb(reformatter, frame))
            if i >= last:
                break
        return count
    finally:
        container.close()
