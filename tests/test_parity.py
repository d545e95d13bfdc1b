"""Greedy generation parity with HF `PerceptionLMForConditionalGeneration.generate` (fp32, CPU).

For each checkpoint kind (tiny, tiny with an 8B-style no-CLS tower, bench with real 448-pixel
tiles): text only, every test image, two images with different tile counts in one message, a
video, and a multi-turn conversation. Prompt ids must be identical and generated ids identical.
"""

from __future__ import annotations

import pytest
from hf_reference import hf_generate, hf_sampled_frames
from media_sets import image_names, media_path, video_names
from support import checkpoint_path

NEW_TOKENS = 12
PRESETS = ["tiny", "tiny-nocls", pytest.param("bench", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=PRESETS)
def setup(request):
    from plm_core import LLM

    path = checkpoint_path(request.param)
    llm = LLM(str(path), device="cpu", dtype="float32")
    return request.param, str(path), llm


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


def _check(setup, messages, *, max_num_tiles=36, new_tokens=NEW_TOKENS):
    from plm_core import MediaOptions, SamplingParams

    _, path, llm = setup
    hf_prompt, hf_out = hf_generate(path, messages, new_tokens, max_num_tiles)
    ours = llm.chat(
        messages,
        SamplingParams(temperature=0, max_tokens=new_tokens),
        media_options=MediaOptions(max_num_tiles=max_num_tiles),
    )[0]
    assert ours.prompt_token_ids == hf_prompt
    assert ours.token_ids == hf_out
    assert len(ours.token_ids) >= 1
    return ours


def test_text_only(setup):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about the sea."}]}]
    out = _check(setup, msgs)
    # a plain-string content is the same conversation (HF's template would drop it; we keep it)
    _, _, llm = setup
    from plm_core import SamplingParams

    same = llm.chat(
        [{"role": "user", "content": "Write a haiku about the sea."}],
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS),
    )[0]
    assert same.token_ids == out.token_ids


@pytest.mark.parametrize("name", image_names())
def test_one_image(setup, name, media_dir):
    path = media_path(name, media_dir)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(path)},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    _check(setup, msgs)


def test_image_detail_low_is_hf_single_tile(setup, media_dir):
    """detail=low sends only the thumbnail: HF's "vanilla" single-tile mode, 256 tokens (4 on
    tiny)."""
    from plm_core import SamplingParams

    _, path, llm = setup
    img = str(media_path(image_names()[0], media_dir))
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": img, "detail": "low"},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    hf_prompt, hf_out = hf_generate(path, msgs, NEW_TOKENS, vision_input_type="vanilla")
    ours = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))[0]
    assert ours.prompt_token_ids == hf_prompt and ours.token_ids == hf_out
    assert ours.prompt_token_ids.count(128002) == llm.model_config.processor.tokens_per_tile


def test_two_images_different_tile_counts(setup, media_dir):
    from PIL import Image

    from plm_core.media.tiling import num_image_tiles

    _, _, llm = setup
    tile = llm.model_config.processor.tile_size
    by_count = {}
    for name in image_names():
        w, h = Image.open(media_path(name, media_dir)).size
        by_count.setdefault(num_image_tiles(w, h, tile_size=tile, max_num_tiles=9), name)
    assert len(by_count) >= 2, "the test media should include images with different tile counts"
    (_, first), (_, second) = sorted(by_count.items())[:2]
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(media_path(first, media_dir))},
                {"type": "image", "image": str(media_path(second, media_dir))},
                {"type": "text", "text": "What differs between these pictures?"},
            ],
        }
    ]
    _check(setup, msgs, max_num_tiles=9)


@pytest.mark.parametrize("name", video_names())
def test_video(setup, name, media_dir):
    path = media_path(name, media_dir)
    frames = hf_sampled_frames(path, num_frames=32)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(path), "hf_frames": frames},
                {"type": "text", "text": "What happens in this video?"},
            ],
        }
    ]
    _check(setup, msgs)


def test_multi_turn(setup, media_dir):
    img = media_path(image_names()[0], media_dir)
    msgs = [
        {"role": "system", "content": "You answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(img)},
                {"type": "text", "text": "What is this?"},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "It is a picture of something."}],
        },
        {"role": "user", "content": [{"type": "text", "text": "Tell me more about its colours."}]},
    ]
    _check(setup, msgs)


def test_sampling_is_reproducible_with_seed(setup):
    from plm_core import SamplingParams

    _, _, llm = setup
    msgs = [{"role": "user", "content": "Say something."}]
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=8)
    a, b = llm.chat(msgs, p)[0], llm.chat(msgs, p)[0]
    c = llm.chat(msgs, SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=8))[
        0
    ]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
