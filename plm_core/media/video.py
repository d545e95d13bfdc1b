"""Video probing, HF-equal frame sampling, sparse PyAV decoding of the sampled frames, and frame preprocessing."""

from __future__ import annotations

import functools
import hashlib
import io
import math
import numbers
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from plm_core.media.errors import MediaError
from plm_core.media.image import (
    _as_triple,
    _describe,
    _fused_mean_std,
    _normalize_into,
    _resize,
    check_image_side,
    empty_output,
)

VideoSource = bytes | bytearray | memoryview | str | os.PathLike

# Containers we let FFmpeg parse (by magic bytes), with the demuxer to force; playlists, image
# sequences and other protocol-following demuxers are never probed on untrusted input.
_SEEKABLE_FORMATS = {"mov", "matroska", "avi"}  # demuxers with an index: seeking lands on keyframes
_MAX_SEEK_RETRIES = 8
# Frames x width x height decoded per video by default: 32 frames of 4K (3840x2160) fit, 64 do not.
DEFAULT_MAX_DECODED_PIXELS = 2**28


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream, read without decoding frames."""

    num_frames: (
        int  # from the stream header, else counted from the demuxed packets (MKV/WebM, MPEG-TS)
    )
    fps: float  # average frame rate (what HF's PyAV reader uses)
    duration_s: float  # the video stream's own duration (not the container's, which may be audio's)
    width: int
    height: int
    codec: str


@dataclass
class _DecodeStats:
    """How a decode went (for tests and benchmarks): frames out of the decoder, seeks, path taken."""

    decoded: int = 0
    seeks: int = 0
    mode: str = ""


class _Unreliable(Exception):
    """Timestamps cannot be trusted to give frame numbers: decode sequentially instead."""


class _StreamEnded(MediaError):
    """The stream held fewer frames than the indices asked for; `frames` is how many it held."""

    def __init__(self, wanted: int, frames: int):
        super().__init__(f"unsupported or corrupt video: it ended before frame {wanted}")
        self.frames = frames


@dataclass(frozen=True)
class _PacketScan:
    """The video stream's packets, demuxed without decoding, for containers with no frame count."""

    count: (
        int  # packets that carry a frame (not empty, not flagged discard): one decoded frame each
    )
    duration_s: float  # from the first timestamp to the end of the last frame
    regular: bool  # every timestamp sits on the constant-rate grid, numbering the frames 0..count-1


# -- opening --------------------------------------------------------------------------------------


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


class _Source:
    """Opens fresh containers on the same bytes or file; the container format is fixed up front."""

    def __init__(self, source: VideoSource):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.data: bytes | None = bytes(source)
            self.path: str | None = None
            head = self.data[:512]
        elif isinstance(source, (str, os.PathLike)):
            self.data, self.path = None, os.fspath(source)
            try:
                with open(self.path, "rb") as f:
                    head = f.read(512)
            except OSError as e:
                raise MediaError(
                    f"cannot read video file: {e.strerror or type(e).__name__}"
                ) from None
        else:
            raise MediaError(f"video source must be bytes or a path, got {type(source).__name__}")
        if not head:
            raise MediaError("video data is empty")
        self.format = _sniff_container(head)
        if self.format is None:
            raise MediaError(
                "unsupported or corrupt video: not an MP4/MOV, WebM/MKV, AVI or MPEG-TS file"
            )
        self._scan: _PacketScan | None = None  # demuxed on demand, once

    def open(self) -> av.container.InputContainer:
        try:
            target = io.BytesIO(self.data) if self.data is not None else self.path
            return av.open(target, mode="r", format=self.format)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise MediaError(f"unsupported or corrupt video: {_describe(e)}") from None

    def scan(self) -> _PacketScan:
        """The video stream's packets (demuxed once, decoded never); see _scan_packets."""
        if self._scan is None:
            container = self.open()
            try:
                self._scan = _scan_packets(_video_stream(container), container)
            except (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError) as e:
                raise MediaError(f"unsupported or corrupt video: {_describe(e)}") from None
            finally:
                container.close()
        return self._scan


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError("unsupported or corrupt video: no video stream")
    return container.streams.video[0]


def _scan_packets(stream, container: av.container.InputContainer) -> _PacketScan:
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
    duration = float((end - min(stamps)) * tb) if stamps and tb else 0.0
    regular = bool(stamps) and not untimed and bool(rate) and bool(tb)
    if regular:
        stamps.sort()
        step, anchor = float(1 / (Fraction(rate) * Fraction(tb))), stamps[0]
        regular = all(abs((pts - anchor) / step - k) <= 0.25 for k, pts in enumerate(stamps))
    return _PacketScan(count=count, duration_s=duration, regular=regular)


def _read_info(
    container: av.container.InputContainer, stream, scan: _PacketScan | None = None
) -> VideoInfo:
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
        num_frames = (
            scan.count if scan is not None else (math.floor(duration * fps + 1e-3) if fps else 0)
        )
    codec = stream.codec_context.name if stream.codec_context else ""
    return VideoInfo(
        num_frames=num_frames,
        fps=fps,
        duration_s=duration,
        width=int(stream.width or 0),
        height=int(stream.height or 0),
        codec=codec,
    )


def _open_info(src: _Source) -> VideoInfo:
    """The first video stream's info; containers without a frame count have their packets counted."""
    container = src.open()
    try:
        stream = _video_stream(container)
        return _read_info(container, stream, None if stream.frames else src.scan())
    finally:
        container.close()


def probe_video(source: VideoSource) -> VideoInfo:
    """Frame count, rate, duration, size and codec of the first video stream; decodes nothing.

    Where the container has no frame count (Matroska/WebM, MPEG-TS), the packets are demuxed and
    counted, so the count and duration are the video stream's own, whatever the audio's length.
    """
    return _open_info(_Source(source))


# -- sampling -------------------------------------------------------------------------------------


def _is_positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def sample_frame_indices(
    total_frames: int,
    *,
    num_frames: int | None = 32,
    fps: float | None = None,
    video_fps: float | None = None,
) -> list[int]:
    """HF's `default_sample_indices_fn`: i * T // N for i < N, or N = int(T / video_fps * fps).

    num_frames and fps are exclusive (pass num_frames=None with fps); neither gives every frame.
    Asking for more frames than the video has gives every frame once (HF raises instead), so a
    clip shorter than the default 32 frames still works. fps and video_fps must be positive finite
    numbers and num_frames a positive integer (booleans are refused).
    """
    if num_frames is not None and fps is not None:
        raise MediaError(
            "num_frames and fps are mutually exclusive; give one (num_frames=None with fps)"
        )
    if total_frames <= 0:
        raise MediaError("video has no frames")
    if fps is not None:
        if not _is_positive_finite(fps):
            raise MediaError(f"fps must be a positive finite number, got {fps!r}")
        if not _is_positive_finite(video_fps):
            raise MediaError(
                "the video's frame rate is unknown, so frames cannot be sampled by fps"
            )
        wanted = total_frames / video_fps * fps  # a float, inf at worst: clamp before int()
        num_frames = max(1, int(min(wanted, total_frames)))
    if num_frames is None:
        return list(range(total_frames))
    if (
        isinstance(num_frames, bool)
        or not isinstance(num_frames, numbers.Integral)
        or num_frames <= 0
    ):
        raise MediaError(f"num_frames must be a positive integer, got {num_frames!r}")
    num_frames = min(num_frames, total_frames)
    return [i * total_frames // num_frames for i in range(num_frames)]


# -- decoding -------------------------------------------------------------------------------------


def decode_video_frames(
    source: VideoSource,
    *,
    num_frames: int | None = 32,
    fps: float | None = None,
    max_frames: int | None = None,
    max_duration_s: float | None = None,
    max_pixels_per_frame: int | None = None,
    max_side: int | None = None,
    max_decoded_pixels: int | None = None,
    clamp_frames: bool = False,
) -> tuple[torch.Tensor, VideoInfo, list[int]]:
    """Decodes only the HF-sampled frames: (uint8 [F, 3, H, W], info, frame indices).

    The frames tensor is a view of [F, H, W, 3] memory (channels-last), as PyAV's RGB frames come.

    Limits are checked from the metadata before any frame is decoded: max_frames caps the number of
    sampled frames (over it: an error, or with clamp_frames, max_frames frames sampled uniformly),
    max_duration_s the video's length, max_pixels_per_frame its width * height, max_side its longest
    side, and max_decoded_pixels the frames to decode times width * height.
    Frame i is the i-th frame a full sequential decode yields, as in HF's PyAV reader. Where the
    container has no frame count (Matroska/WebM, MPEG-TS) the packets are counted first (one frame
    each), and the frames are decoded in order unless every timestamp sits on the constant-rate
    grid; if the stream then ends before a sampled index (packets without a frame), the frames are
    sampled again over those it held.
    """
    src = _Source(source)
    info = _open_info(src)
    if max_duration_s is not None and info.duration_s > max_duration_s:
        raise MediaError(
            f"video is {info.duration_s:.1f} s long, over the limit of {max_duration_s:g} s"
        )
    if max_pixels_per_frame is not None and info.width * info.height > max_pixels_per_frame:
        raise MediaError(
            f"video frames are {info.width}x{info.height}, over the limit of "
            f"{max_pixels_per_frame} pixels"
        )
    check_image_side(info.width, info.height, max_side, what="video frame")
    if info.num_frames <= 0:
        raise MediaError(
            "unsupported or corrupt video: no video frames found (the file may be truncated)"
        )

    def choose(total: int) -> list[int]:
        indices = sample_frame_indices(total, num_frames=num_frames, fps=fps, video_fps=info.fps)
        if max_frames is not None and len(indices) > max_frames and clamp_frames:
            indices = sample_frame_indices(total, num_frames=max_frames, video_fps=info.fps)
        if max_frames is not None and len(indices) > max_frames:
            raise MediaError(
                f"video would sample {len(indices)} frames, over the limit of {max_frames}"
            )
        return indices

    indices = choose(info.num_frames)
    check_decoded_pixels(len(indices), info.width, info.height, max_decoded_pixels)
    try:
        frames, indices, _ = _decode_indices(src, indices, max_decoded_pixels=max_decoded_pixels)
    except _StreamEnded as e:
        if src._scan is None or e.frames < 1:  # a frame count from the header is not second-guessed
            raise
        info = replace(info, num_frames=e.frames)
        frames, indices, _ = _decode_indices(
            src, choose(e.frames), allow_seek=False, max_decoded_pixels=max_decoded_pixels
        )
    return frames, info, indices


def check_decoded_pixels(frames: int, width: int, height: int, limit: int | None) -> None:
    """Raises MediaError if decoding this many frames of this size is over the pixel budget."""
    if limit is not None and frames * width * height > limit:
        raise MediaError(
            f"decoding {frames} frames of {width}x{height} would take {frames * width * height} "
            f"pixels, over the per-video limit of {limit}; ask for fewer frames (num_frames or fps) "
            "or send a smaller video"
        )


class _FrameSink:
    """The wanted frames' RGB pixels, written as they are decoded into one uint8 [F, H, W, 3] buffer.

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
        self.buffer[self.slots[index]].copy_(torch.from_numpy(rgb))
        self.filled.add(index)

    def frames(self, indices: list[int]) -> torch.Tensor:
        """uint8 [len(indices), 3, H, W] (channels-last memory); copies only for repeats or reordering."""
        order = [self.slots[i] for i in indices]
        out = (
            self.buffer
            if order == list(range(len(self.slots)))
            else self.buffer[torch.tensor(order)]
        )
        return out.permute(0, 3, 1, 2)


def _decode_indices(
    src: _Source,
    indices: Sequence[int],
    *,
    allow_seek: bool = True,
    max_decoded_pixels: int | None = None,
) -> tuple[torch.Tensor, list[int], _DecodeStats]:
    """Frames at these indices (any order, repeats allowed) -> (uint8 [F, 3, H, W], indices, stats).

    If the stream ends before the last index, raises _StreamEnded (a MediaError) with the number of
    frames it held. max_decoded_pixels bounds the buffer from the first decoded frame's real size.
    """
    wanted = sorted(set(indices))
    stats = _DecodeStats()
    sink = _FrameSink(wanted, max_decoded_pixels)
    done = False
    try:
        if allow_seek and src.format in _SEEKABLE_FORMATS:
            try:
                _decode_seeking(src, wanted, sink, stats)
                done, stats.mode = True, "seek"
            except _Unreliable:
                sink.filled.clear()  # stats keep the work the attempt cost; slots are rewritten
        if not done:
            frames_in_stream = _decode_sequential(src, wanted, sink, stats)
            stats.mode = "sequential"
            if len(sink) < len(wanted):
                if not len(sink):
                    raise MediaError("unsupported or corrupt video: no frame could be decoded")
                raise _StreamEnded(wanted[len(sink)], frames_in_stream)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise MediaError(f"unsupported or corrupt video: {_describe(e)}") from None
    indices = list(indices)
    return sink.frames(indices), indices, stats


def _to_rgb(reformatter: VideoReformatter, frame: av.VideoFrame) -> np.ndarray:
    """frame.to_ndarray(format="rgb24") (the same swscale call), reusing one scaler: [H, W, 3] uint8."""
    return reformatter.reformat(frame, format="rgb24").to_ndarray()


def _configure_decoder(stream, threads: int = 0) -> None:
    """threads=0: FFmpeg's frame + slice threads (output is bit-identical to one thread)."""
    if threads == 1:
        stream.thread_count = 1
    else:
        stream.thread_type = "AUTO"
        stream.thread_count = threads


def _decode_sequential(
    src: _Source, wanted: list[int], sink: _FrameSink, stats: _DecodeStats
) -> int:
    """Decodes from the start, counting frames, and stops after the last wanted index (HF's way).

    Returns the number of frames decoded: the stream's length if it ended before the last index.
    """
    container = src.open()
    try:
        stream = _video_stream(container)
        _configure_decoder(stream)
        need, last = set(wanted), wanted[-1]
        reformatter = VideoReformatter()
        count = 0
        for i, frame in enumerate(container.decode(stream)):
            stats.decoded += 1
            count = i + 1
            if i in need:
                sink.put(i, _to_rgb(reformatter, frame))
            if i >= last:
                break
        return count
    finally:
        container.close()


class _FrameClock:
    """Maps timestamps to frame numbers on a constant-rate grid anchored at the first frame."""

    def __init__(self, stream):
        if not stream.average_rate or not stream.time_base:
            raise _Unreliable
        if stream.frames and stream.duration:
            step = 1 / (stream.average_rate * stream.time_base)
            if abs(stream.frames * step - stream.duration) > step:
                raise _Unreliable  # frame count and duration disagree: not a constant-rate grid
        self.step = 1 / (
            Fraction(stream.average_rate) * Fraction(stream.time_base)
        )  # ticks per frame
        self._step = float(self.step)
        self.anchor = 0  # the first frame's timestamp, set by the caller

    def index(self, pts: int | None) -> int | None:
        """The frame number of a timestamp, or None if it is not on the grid."""
        if pts is None:
            return None
        exact = (pts - self.anchor) / self._step
        i = round(exact)
        return i if abs(exact - i) <= 0.25 else None

    def pts(self, index: int) -> int:
        return self.anchor + math.floor(index * self.step + Fraction(1, 2))


@dataclass
class _Run:
    """Wanted frames decoded in one pass from one keyframe (seek_ts None: from the start)."""

    keyframe: int
    seek_ts: int | None
    targets: list[int]


def _decode_seeking(src: _Source, wanted: list[int], sink: _FrameSink, stats: _DecodeStats) -> None:
    """Decodes the wanted frames, seeking past stretches without any and skipping unneeded B-frames.

    A demux-only container plans the work: the keyframe before each wanted frame, grouped into runs
    that each start at a keyframe beyond the previous run's end. Contiguous groups of runs go to up
    to torch.get_num_threads() decoders in parallel. Frame numbers come from timestamps; anything
    off the constant-rate grid, out of order or missing raises _Unreliable. Without a frame count
    in the header (Matroska/WebM) a gap in the timestamps would go unnoticed between two decoded
    frames, so every packet's timestamp is checked against the grid first.
    """
    probe = src.open()
    try:
        stream = _video_stream(probe)
        if not stream.frames and not src.scan().regular:
            raise _Unreliable
        clock = _FrameClock(stream)
        clock.anchor = _first_pts(probe, stream)
        runs = _plan_runs(probe, stream, clock, wanted)
    finally:
        probe.close()
    workers = min(torch.get_num_threads(), os.cpu_count() or 1, len(runs))
    parts = _split_runs(runs, workers)
    need = set(wanted)
    decoded = [0] * len(parts)
    seeks = [0] * len(parts)

    def work(k: int) -> None:
        dec = _Decoder(
            src, clock, need, threads=1 if len(parts) > 1 else 0
        )  # one thread per decoder
        try:
            if k == 0:
                dec.start(sink)  # checks that frame 0 sits where the grid says
            for run in parts[k]:
                if run.keyframe > dec.current + 1:
                    dec.seek(run)
                    seeks[k] += 1
                for target in run.targets:
                    if target not in sink:  # each target belongs to one part's runs
                        sink.put(target, dec.decode(target))
        finally:
            decoded[k] = dec.decoded
            dec.close()

    try:
        _run_parallel([functools.partial(work, k) for k in range(len(parts))])
    finally:
        stats.decoded += sum(decoded)
        stats.seeks += sum(seeks)


def _first_pts(probe, stream) -> int:
    """The smallest timestamp among the first GOP's kept packets: frame 0's, checked on decode."""
    stamps = []
    for n, packet in enumerate(probe.demux(stream)):
        if packet.pts is None and packet.size:
            raise _Unreliable
        if (packet.is_keyframe and stamps) or n >= 64 or packet.pts is None:
            break
        if not packet.is_discard:
            stamps.append(packet.pts)
    if not stamps:
        raise _Unreliable
    return min(stamps)


def _plan_runs(probe, stream, clock: _FrameClock, wanted: list[int]) -> list[_Run]:
    runs: list[_Run] = []
    for target in wanted:
        if runs and target <= runs[-1].targets[-1] + 1:
            runs[-1].targets.append(target)  # the very next frame: keep decoding
            continue
        keyframe, seek_ts = (
            (0, None) if target == 0 else _keyframe_before(probe, stream, clock, target)
        )
        if runs and keyframe <= runs[-1].targets[-1] + 1:
            runs[-1].targets.append(target)  # no keyframe in between: keep decoding
        else:
            runs.append(_Run(keyframe, seek_ts, [target]))
    return runs


def _split_runs(runs: list[_Run], parts: int) -> list[list[_Run]]:
    """Contiguous groups of runs with about equal frames to decode each."""
    costs = [run.targets[-1] - run.keyframe + 1 for run in runs]
    total = sum(costs)
    groups: list[list[_Run]] = [[]]
    done = 0
    for run, cost in zip(runs, costs):
        if groups[-1] and len(groups) < parts and done + cost / 2 > total * len(groups) / parts:
            groups.append([])
        groups[-1].append(run)
        done += cost
    return groups


def _keyframe_before(probe, stream, clock: _FrameClock, target: int) -> tuple[int, int]:
    """(frame number, seek timestamp) of the last keyframe at or before the target frame."""
    target_pts = clock.pts(target)
    ts = target_pts
    for _ in range(_MAX_SEEK_RETRIES):
        probe.seek(ts, stream=stream, backward=True, any_frame=False)
        packet = next(
            (p for _, p in zip(range(16), probe.demux(stream)) if p.pts is not None), None
        )
        if packet is None or not packet.is_keyframe:
            raise _Unreliable
        if packet.pts <= target_pts:
            i = clock.index(packet.pts)
            if i is None:
                raise _Unreliable
            return i, ts
        # index timestamps can be decode times: a keyframe shown after the target; step back
        ts = min(ts, packet.dts if packet.dts is not None else packet.pts) - 1
    raise _Unreliable


class _Decoder:
    """One container decoding forward to wanted frames; unneeded packets get skip_frame=NONREF,
    which drops a frame only if no other frame references it."""

    def __init__(self, src: _Source, clock: _FrameClock, need: set[int], threads: int):
        self.container = src.open()
        self.stream = _video_stream(self.container)
        _configure_decoder(self.stream, threads)
        self.clock, self.need = clock, need
        self.reformatter = VideoReformatter()
        self.decoded = 0
        self.current = -1  # the furthest frame number decoded
        self.last = -1  # the previous frame number out of this stretch of decoding
        self.frames = self._frames()

    def _frames(self) -> Iterator[av.VideoFrame]:
        ctx = self.stream.codec_context
        for packet in self.container.demux(self.stream):
            i = self.clock.index(packet.pts)
            ctx.skip_frame = "NONREF" if i is not None and i not in self.need else "DEFAULT"
            for frame in ctx.decode(packet):
                self.decoded += 1
                yield frame

    def start(self, sink: _FrameSink) -> None:
        """Decodes frame 0 from the start of the stream and checks its timestamp is the anchor."""
        first = next(self.frames, None)
        if first is None or first.pts != self.clock.anchor:
            raise _Unreliable
        if 0 in self.need:
            sink.put(0, _to_rgb(self.reformatter, first))
        self.current = self.last = 0

    def seek(self, run: _Run) -> None:
        self.container.seek(run.seek_ts, stream=self.stream, backward=True, any_frame=False)
        self.frames = self._frames()
        self.current, self.last = run.keyframe - 1, -1

    def decode(self, target: int) -> np.ndarray:
        for frame in self.frames:
            i = self.clock.index(frame.pts)
            if i is None or i <= self.last:
                raise _Unreliable
            self.last = i
            if i < target:
                self.current = max(self.current, i)
                continue
            if i > target or getattr(frame, "is_corrupt", False):
                raise _Unreliable  # the target frame never came out whole
            self.current = i
            return _to_rgb(self.reformatter, frame)
        raise _Unreliable  # ran out of frames before the target

    def close(self) -> None:
        self.container.close()


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _run_parallel(tasks: list) -> None:
    """Runs the tasks on the calling thread plus up to torch.get_num_threads() - 1 pool threads.

    Returns (or raises the first error) only when every task has finished.
    """
    global _POOL
    extra = min(torch.get_num_threads(), len(tasks), os.cpu_count() or 1) - 1
    if extra <= 0:
        for task in tasks:
            task()
        return
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="plm-video"
            )
    pending = iter(tasks)
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                task = next(pending, None)
            if task is None:
                return
            task()

    futures = [_POOL.submit(drain) for _ in range(extra)]
    error: BaseException | None = None
    try:
        drain()
    except BaseException as e:  # re-raised once every pool thread is done with the shared output
        error = e
    for f in futures:
        try:
            f.result()
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error


# -- pixels ---------------------------------------------------------------------------------------


def preprocess_video_frames(
    frames: torch.Tensor,
    *,
    tile_size: int = 448,
    mean: float | Sequence[float] = (0.5, 0.5, 0.5),
    std: float | Sequence[float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """uint8 [F, 3, H, W] -> float32 [F, 3, T, T]: each frame squashed to T x T and normalized (HF's pixels)."""
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise MediaError(
            f"expected uint8 frames [F, 3, H, W], got {tuple(frames.shape)} {frames.dtype}"
        )
    m, s = _fused_mean_std(_as_triple(mean), _as_triple(std))
    out = empty_output((frames.shape[0], 3, tile_size, tile_size))  # [F, 3, T, T]
    for k in range(
        0, frames.shape[0], 8
    ):  # channels-last input: the fast uint8 resize, same pixels
        chunk = frames[k : k + 8].contiguous(memory_format=torch.channels_last)
        resized = _resize(chunk, tile_size, tile_size)  # [<=8, 3, T, T] uint8
        _normalize_into(out[k : k + resized.shape[0]], resized, m, s)
    return out


def video_content_hash(data: bytes) -> str:
    """sha256 hex of a video's source bytes."""
    return hashlib.sha256(data).hexdigest()
