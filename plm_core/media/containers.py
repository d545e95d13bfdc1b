"""Untrusted video containers: sniffed by magic bytes, opened with that demuxer, probed.

Probing reads frame count, rate, duration and size without decoding a frame.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from plm_core.media.errors import MediaError, describe_error

VideoSource = bytes | bytearray | memoryview | str | os.PathLike
# Containers we let FFmpeg parse (by magic bytes), with the demuxer to force; playlists, image
# sequences and other protocol-following demuxers are never probed on untrusted input.
SEEKABLE_FORMATS = frozenset({"mov", "matroska", "avi"})  # indexed: seeks land on keyframes
# what PyAV raises on a bad stream
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream, read without decoding frames."""

    # from the stream header, else counted from the demuxed packets (MKV/WebM, MPEG-TS)
    num_frames: int
    fps: float  # average frame rate (what HF's PyAV reader uses)
    duration_s: float  # the video stream's own duration (not the container's, maybe audio's)
    width: int
    height: int
    codec: str


@dataclass(frozen=True)
class PacketScan:
    """The video stream's packets, demuxed without decoding, for containers with no frame count."""

    # packets that carry a frame (not empty, not flagged discard): one decoded frame each
    count: int
    duration_s: float  # from the first timestamp to the end of the last frame
    regular: bool  # every timestamp sits on the constant-rate grid, numbering frames 0..count-1


def _sniff_container(head: bytes) -> str | None:
    """The FFmpeg demuxer for the container's magic bytes, or None if not an allowed container."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if len(head) >= 377 and head[0] == 0x47 and head[188] == 0x47 and head[376] == 0x47:
        return "mpegts"
    return None


def _read_head(source: VideoSource) -> tuple[bytes | None, str | bytes | None, bytes]:
    """(data, path, first 512 bytes) of a video given as bytes or as a path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data, None, data[:512]
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, "rb") as f:
                return None, path, f.read(512)
        except OSError as e:
            raise MediaError(f"cannot read video file: {e.strerror or type(e).__name__}") from None
    raise MediaError(f"video source must be bytes or a path, got {type(source).__name__}")


class ContainerSource:
    """Opens fresh containers on the same bytes or file; the container format is fixed up front."""

    def __init__(self, source: VideoSource):
        self.data, self.path, head = _read_head(source)
        if not head:
            raise MediaError("video data is empty")
        format = _sniff_container(head)
        if format is None:
            raise MediaError(
                "unsupported or corrupt video: not an MP4/MOV, WebM/MKV, AVI or MPEG-TS file"
            )
        self.format: str = format
        self._scan: PacketScan | None = None  # demuxed on demand, once

    @property
    def scanned(self) -> bool:
        """Whether the frame count came from counting packets (the header had none)."""
        return self._scan is not None

    def open(self) -> Any:
        """A new av InputContainer on the source."""
        try:
            target = io.BytesIO(self.data) if self.data is not None else self.path
            return av.open(target, mode="r", format=self.format)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise MediaError(f"unsupported or corrupt video: {describe_error(e)}") from None

    def scan(self) -> PacketScan:
        """The video stream's packets (demuxed once, decoded never); see scan_packets."""
        if self._scan is None:
            container = self.open()
            try:
                self._scan = scan_packets(video_stream(container), container)
            except DECODE_ERRORS as e:
                raise MediaError(f"unsupported or corrupt video: {describe_error(e)}") from None
            finally:
                container.close()
        return self._scan

    def info(self) -> VideoInfo:
        """The first video stream's info; without a frame count its packets are counted."""
        container = self.open()
        try:
            stream = video_stream(container)
            return _read_info(container, stream, None if stream.frames else self.scan())
        finally:
            container.close()


def video_stream(container: Any) -> Any:
    """The container's first video stream; a MediaError if it has none."""
    if not container.streams.video:
        raise MediaError("unsupported or corrupt video: no video stream")
    return container.streams.video[0]


def configure_decoder(stream: Any, threads: int = 0) -> None:
    """threads=0: FFmpeg's frame + slice threads (output is bit-identical to one thread)."""
    if threads == 1:
        stream.thread_count = 1
    else:
        stream.thread_type = "AUTO"
        stream.thread_count = threads


def scan_packets(stream: Any, container: Any) -> PacketScan:
    """Counts the video packets that carry a frame and checks their timestamps against the grid.

    For containers without a frame count (Matroska/WebM, MPEG-TS): what torchcodec's exact mode,
    HF's default reader, counts, and what a full decode yields (one frame per packet). The
    container's duration is no substitute: it covers the longest stream, often the audio.
    """
    stamps: list[int] = []
    count, end, untimed = 0, None, False
    for packet in container.demux(stream):
        if not packet.size or packet.is_discard:  # flush packets; priming frames the decoder drops
            continue
        count += 1
        if packet.pts is None:
            untimed = True
            continue
        stamps.append(packet.pts)
        stop = packet.pts + (packet.duration or 0)
        end = stop if end is None else max(end, stop)
    tb, rate = stream.time_base, stream.average_rate
    duration = float((end - min(stamps)) * tb) if stamps and end is not None and tb else 0.0
    regular = bool(stamps) and not untimed and bool(rate) and bool(tb)
    if regular:
        stamps.sort()
        step, anchor = float(1 / (Fraction(rate) * Fraction(tb))), stamps[0]
        regular = all(abs((pts - anchor) / step - k) <= 0.25 for k, pts in enumerate(stamps))
    return PacketScan(count=count, duration_s=duration, regular=regular)


def _read_info(container: Any, stream: Any, scan: PacketScan | None = None) -> VideoInfo:
    """The stream's metadata; `scan` supplies frame count and duration where the header has none."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if scan is not None:
        duration = scan.duration_s
    elif stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = stream.frames / fps if stream.frames and fps else 0.0
    num_frames = int(stream.frames or 0)
    if num_frames <= 0:
        if scan is not None:
            num_frames = scan.count
        else:
            num_frames = math.floor(duration * fps + 1e-3) if fps else 0
    codec = stream.codec_context.name if stream.codec_context else ""
    return VideoInfo(
        num_frames=num_frames,
        fps=fps,
        duration_s=duration,
        width=int(stream.width or 0),
        height=int(stream.height or 0),
        codec=codec,
    )


def probe_video(source: VideoSource) -> VideoInfo:
    """Frame count, rate, duration, size and codec of the first video stream; decodes nothing.

    Where the container has no frame count (Matroska/WebM, MPEG-TS), the packets are demuxed and
    counted, so the count and duration are the video stream's own, whatever the audio's length.
    """
    return ContainerSource(source).info()
