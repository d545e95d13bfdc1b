"""The sparse video decoder: seeks to keyframes and decodes stretches in parallel.

Frames are numbered by timestamp; Unreliable is raised whenever timestamps cannot be trusted to
give frame numbers (the caller then decodes in order).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from plm_core.media.containers import ContainerSource, configure_decoder, video_stream
from plm_core.media.frame_buffer import DecodeStats, FrameBuffer, to_rgb
from plm_core.media.thread_pool import run_parallel

_MAX_SEEK_RETRIES = 8


class Unreliable(Exception):
    """Timestamps cannot be trusted to give frame numbers: decode sequentially instead."""


class FrameClock:
    """Maps timestamps to frame numbers on a constant-rate grid anchored at the first frame."""

    def __init__(self, stream: Any):
        if not stream.average_rate or not stream.time_base:
            raise Unreliable
        if stream.frames and stream.duration:
            step = 1 / (stream.average_rate * stream.time_base)
            if abs(stream.frames * step - stream.duration) > step:
                raise Unreliable  # frame count and duration disagree: not a constant-rate grid
        # ticks per frame
        self.step = 1 / (Fraction(stream.average_rate) * Fraction(stream.time_base))
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


def decode_seeking(
    src: ContainerSource, wanted: list[int], sink: FrameBuffer, stats: DecodeStats
) -> None:
    """Decodes the wanted frames, seeking past stretches without any and skipping unneeded B-frames.

    A demux-only container plans the work: the keyframe before each wanted frame, grouped into runs
    that each start at a keyframe beyond the previous run's end. Contiguous groups of runs go to up
    to torch.get_num_threads() decoders in parallel. Frame numbers come from timestamps; anything
    off the constant-rate grid, out of order or missing raises Unreliable. Without a frame count
    in the header (Matroska/WebM) a gap in the timestamps would go unnoticed between two decoded
    frames, so every packet's timestamp is checked against the grid first.
    """
    clock, runs = _plan(src, wanted)
    workers = min(torch.get_num_threads(), os.cpu_count() or 1, len(runs))
    parts = _split_runs(runs, workers)
    need = set(wanted)
    threads = 1 if len(parts) > 1 else 0  # one thread per decoder when several run
    done: list[tuple[int, int]] = [(0, 0)] * len(parts)  # (decoded, seeks) per part

    def work(k: int) -> None:
        dec = _Decoder(src, clock, need, threads)
        try:
            if k == 0:
                dec.start(sink)  # checks that frame 0 sits where the grid says
            for run in parts[k]:
                if run.keyframe > dec.current + 1:
                    dec.seek(run)
                for target in run.targets:
                    if target not in sink:  # each target belongs to one part's runs
                        sink.put(target, dec.decode(target))
        finally:
            done[k] = (dec.decoded, dec.seeks)
            dec.close()

    try:
        run_parallel([functools.partial(work, k) for k in range(len(parts))])
    finally:
        stats.decoded += sum(d for d, _ in done)
        stats.seeks += sum(s for _, s in done)


def _plan(src: ContainerSource, wanted: list[int]) -> tuple[FrameClock, list[_Run]]:
    """The frame clock and the runs, from a container opened for demuxing only."""
    probe = src.open()
    try:
        stream = video_stream(probe)
        if not stream.frames and not src.scan().regular:
            raise Unreliable
        clock = FrameClock(stream)
        clock.anchor = _first_pts(probe, stream)
        return clock, _plan_runs(probe, stream, clock, wanted)
    finally:
        probe.close()


def _first_pts(probe: Any, stream: Any) -> int:
    """The smallest timestamp among the first GOP's kept packets: frame 0's, checked on decode."""
    stamps: list[int] = []
    for n, packet in enumerate(probe.demux(stream)):
        if packet.pts is None and packet.size:
            raise Unreliable
        if (packet.is_keyframe and stamps) or n >= 64 or packet.pts is None:
            break
        if not packet.is_discard:
            stamps.append(packet.pts)
    if not stamps:
        raise Unreliable
    return min(stamps)


def _plan_runs(probe: Any, stream: Any, clock: FrameClock, wanted: list[int]) -> list[_Run]:
    runs: list[_Run] = []
    for target in wanted:
        if runs and target <= runs[-1].targets[-1] + 1:
            runs[-1].targets.append(target)  # the very next frame: keep decoding
            continue
        if target == 0:
            keyframe, seek_ts = 0, None
        else:
            keyframe, seek_ts = _keyframe_before(probe, stream, clock, target)
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


def _keyframe_before(probe: Any, stream: Any, clock: FrameClock, target: int) -> tuple[int, int]:
    """(frame number, seek timestamp) of the last keyframe at or before the target frame."""
    target_pts = clock.pts(target)
    ts = target_pts
    for _ in range(_MAX_SEEK_RETRIES):
        probe.seek(ts, stream=stream, backward=True, any_frame=False)
        packet = next(
            (p for _, p in zip(range(16), probe.demux(stream)) if p.pts is not None), None
        )
        if packet is None or not packet.is_keyframe:
            raise Unreliable
        if packet.pts <= target_pts:
            i = clock.index(packet.pts)
            if i is None:
                raise Unreliable
            return i, ts
        # index timestamps can be decode times: a keyframe shown after the target; step back
        ts = min(ts, packet.dts if packet.dts is not None else packet.pts) - 1
    raise Unreliable


class _Decoder:
    """One container decoding forward to wanted frames; unneeded packets get skip_frame=NONREF,
    which drops a frame only if no other frame references it."""

    def __init__(self, src: ContainerSource, clock: FrameClock, need: set[int], threads: int):
        self.container = src.open()
        self.stream = video_stream(self.container)
        configure_decoder(self.stream, threads)
        self.clock, self.need = clock, need
        self.reformatter = VideoReformatter()
        self.decoded = 0
        self.seeks = 0
        self.current = -1  # the furthest frame number decoded
        self.last = -1  # the previous frame number out of this stretch of decoding
        self.frames = self._frames()

    def _frames(self) -> Iterator[Any]:
        ctx = self.stream.codec_context
        for packet in self.container.demux(self.stream):
            i = self.clock.index(packet.pts)
            ctx.skip_frame = "NONREF" if i is not None and i not in self.need else "DEFAULT"
            for frame in ctx.decode(packet):
                self.decoded += 1
                yield frame

    def start(self, sink: FrameBuffer) -> None:
        """Decodes frame 0 from the start of the stream and checks its timestamp is the anchor."""
        first = next(self.frames, None)
        if first is None or first.pts != self.clock.anchor:
            raise Unreliable
        if 0 in self.need:
            sink.put(0, to_rgb(self.reformatter, first))
        self.current = self.last = 0

    def seek(self, run: _Run) -> None:
        self.container.seek(run.seek_ts, stream=self.stream, backward=True, any_frame=False)
        self.seeks += 1
        self.frames = self._frames()
        self.current, self.last = run.keyframe - 1, -1

    def decode(self, target: int) -> np.ndarray:
        for frame in self.frames:
            i = self.clock.index(frame.pts)
            if i is None or i <= self.last:
                raise Unreliable
            self.last = i
            if i < target:
                self.current = max(self.current, i)
                continue
            if i > target or getattr(frame, "is_corrupt", False):
                raise Unreliable  # the target frame never came out whole
            self.current = i
            return to_rgb(self.reformatter, frame)
        raise Unreliable  # ran out of frames before the target

    def close(self) -> None:
        self.container.close()
