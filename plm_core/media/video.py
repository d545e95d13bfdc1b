"""Video probing, HF-equal frame sampling, sparse PyAV decoding of the sampled frames, and frame preprocessing."""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from plm_core.media.errors import MediaError
from plm_core.media.image import _as_triple, _describe, _fused_mean_std, _normalize_into, _resize, empty_output

VideoSource = bytes | bytearray | memoryview | str | os.PathLike

# Containers we let FFmpeg parse (by magic bytes), with the demuxer to force; playlists, image
# sequences and other protocol-following demuxers are never probed on untrusted input.
_SEEKABLE_FORMATS = {"mov", "matroska", "avi"}  # demuxers with an index: seeking lands on keyframes
_MAX_SEEK_RETRIES = 8


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream, read without decoding frames."""

    num_frames: int  # from the stream header, else estimated as duration * average frame rate
    fps: float  # average frame rate (what HF's PyAV reader uses)
    duration_s: float
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
                raise MediaError(f"cannot read video file: {e.strerror or type(e).__name__}") from None
        else:
            raise MediaError(f"video source must be bytes or a path, got {type(source).__name__}")
        if not head:
            raise MediaError("video data is empty")
        self.format = _sniff_container(head)
        if self.format is None:
            raise MediaError("unsupported or corrupt video: not an MP4/MOV, WebM/MKV, AVI or MPEG-TS file")

    def open(self) -> av.container.InputContainer:
        try:
            target = io.BytesIO(self.data) if self.data is not None else self.path
            return av.open(target, mode="r", format=self.format)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise MediaError(f"unsupported or corrupt video: {_describe(e)}") from None


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError("unsupported or corrupt video: no video stream")
    return container.streams.video[0]


def _read_info(container: av.container.InputContainer, stream) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = stream.frames / fps if stream.frames and fps else 0.0
    num_frames = int(stream.frames or 0)
    if num_frames <= 0:
        num_frames = math.floor(duration * fps + 1e-3) if fps else 0
    codec = stream.codec_context.name if stream.codec_context else ""
    return VideoInfo(num_frames=num_frames, fps=fps, duration_s=duration,
                     width=int(stream.width or 0), height=int(stream.height or 0), codec=codec)


def probe_video(source: VideoSource) -> VideoInfo:
    """Frame count, rate, duration, size and codec of the first video stream; decodes nothing."""
    container = _Source(source).open()
    try:
        return _read_info(container, _video_stream(container))
    finally:
        container.close()


# -- sampling -------------------------------------------------------------------------------------

def sample_frame_indices(total_frames: int, *, num_frames: int | None = 32, fps: float | None = None,
                         video_fps: float | None = None) -> list[int]:
    """HF's `default_sample_indices_fn`: i * T // N for i < N, or N = int(T / video_fps * fps).

    num_frames and fps are exclusive (pass num_frames=None with fps); neither gives every frame.
    Asking for more frames than the video has gives every frame once (HF raises instead), so a
    clip shorter than the default 32 frames still works.
    """
    if num_frames is not None and fps is not None:
        raise MediaError("num_frames and fps are mutually exclusive; give one (num_frames=None with fps)")
    if total_frames <= 0:
        raise MediaError("video has no frames")
    if fps is not None:
        if fps <= 0:
            raise MediaError(f"fps must be positive, got {fps}")
        if not video_fps:
            raise MediaError("the video's frame rate is unknown, so frames cannot be sampled by fps")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return list(range(total_frames))
    if num_frames <= 0:
        raise MediaError(f"num_frames must be positive, got {num_frames}")
    num_frames = min(num_frames, total_frames)
    return [i * total_frames // num_frames for i in range(num_frames)]


# -- decoding -------------------------------------------------------------------------------------

def decode_video_frames(source: VideoSource, *, num_frames: int | None = 32, fps: float | None = None,
                        max_frames: int | None = None, max_duration_s: float | None = None,
                        max_pixels_per_frame: int | None = None,
                        clamp_frames: bool = False) -> tuple[torch.Tensor, VideoInfo, list[int]]:
    """Decodes only the HF-sampled frames: (uint8 [F, 3, H, W], info, frame indices).

    The frames tensor is a view of [F, H, W, 3] memory (channels-last), as PyAV's RGB frames come.

    Limits are checked from the metadata before any frame is decoded: max_frames caps the number of
    sampled frames (over it: an error, or with clamp_frames, max_frames frames sampled uniformly),
    max_duration_s the video's length, max_pixels_per_frame its width * height.
    Frame i is the i-th frame a full sequential decode yields, as in HF's PyAV reader.
    """
    src = _Source(source)
    container = src.open()
    try:
        stream = _video_stream(container)
        info = _read_info(container, stream)
        info_is_estimate = not stream.frames
    finally:
        container.close()
    if max_duration_s is not None and info.duration_s > max_duration_s:
        raise MediaError(f"video is {info.duration_s:.1f} s long, over the limit of {max_duration_s:g} s")
    if max_pixels_per_frame is not None and info.width * info.height > max_pixels_per_frame:
        raise MediaError(f"video frames are {info.width}x{info.height}, over the limit of "
                         f"{max_pixels_per_frame} pixels")
    indices = sample_frame_indices(info.num_frames, num_frames=num_frames, fps=fps, video_fps=info.fps)
    if max_frames is not None and len(indices) > max_frames and clamp_frames:
        indices = sample_frame_indices(info.num_frames, num_frames=max_frames, video_fps=info.fps)
    if max_frames is not None and len(indices) > max_frames:
        raise MediaError(f"video would sample {len(indices)} frames, over the limit of {max_frames}")
    frames, indices, _ = _decode_indices(src, indices, clamp_at_end=info_is_estimate)
    return frames, info, indices


def _decode_indices(src: _Source, indices: Sequence[int], *, clamp_at_end: bool = False,
                    allow_seek: bool = True) -> tuple[torch.Tensor, list[int], _DecodeStats]:
    """Frames at these indices (any order, repeats allowed) -> (uint8 [F, 3, H, W], indices, stats).

    If the stream ends early, indices past its end become its last frame when clamp_at_end (the
    frame count was an estimate), else it is an error.
    """
    wanted = sorted(set(indices))
    stats = _DecodeStats()
    got: dict[int, np.ndarray] | None = None
    try:
        if allow_seek and src.format in _SEEKABLE_FORMATS:
            try:
                got, stats.mode = _decode_seeking(src, wanted, stats), "seek"
            except _Unreliable:
                pass  # stats keep the work the attempt cost
        if got is None:
            got, stats.mode = _decode_sequential(src, wanted, stats), "sequential"
    except (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise MediaError(f"unsupported or corrupt video: {_describe(e)}") from None
    indices = list(indices)
    if len(got) < len(wanted):
        last = max(got, default=None)
        if last is None:
            raise MediaError("unsupported or corrupt video: no frame could be decoded")
        if not clamp_at_end:
            raise MediaError(f"unsupported or corrupt video: it ended before frame {wanted[len(got)]}")
        indices = [i if i in got else last for i in indices]
    shapes = {a.shape for a in got.values()}
    if len(shapes) != 1:
        raise MediaError("unsupported video: the frame size changes within the stream")
    h, w, _ = shapes.pop()
    out = torch.empty((len(indices), h, w, 3), dtype=torch.uint8)  # [F, H, W, 3]
    for k, i in enumerate(indices):
        out[k].copy_(torch.from_numpy(got[i]))
    return out.permute(0, 3, 1, 2), indices, stats  # [F, 3, H, W], channels-last memory


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


def _decode_sequential(src: _Source, wanted: list[int], stats: _DecodeStats) -> dict[int, np.ndarray]:
    """Decodes from the start, counting frames, and stops after the last wanted index (HF's way)."""
    container = src.open()
    try:
        stream = _video_stream(container)
        _configure_decoder(stream)
        need, last = set(wanted), wanted[-1]
        reformatter = VideoReformatter()
        got: dict[int, np.ndarray] = {}
        for i, frame in enumerate(container.decode(stream)):
            stats.decoded += 1
            if i in need:
                got[i] = _to_rgb(reformatter, frame)
            if i >= last:
                break
        return got
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
        self.step = 1 / (Fraction(stream.average_rate) * Fraction(stream.time_base))  # ticks per frame
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


def _decode_seeking(src: _Source, wanted: list[int], stats: _DecodeStats) -> dict[int, np.ndarray]:
    """Decodes the wanted frames, seeking past stretches without any and skipping unneeded B-frames.

    A demux-only container plans the work: the keyframe before each wanted frame, grouped into runs
    that each start at a keyframe beyond the previous run's end. Contiguous groups of runs go to up
    to torch.get_num_threads() decoders in parallel. Frame numbers come from timestamps; anything
    off the constant-rate grid, out of order or missing raises _Unreliable.
    """
    probe = src.open()
    try:
        stream = _video_stream(probe)
        clock = _FrameClock(stream)
        clock.anchor = _first_pts(probe, stream)
        runs = _plan_runs(probe, stream, clock, wanted)
    finally:
        probe.close()
    workers = min(torch.get_num_threads(), os.cpu_count() or 1, len(runs))
    parts = _split_runs(runs, workers)
    need = set(wanted)
    results: list[dict[int, np.ndarray]] = [{} for _ in parts]
    decoded = [0] * len(parts)
    seeks = [0] * len(parts)

    def work(k: int) -> None:
        dec = _Decoder(src, clock, need, threads=1 if len(parts) > 1 else 0)  # one thread per decoder
        try:
            if k == 0:
                dec.start(results[0])  # checks that frame 0 sits where the grid says
            for run in parts[k]:
                if run.keyframe > dec.current + 1:
                    dec.seek(run)
                    seeks[k] += 1
                for target in run.targets:
                    if target not in results[k]:
                        results[k][target] = dec.decode(target)
        finally:
            decoded[k] = dec.decoded
            dec.close()

    _run_parallel([functools.partial(work, k) for k in range(len(parts))])
    stats.decoded += sum(decoded)
    stats.seeks += sum(seeks)
    return {i: a for part in results for i, a in part.items()}


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
        keyframe, seek_ts = (0, None) if target == 0 else _keyframe_before(probe, stream, clock, target)
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
        packet = next((p for _, p in zip(range(16), probe.demux(stream)) if p.pts is not None), None)
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

    def start(self, got: dict[int, np.ndarray]) -> None:
        """Decodes frame 0 from the start of the stream and checks its timestamp is the anchor."""
        first = next(self.frames, None)
        if first is None or first.pts != self.clock.anchor:
            raise _Unreliable
        if 0 in self.need:
            got[0] = _to_rgb(self.reformatter, first)
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
    """Runs the tasks on the calling thread plus up to torch.get_num_threads() - 1 pool threads."""
    global _POOL
    extra = min(torch.get_num_threads(), len(tasks), os.cpu_count() or 1) - 1
    if extra <= 0:
        for task in tasks:
            task()
        return
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="plm-video")
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
    try:
        drain()
    finally:
        for f in futures:
            f.result()


# -- pixels ---------------------------------------------------------------------------------------

def preprocess_video_frames(frames: torch.Tensor, *, tile_size: int = 448,
                            mean: float | Sequence[float] = (0.5, 0.5, 0.5),
                            std: float | Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """uint8 [F, 3, H, W] -> float32 [F, 3, T, T]: each frame squashed to T x T and normalized (HF's pixels)."""
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise MediaError(f"expected uint8 frames [F, 3, H, W], got {tuple(frames.shape)} {frames.dtype}")
    m, s = _fused_mean_std(_as_triple(mean), _as_triple(std))
    out = empty_output((frames.shape[0], 3, tile_size, tile_size))  # [F, 3, T, T]
    for k in range(0, frames.shape[0], 8):  # channels-last input: the fast uint8 resize, same pixels
        chunk = frames[k:k + 8].contiguous(memory_format=torch.channels_last)
        resized = _resize(chunk, tile_size, tile_size)  # [<=8, 3, T, T] uint8
        _normalize_into(out[k:k + resized.shape[0]], resized, m, s)
    return out


def video_content_hash(data: bytes) -> str:
    """sha256 hex of a video's source bytes."""
    return hashlib.sha256(data).hexdigest()
