"""Video decoding against HF and a full decode: probing, sparse decoding, limits, frame pixels."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from video_files import full_decode, write_av, write_video

from plm_core.config import MediaConfig
from plm_core.media import containers as C
from plm_core.media import video as V
from plm_core.media.containers import ContainerSource, VideoInfo, probe_video
from plm_core.media.errors import MediaError
from plm_core.media.frame_buffer import DecodeStats
from plm_core.media.hashing import bytes_content_hash
from plm_core.media.preprocess import preprocess_video_frames
from plm_core.media.sampling import sample_frame_indices
from plm_core.media.settings import FrameSampling

SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
NO_SHARED = f"shared test media not found at {SHARED_MEDIA} (only present in the project workspace)"
SHARED_VIDEOS = ["bikes.mp4", "bigbuckbunny.mp4"]
TOL = 1e-5


def shared_video(name: str) -> Path:
    path = SHARED_MEDIA / name
    if not path.is_file():
        pytest.skip(NO_SHARED)
    return path


def decode(source, limits: MediaConfig | None = None, **sampling):
    """decode_video_frames with FrameSampling's fields as keywords (num_frames=32 by default)."""
    return V.decode_video_frames(source, FrameSampling(**sampling), limits)


def check_decode(path: Path, indices: list[int], **kw) -> DecodeStats:
    frames, stats = V.decode_indices(ContainerSource(path), indices, **kw)
    ref = full_decode(str(path))[indices]
    assert frames.dtype == torch.uint8 and frames.shape == ref.shape
    assert torch.equal(frames, ref), f"frames differ from a full decode ({stats})"
    return stats


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    rng = random.Random(0)
    vfr = [0]
    for _ in range(89):
        vfr.append(vfr[-1] + rng.choice([30, 40, 50, 80]))
    return {
        "h264_mp4": write_video(d / "a.mp4"),
        "h264_mp4_long": write_video(d / "long.mp4", n=300, gop=25),
        "h264_mkv": write_video(d / "a.mkv"),
        "mpeg4_avi": write_video(d / "a.avi", codec="mpeg4"),
        "mpeg4_mp4": write_video(d / "b.mp4", codec="mpeg4"),
        "h264_ts": write_video(d / "a.ts", fmt="mpegts"),
        "vfr_mp4": write_video(d / "vfr.mp4", pts_ms=vfr),
        "no_bframes": write_video(d / "nob.mp4", bframes=0, gop=30),
    }


# -- decoding the shared files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SHARED_VIDEOS)
def test_shared_video_frames_equal_full_decode(name):
    path = shared_video(name)
    info = probe_video(path)
    frames, info2, indices = decode(path.read_bytes(), num_frames=32)
    assert info2 == info
    assert indices == sample_frame_indices(info.num_frames, num_frames=32)
    assert torch.equal(frames, full_decode(str(path))[indices])
    for n in (8, 3, 1):
        check_decode(path, sample_frame_indices(info.num_frames, num_frames=n))
    check_decode(
        path, sample_frame_indices(info.num_frames, num_frames=None, fps=2.0, video_fps=info.fps)
    )


@pytest.mark.parametrize("name", SHARED_VIDEOS)
def test_shared_video_equals_hf_reader(name):
    from transformers.video_utils import read_video_pyav

    path = shared_video(name)
    frames, info, indices = decode(str(path), num_frames=32)
    ref, meta = read_video_pyav(
        str(path),
        sample_indices_fn=lambda metadata, **kw: np.arange(32) * metadata.total_num_frames // 32,
    )
    assert meta.total_num_frames == info.num_frames and meta.fps == info.fps
    assert list(meta.frames_indices) == indices
    assert torch.equal(frames, torch.from_numpy(ref).permute(0, 3, 1, 2))


def test_bikes_is_decoded_sparsely():
    path = shared_video("bikes.mp4")
    stats = check_decode(path, sample_frame_indices(250, num_frames=32))
    assert stats.mode == "seek" and stats.seeks > 0 and stats.decoded < 200


def test_shared_probe():
    path = shared_video("bikes.mp4")
    info = probe_video(path)
    assert info == VideoInfo(
        num_frames=250, fps=25.0, duration_s=10.0, width=640, height=272, codec="h264"
    )


# -- decoding synthetic videos ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["h264_mp4", "h264_mkv", "mpeg4_avi", "mpeg4_mp4", "h264_ts", "vfr_mp4", "no_bframes"]
)
def test_synthetic_frames_equal_full_decode(videos, kind):
    path = videos[kind]
    total = len(full_decode(str(path)))
    for n in (32, 7, 2, 1):
        check_decode(path, sample_frame_indices(total, num_frames=n))
    check_decode(path, [5, 5, 60, 3, 89, 0])  # any order, repeats


def test_vfr_falls_back_to_counting_frames(videos):
    stats = check_decode(videos["vfr_mp4"], sample_frame_indices(90, num_frames=8))
    assert stats.mode == "sequential"


def test_long_video_is_not_fully_decoded(videos):
    path = videos["h264_mp4_long"]
    indices = sample_frame_indices(300, num_frames=7)  # 0, 42, 85, ...: none on a keyframe but 0
    stats = check_decode(path, indices)
    assert stats.mode == "seek" and stats.seeks >= 1
    assert stats.decoded < 150, stats  # at most one keyframe interval (25) per wanted frame
    seq = check_decode(path, indices, allow_seek=False)
    assert seq.decoded == indices[-1] + 1  # the sequential path stops after the last wanted frame


def test_one_thread_and_many_threads_agree(videos):
    path = videos["h264_mp4_long"]
    indices = sample_frame_indices(300, num_frames=16)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            # skip_frame works with FFmpeg threads too
            assert check_decode(path, indices).mode == "seek"
    finally:
        torch.set_num_threads(threads)


def test_bytes_and_path_agree(videos):
    path = videos["h264_mkv"]
    a, info_a, idx_a = decode(str(path), num_frames=8)
    b, info_b, idx_b = decode(path.read_bytes(), num_frames=8)
    assert torch.equal(a, b) and info_a == info_b and idx_a == idx_b


def test_probe_synthetic(videos):
    info = probe_video(videos["h264_mp4"])
    assert (info.num_frames, info.fps, info.width, info.height, info.codec) == (
        90,
        25.0,
        64,
        48,
        "h264",
    )
    assert info.duration_s == pytest.approx(3.6)
    mkv = probe_video(videos["h264_mkv"])  # no frame count in the header: estimated
    assert mkv.num_frames == 90 and mkv.fps == 25.0


def test_fps_sampling(videos):
    frames, info, indices = decode(videos["h264_mp4"], num_frames=None, fps=2.0)
    assert indices == sample_frame_indices(90, num_frames=None, fps=2.0, video_fps=25.0)
    assert len(indices) == 7 and torch.equal(frames, full_decode(str(videos["h264_mp4"]))[indices])


# -- limits and errors -----------------------------------------------------------------------------


def test_limits_checked_before_decoding(videos, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded despite a limit")

    monkeypatch.setattr(V, "decode_indices", no_decoding)
    path = videos["h264_mp4"]
    with pytest.raises(MediaError, match="over the limit of 2 s"):
        decode(path, MediaConfig(max_video_duration=2))
    with pytest.raises(MediaError, match="64x48, over the limit of 3000"):
        decode(path, MediaConfig(max_image_pixels=3000))
    with pytest.raises(MediaError, match="mutually exclusive"):
        decode(path, num_frames=8, fps=1.0)
    monkeypatch.undo()
    frames, _, indices = decode(path, num_frames=32, max_frames=16)  # the ceiling clamps
    assert len(frames) == len(indices) == 16
    assert indices == sample_frame_indices(90, num_frames=16)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00garbage\xff" * 100,
        b"\x89PNG\r\n\x1a\n" + bytes(100),
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(64),
    ],
)
def test_non_video_bytes_rejected(data):
    with pytest.raises(MediaError) as exc:
        decode(data)
    assert "\\x" not in str(exc.value) and "garbage" not in str(exc.value)
    with pytest.raises(MediaError):
        probe_video(data)


def test_truncated_and_corrupt_videos_rejected(videos):
    data = videos["h264_mp4"].read_bytes()  # the index (moov) is at the end: a cut file has none
    with pytest.raises(MediaError, match="unsupported or corrupt video"):
        decode(data[: len(data) // 2])
    mkv = videos["h264_mkv"].read_bytes()
    with pytest.raises(MediaError, match="unsupported or corrupt video"):
        decode(mkv[:600], num_frames=4)
    with pytest.raises(MediaError):
        decode(str(videos["h264_mp4"]) + ".missing")


# -- pixels ----------------------------------------------------------------------------------------


@functools.cache
def hf_video_processor():
    from transformers import PerceptionLMVideoProcessor

    return PerceptionLMVideoProcessor()


def hf_video_pixels(frames: torch.Tensor) -> torch.Tensor:
    out = hf_video_processor()(videos=[frames], do_sample_frames=False, return_tensors="pt")
    return out["pixel_values_videos"][0]  # [F, 3, 448, 448]


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", SHARED_VIDEOS)
def test_shared_video_pixels_equal_hf(name):
    path = shared_video(name)
    frames, _, _ = decode(path, num_frames=8)
    ours = preprocess_video_frames(frames)
    assert ours.shape == (8, 3, 448, 448)
    assert_close(ours, hf_video_pixels(frames))


def test_synthetic_video_pixels_equal_hf(videos):
    frames, _, _ = decode(videos["h264_mp4"], num_frames=11)
    assert_close(preprocess_video_frames(frames), hf_video_pixels(frames))
    # a channels-last view (frames given as [F, H, W, 3] and permuted), 1 frame, and odd sizes
    rng = np.random.default_rng(0)
    hwc = torch.from_numpy(rng.integers(0, 256, (3, 37, 901, 3), dtype=np.uint8))
    view = hwc.permute(0, 3, 1, 2)
    assert_close(preprocess_video_frames(view), hf_video_pixels(view))
    assert_close(preprocess_video_frames(view[:1]), hf_video_pixels(view[:1]))
    big = torch.from_numpy(rng.integers(0, 256, (10, 3, 500, 300), dtype=np.uint8))
    assert_close(preprocess_video_frames(big), hf_video_pixels(big))


def test_preprocess_video_rejects_bad_frames():
    with pytest.raises(MediaError):
        preprocess_video_frames(torch.zeros((2, 4, 8, 8), dtype=torch.uint8))
    with pytest.raises(MediaError):
        preprocess_video_frames(torch.zeros((2, 3, 8, 8), dtype=torch.float32))


def test_video_content_hash():
    assert bytes_content_hash(b"abc") == bytes_content_hash(bytearray(b"abc"))
    assert bytes_content_hash(b"abc") != bytes_content_hash(b"abd")


# -- containers without a frame count (Matroska/WebM): HF parity -----------------------------------


@pytest.fixture(scope="module")
def uncounted(tmp_path_factory) -> dict[str, Path]:
    """Matroska/WebM files: no frame count in the header, audio longer than video, dropped
    frames."""
    d = tmp_path_factory.mktemp("uncounted")
    return {
        "mkv_long_audio": write_av(d / "long_audio.mkv", n=60, audio_s=10.0),  # 2 s of video
        "webm_long_audio": write_av(
            d / "long_audio.webm", n=60, codec="libvpx-vp9", audio_s=6.0, audio_codec="libopus"
        ),
        "webm_dropped": write_av(d / "dropped.webm", n=60, codec="libvpx-vp9", skip_pts=(10,)),
        "mkv_dropped": write_av(d / "dropped.mkv", n=40, skip_pts=(1,)),
    }


def hf_sample(path: Path, **kw) -> tuple[list[int], torch.Tensor]:
    """HF's indices and frames: every frame decoded (HF's PyAV reader), sampled by its
    `sample_frames`."""
    from transformers import PerceptionLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    frames = full_decode(str(path))
    with av.open(str(path)) as container:
        fps = float(container.streams.video[0].average_rate)
    meta = VideoMetadata(
        total_num_frames=len(frames), fps=fps, width=frames.shape[3], height=frames.shape[2]
    )
    indices = [int(i) for i in PerceptionLMVideoProcessor().sample_frames(meta, **kw)]
    return indices, frames[indices]


@pytest.mark.parametrize(
    "kind", ["mkv_long_audio", "webm_long_audio", "webm_dropped", "mkv_dropped"]
)
@pytest.mark.parametrize(
    "kw",
    [{"num_frames": 8}, {"num_frames": 16}, {"num_frames": 32}, {"fps": 2.0}],
    ids=["n8", "n16", "n32", "fps2"],
)
def test_uncounted_containers_equal_hf(uncounted, kind, kw):
    path = uncounted[kind]
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the case under test: no count in the header
    total = len(full_decode(str(path)))
    ref_indices, ref_frames = hf_sample(path, **kw)
    frames, info, indices = decode(
        path.read_bytes(), num_frames=kw.get("num_frames"), fps=kw.get("fps")
    )
    assert info.num_frames == total
    assert indices == ref_indices
    assert torch.equal(frames, ref_frames)
    assert_close(preprocess_video_frames(frames), hf_video_pixels(ref_frames))


def test_uncounted_probe_is_the_video_streams_own(uncounted):
    info = probe_video(uncounted["mkv_long_audio"])
    assert info.num_frames == 60 and info.fps == 30.0
    assert info.duration_s == pytest.approx(2.0, abs=0.05)  # not the 10 s of audio
    assert probe_video(uncounted["webm_dropped"]).num_frames == 60


def test_uncounted_regular_stream_still_seeks(uncounted):
    path = uncounted["mkv_long_audio"]
    assert check_decode(path, sample_frame_indices(60, num_frames=4)).mode == "seek"


@pytest.mark.parametrize("kind", ["webm_dropped", "mkv_dropped"])
def test_timestamp_gap_without_frame_count_decodes_in_order(uncounted, kind):
    path = uncounted[kind]
    total = len(full_decode(str(path)))
    for n in (4, 8, 16):
        assert check_decode(path, sample_frame_indices(total, num_frames=n)).mode == "sequential"


def test_fewer_frames_than_packets_are_sampled_again(uncounted, monkeypatch):
    path = uncounted["mkv_dropped"]
    real = C.scan_packets

    def overcount(stream, container):  # as if 5 packets held no frame
        scan = real(stream, container)
        return C.PacketScan(count=scan.count + 5, duration_s=scan.duration_s, regular=False)

    monkeypatch.setattr(C, "scan_packets", overcount)
    # 32 of 45: the last index (43) lies past the 40 real frames, so the decode finds the real end
    frames, info, indices = decode(path, num_frames=32)
    ref_indices, ref_frames = hf_sample(path, num_frames=32)
    assert info.num_frames == 40 and indices == ref_indices and torch.equal(frames, ref_frames)


def test_decoded_pixel_budget_checked_before_decoding(videos, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded despite a limit")

    path = videos["h264_mp4"]  # 64x48
    monkeypatch.setattr(V, "decode_indices", no_decoding)
    with pytest.raises(
        MediaError,
        match=r"decoding 8 frames of 64x48 .* over the per-video limit of 24575; "
        r"ask for fewer frames",
    ):
        decode(path, MediaConfig(max_video_pixels=8 * 64 * 48 - 1), num_frames=8)
    monkeypatch.undo()
    frames, _, _ = decode(path, MediaConfig(max_video_pixels=8 * 64 * 48), num_frames=8)
    assert frames.shape == (8, 3, 48, 64)


def test_longest_side_checked_before_decoding(videos, monkeypatch):
    monkeypatch.setattr(V, "decode_indices", lambda *a, **k: pytest.fail("decoded despite a limit"))
    with pytest.raises(
        MediaError, match="video frame size 64x48 has a side longer than the limit of 50"
    ):
        decode(videos["h264_mp4"], MediaConfig(max_image_side=50))


def test_frames_come_back_as_a_view_of_one_buffer(videos):
    """The decoded pixels are written into one [F, H, W, 3] buffer; the result is a view of it."""
    path = videos["h264_mp4_long"]
    for allow_seek in (True, False):
        frames, _ = V.decode_indices(ContainerSource(path), [0, 40, 80, 120], allow_seek=allow_seek)
        base = frames.permute(0, 2, 3, 1)  # [F, H, W, 3] memory
        assert (
            base.is_contiguous() and frames._base is not None and frames._base.shape == base.shape
        )


def test_errors_do_not_leak_internals(videos):
    data = videos["h264_mp4"].read_bytes()
    for cut in (data[:64], data[: len(data) // 2]):
        with pytest.raises(MediaError) as exc:
            decode(cut)
        text = str(exc.value)
        assert "Errno" not in text and "<none>" not in text and "0x" not in text, text
        assert text.startswith("unsupported or corrupt video: ")
