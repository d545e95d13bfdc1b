"""Limits on client-chosen settings and media sizes: refused early, with a plain message."""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image

from plm_core.config import DEFAULT_MAX_DECODED_PIXELS, DEFAULT_MAX_IMAGE_SIDE, MediaConfig
from plm_core.media import video as video_ops
from plm_core.media.errors import MediaError
from plm_core.media.sampling import sample_frame_indices
from plm_core.media.tiling import num_image_tiles
from plm_core.model_config import load_model_config
from plm_core.processor import MediaOptions, PLMProcessor, PromptError
from plm_core.tokenizer import PLMTokenizer

NAN, INF = float("nan"), float("inf")


def _make(checkpoint, **media) -> PLMProcessor:
    cfg = load_model_config(checkpoint)
    tok = PLMTokenizer.for_model(cfg)
    return PLMProcessor(cfg, tok, MediaConfig(**media))


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return _make(tiny_checkpoint)


@pytest.fixture(scope="module")
def video_url(tmp_path_factory) -> str:
    from media_sets import write_synthetic_video

    path = write_synthetic_video(
        tmp_path_factory.mktemp("v") / "v.mp4", frames=30, size=(64, 48), fps=10
    )
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _png_url(size=(97, 61), mode="RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(**spec) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _png_url(), **spec}},
                {"type": "text", "text": "x"},
            ],
        }
    ]


def _video(url: str, **spec) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": url, **spec}},
                {"type": "text", "text": "x"},
            ],
        }
    ]


# -- max_num_tiles: at most the checkpoint's budget, an integer ------------------------------------


@pytest.mark.parametrize("tiles", [37, 300_000, 10**7, 10**30])
def test_tile_budget_over_the_models_is_refused_at_once(processor, tiles):
    assert processor.pcfg.max_num_tiles == 36
    start = time.perf_counter()
    with pytest.raises(PromptError, match=f"max_num_tiles must be at most 36 .*got {tiles}") as e:
        processor.process(_image(), MediaOptions(max_num_tiles=tiles))
    assert e.value.param == "max_num_tiles"
    with pytest.raises(PromptError, match=r"image_url\.max_num_tiles must be at most 36") as e:
        processor.process(_image(max_num_tiles=tiles))
    assert e.value.param == "messages[0].content[0].image_url.max_num_tiles"
    assert time.perf_counter() - start < 1.0


def test_tile_budget_up_to_the_models_is_honored(processor):
    full = processor.process(_image(max_num_tiles=36)).media[0]
    assert full.num_tiles == num_image_tiles(97, 61, tile_size=56, max_num_tiles=36)
    assert (
        processor.process(_image(), MediaOptions(max_num_tiles=36)).media[0].num_tiles
        == full.num_tiles
    )


@pytest.mark.parametrize("bad", [True, 0, -1, 2.0, "4"])
def test_tile_budget_must_be_a_positive_integer(processor, bad):
    with pytest.raises(PromptError, match="max_num_tiles must be a positive integer"):
        processor.process(_image(max_num_tiles=bad))
    with pytest.raises(PromptError, match="max_num_tiles must be a positive integer"):
        processor.process(_image(), MediaOptions(max_num_tiles=bad))


def test_server_default_budget_is_bounded_by_the_checkpoint(tiny_checkpoint):
    with pytest.raises(ValueError, match="tile budget 36"):
        _make(tiny_checkpoint, max_num_tiles=37)
    assert _make(tiny_checkpoint, max_num_tiles=36).max_num_tiles == 36


# -- fps and num_frames: finite positive numbers, integers -----------------------------------------


@pytest.mark.parametrize("fps", [NAN, INF, -INF, 1e308 * 10, 0, -1.0, True, "2"])
def test_bad_fps_is_a_prompt_error(processor, video_url, fps):
    with pytest.raises(PromptError, match="fps must be a positive finite number") as e:
        processor.process(_video(video_url, fps=fps))
    assert e.value.param == "messages[0].content[0].video_url.fps"
    with pytest.raises(PromptError, match="fps must be a positive finite number") as e:
        processor.process(_video(video_url), MediaOptions(fps=fps))
    assert e.value.param == "fps"


def test_huge_finite_fps_takes_every_frame_up_to_the_ceiling(tiny_checkpoint, video_url):
    proc = _make(tiny_checkpoint, max_num_frames=8)
    for item in (
        proc.process(_video(video_url, fps=1e308)).media[0],
        proc.process(_video(video_url), MediaOptions(fps=1e308)).media[0],
    ):
        assert item.meta["frame_indices"] == sample_frame_indices(30, num_frames=8)


@pytest.mark.parametrize("bad", [True, False, 0, 2.5, "4"])
def test_num_frames_must_be_a_positive_integer(processor, video_url, bad):
    with pytest.raises(PromptError, match="num_frames must be a positive integer"):
        processor.process(_video(video_url, num_frames=bad))
    with pytest.raises(PromptError, match="num_frames must be a positive integer"):
        processor.process(_video(video_url), MediaOptions(num_frames=bad))


def test_in_memory_video_fps_must_be_finite(processor):
    import numpy as np

    frames = np.zeros((10, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(PromptError, match="video_fps must be a positive finite number"):
        processor.process(
            [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": frames, "fps": 1.0, "video_fps": INF}],
                }
            ]
        )


# -- sizes: longest image side, decoded pixels per video -------------------------------------------


def test_elongated_image_is_refused_before_decoding(tiny_checkpoint, monkeypatch):
    from PIL import ImageFile

    proc = _make(tiny_checkpoint, max_image_side=1000)
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": _png_url((1, 2000), "L")}}],
        }
    ]
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded despite the side limit")
    )
    with pytest.raises(
        MediaError, match="image size 1x2000 has a side longer than the limit of 1000 pixels"
    ) as e:
        proc.process(msgs)
    assert e.value.param == "messages[0].content[0].image_url"


def test_elongated_in_memory_image_is_refused(tiny_checkpoint):
    proc = _make(tiny_checkpoint, max_image_side=1000)
    with pytest.raises(MediaError, match="side longer than the limit of 1000") as e:
        proc.process(
            [{"role": "user", "content": [{"type": "image", "image": Image.new("L", (2000, 1))}]}]
        )
    assert e.value.param == "messages[0].content[0].image"


def test_default_side_limit_keeps_normal_images(processor):
    assert MediaConfig().max_image_side == DEFAULT_MAX_IMAGE_SIDE == 32768
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": _png_url((1, 4000), "L")}}],
        }
    ]
    assert processor.process(msgs).media[0].num_tiles > 1


def test_default_decoded_pixel_budget_admits_32_frames_of_4k():
    budget = MediaConfig().max_video_pixels
    assert budget == DEFAULT_MAX_DECODED_PIXELS
    assert 32 * 3840 * 2160 <= budget < 64 * 3840 * 2160
    assert 64 * 4096 * 4096 > budget  # the probe's 57 KB video that decoded to 3.2 GB


def test_decoded_pixel_budget_is_checked_before_decoding(tiny_checkpoint, video_url, monkeypatch):
    proc = _make(tiny_checkpoint, max_video_pixels=8 * 64 * 48)
    assert proc.process(_video(video_url, num_frames=8)).media[0].num_tiles == 8
    monkeypatch.setattr(
        video_ops, "decode_indices", lambda *a, **k: pytest.fail("decoded despite the budget")
    )
    with pytest.raises(
        MediaError,
        match=r"decoding 9 frames of 64x48 .* over the per-video limit of 24576; "
        r"ask for fewer frames",
    ) as e:
        proc.process(_video(video_url, num_frames=9))
    assert e.value.param == "messages[0].content[0].video_url"


def test_video_side_limit(tiny_checkpoint, video_url):
    proc = _make(tiny_checkpoint, max_image_side=50)
    with pytest.raises(
        MediaError, match="video frame size 64x48 has a side longer than the limit of 50"
    ) as e:
        proc.process(_video(video_url, num_frames=2))
    assert e.value.param == "messages[0].content[0].video_url"


# -- messages say what is wrong with the input, nothing about the server ---------------------------


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),
        "data:video/mp4;base64,"
        + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + bytes(56)).decode(),
    ],
)
def test_media_errors_do_not_leak_internals(processor, url):
    kind = "image_url" if url.startswith("data:image") else "video_url"
    with pytest.raises(MediaError) as exc:
        processor.process([{"role": "user", "content": [{"type": kind, kind: {"url": url}}]}])
    text = str(exc.value)
    for leak in ("0x", "BytesIO", "Errno", "<none>", "<"):
        assert leak not in text, text


@pytest.mark.parametrize("name", ["clip\x00.mp4", "x" * 5000 + ".png", "."])
def test_unreadable_local_paths_are_media_errors(tmp_path, name):
    """A NUL in the name, a name over the OS limit or a directory: a MediaError, not a crash."""
    from plm_core.media.errors import MediaError
    from plm_core.media.sources import read_media_url

    with pytest.raises(MediaError):
        read_media_url(f"file://{tmp_path}/{name}", allowed_root=tmp_path)


def test_refusals_name_the_option_that_lifts_them(tmp_path):
    """A newcomer's file:// URL on a server without local media says which flag allows it."""
    from plm_core.media.errors import MediaError
    from plm_core.media.sources import read_media_url

    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        read_media_url(f"file://{tmp_path}/a.png", allow_local=False)
