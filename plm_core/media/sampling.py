"""Which frames of a video are decoded: the frame-count policy and HF's index sampling.

Every decode path (in-memory frames and both container decoders) goes through
`choose_frame_indices`; `frame_sampling` settles a video's request into a FrameSampling.
"""

from __future__ import annotations

import math
import numbers

from plm_core.config import MediaConfig
from plm_core.errors import MediaError, PromptError
from plm_core.media.settings import FrameSampling
from plm_core.messages import MediaOptions, MediaRef


def frame_sampling(
    ref: MediaRef, options: MediaOptions, config: MediaConfig, *, video_fps: float | None = None
) -> FrameSampling:
    """The policy: the part's num_frames or fps, if it sets one, replaces the request's; else the
    request's; else the server's default frame count. A count over `config.max_num_frames` is
    lowered to it, and so is what an fps would sample (see choose_frame_indices).

    video_fps: the frame rate of in-memory frames (only used when sampling by fps).
    """
    if ref.num_frames is not None or ref.fps is not None:
        num_frames, fps = ref.num_frames, ref.fps
    else:
        num_frames, fps = options.num_frames, options.fps
        if num_frames is not None and fps is not None:
            raise PromptError(
                "num_frames and fps are mutually exclusive; give one", param="num_frames"
            )
    cap = config.max_num_frames
    if num_frames is None and fps is None:
        num_frames = config.default_num_frames
    if num_frames is not None:
        num_frames = min(num_frames, cap)
    return FrameSampling(
        num_frames=num_frames,
        fps=fps,
        max_frames=cap,
        video_fps=video_fps if fps is not None else None,
    )


def choose_frame_indices(
    total_frames: int, sampling: FrameSampling, video_fps: float | None
) -> list[int]:
    """The frame indices to decode from a video of `total_frames` frames at `video_fps`.

    HF's sampling (see sample_frame_indices); if that gives more than sampling.max_frames (an fps
    over the ceiling, or every frame), max_frames frames are sampled evenly instead.
    """
    indices = sample_frame_indices(
        total_frames, num_frames=sampling.num_frames, fps=sampling.fps, video_fps=video_fps
    )
    cap = sampling.max_frames
    if cap is not None and len(indices) > cap:
        indices = sample_frame_indices(total_frames, num_frames=cap)
    return indices


def _is_positive_finite(x: object) -> bool:
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
        if video_fps is None or not _is_positive_finite(video_fps):
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
    count = min(int(num_frames), total_frames)
    return [i * total_frames // count for i in range(count)]
