"""The frame policy (part over request over server default, under the ceiling) and HF's sampling."""

from __future__ import annotations

import pytest

from plm_core.config import MediaConfig
from plm_core.errors import PromptError
from plm_core.media.errors import MediaError
from plm_core.media.sampling import choose_frame_indices, frame_sampling, sample_frame_indices
from plm_core.media.settings import FrameSampling, VideoSettings
from plm_core.messages import MediaOptions, MediaRef

# -- sampling --------------------------------------------------------------------------------------


def test_sample_indices_equal_hf():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in (1, 2, 5, 31, 32, 33, 100, 132, 250, 1001, 7919):
        for n in (1, 2, 3, 8, 16, 32, 64):
            if n > total:  # HF raises; we take every frame once
                assert sample_frame_indices(total, num_frames=n) == list(range(total))
                continue
            ref = default_sample_indices_fn(
                VideoMetadata(total_num_frames=total, fps=25.0), num_frames=n
            )
            assert sample_frame_indices(total, num_frames=n) == ref.tolist()
        for fps, video_fps in ((1.0, 25.0), (2.0, 29.97), (0.5, 30.0), (4.0, 24.0)):
            meta = VideoMetadata(total_num_frames=total, fps=video_fps)
            try:
                ref = default_sample_indices_fn(meta, fps=fps).tolist()
            # HF raises when fps asks for more frames than exist; we take them all
            except ValueError:
                assert sample_frame_indices(
                    total, num_frames=None, fps=fps, video_fps=video_fps
                ) == list(range(total))
                continue
            assert sample_frame_indices(total, num_frames=None, fps=fps, video_fps=video_fps) == ref


def test_sample_indices_edge_cases():
    assert sample_frame_indices(250, num_frames=32)[:4] == [0, 7, 15, 23]
    assert sample_frame_indices(5, num_frames=None) == [0, 1, 2, 3, 4]
    with pytest.raises(MediaError, match="mutually exclusive"):
        sample_frame_indices(100, num_frames=8, fps=1.0, video_fps=25.0)
    with pytest.raises(MediaError):
        sample_frame_indices(100, num_frames=None, fps=1.0, video_fps=None)
    with pytest.raises(MediaError):
        sample_frame_indices(0, num_frames=1)


# -- the frame policy: part over request over server default, under the ceiling --------------------


def _ref(**kw) -> MediaRef:
    return MediaRef("video", b"", "messages[0].content[0].video_url", **kw)


@pytest.mark.parametrize(
    "part, request_, expected",
    [
        ({}, MediaOptions(), FrameSampling(num_frames=32, max_frames=64)),  # the server default
        ({}, MediaOptions(num_frames=8), FrameSampling(num_frames=8, max_frames=64)),
        ({}, MediaOptions(fps=2.0), FrameSampling(num_frames=None, fps=2.0, max_frames=64)),
        ({"num_frames": 4}, MediaOptions(fps=2.0), FrameSampling(num_frames=4, max_frames=64)),
        (
            {"fps": 1.0},
            MediaOptions(num_frames=9),
            FrameSampling(num_frames=None, fps=1.0, max_frames=64),
        ),
        ({"num_frames": 500}, MediaOptions(), FrameSampling(num_frames=64, max_frames=64)),
        ({}, MediaOptions(num_frames=100), FrameSampling(num_frames=64, max_frames=64)),
    ],
)
def test_frame_sampling_policy(part, request_, expected):
    assert frame_sampling(_ref(**part), request_, MediaConfig()) == expected


def test_frame_sampling_defaults_and_refusals():
    config = MediaConfig(default_num_frames=16, max_num_frames=8)
    assert frame_sampling(_ref(), MediaOptions(), config).num_frames == 8  # default over the cap
    with pytest.raises(PromptError, match="mutually exclusive") as e:
        frame_sampling(_ref(), MediaOptions(num_frames=4, fps=1.0), config)
    assert e.value.param == "num_frames"
    # a part's own setting means the request's conflict does not matter for this video
    assert frame_sampling(_ref(num_frames=2), MediaOptions(num_frames=4, fps=1.0), config)
    # the frame rate of in-memory frames is kept only where it matters: sampling by fps
    assert frame_sampling(_ref(), MediaOptions(), config, video_fps=10.0).video_fps is None
    assert frame_sampling(_ref(fps=1.0), MediaOptions(), config, video_fps=10.0).video_fps == 10.0


def test_choose_frame_indices_clamps_to_the_ceiling():
    by_count = FrameSampling(num_frames=20, max_frames=6)
    assert choose_frame_indices(30, by_count, None) == [0, 5, 10, 15, 20, 25]
    by_fps = FrameSampling(num_frames=None, fps=5.0, max_frames=6)  # 15 frames asked for
    assert choose_frame_indices(30, by_fps, 10.0) == [0, 5, 10, 15, 20, 25]
    assert choose_frame_indices(30, FrameSampling(num_frames=None, fps=1.0), 10.0) == [0, 10, 20]
    every = FrameSampling(num_frames=None, max_frames=4)
    assert choose_frame_indices(10, every, None) == sample_frame_indices(10, num_frames=4)
    assert choose_frame_indices(3, FrameSampling(num_frames=32), None) == [0, 1, 2]
    with pytest.raises(MediaError, match="frame rate is unknown"):
        choose_frame_indices(30, by_fps, None)


def test_video_settings_key_names_what_changes_the_frames():
    keys = {
        VideoSettings(448, FrameSampling(num_frames=8, max_frames=64)).key,
        VideoSettings(448, FrameSampling(num_frames=None, fps=1.0, max_frames=64)).key,
        VideoSettings(448, FrameSampling(num_frames=None, fps=1.0, max_frames=8)).key,
        VideoSettings(
            448, FrameSampling(num_frames=None, fps=1.0, max_frames=64, video_fps=30.0)
        ).key,
        VideoSettings(336, FrameSampling(num_frames=8, max_frames=64)).key,
    }
    assert len(keys) == 5
    same = VideoSettings(448, FrameSampling(num_frames=8, max_frames=16)).key
    assert same == VideoSettings(448, FrameSampling(num_frames=8, max_frames=64)).key


def test_short_video_gives_every_frame_once():
    assert sample_frame_indices(5, num_frames=32) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(40, fps=100.0, video_fps=25.0, num_frames=None) == list(range(40))


# -- robustness of sampling and decoding limits ----------------------------------------------------


def test_sampling_by_extreme_fps_is_clamped():
    assert sample_frame_indices(100, num_frames=None, fps=1e308, video_fps=25.0) == list(range(100))
    assert sample_frame_indices(100, num_frames=None, fps=1.0, video_fps=1e-320) == list(range(100))
    assert sample_frame_indices(100, num_frames=None, fps=1e-300, video_fps=25.0) == [0]
    for bad in (float("nan"), float("inf"), -1.0, 0.0, True):
        with pytest.raises(MediaError, match="fps must be a positive finite number"):
            sample_frame_indices(100, num_frames=None, fps=bad, video_fps=25.0)
    with pytest.raises(MediaError, match="frame rate is unknown"):
        sample_frame_indices(100, num_frames=None, fps=1.0, video_fps=float("nan"))
    for bad in (True, 2.5, 0):
        with pytest.raises(MediaError, match="num_frames must be a positive integer"):
            sample_frame_indices(100, num_frames=bad)
