"""Processor: placeholder expansion, token counts, hashes, sources, HF parity and clear errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from plm_core.config import MediaConfig
from plm_core.media.errors import MediaError
from plm_core.model_config import load_model_config
from plm_core.processor import ContextLengthError, MediaOptions, PLMProcessor, PromptError
from plm_core.tokenizer import PLMTokenizer


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    cfg = load_model_config(tiny_checkpoint)
    tok = PLMTokenizer.for_model(cfg)
    return PLMProcessor(cfg, tok)


def _png_bytes(size=(120, 80), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_one_bos_and_generation_prompt(processor):
    p = processor.process([{"role": "user", "content": "hello"}])
    ids = p.prompt_token_ids
    assert ids[0] == 128000 and ids.count(128000) == 1
    tail = (
        [128006]
        + processor.tokenizer.encode("assistant")
        + [128007]
        + processor.tokenizer.encode("\n\n")
    )
    assert ids[-len(tail) :] == tail
    assert p.prompt_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert p.media == []


def test_image_tokens_expand_per_tile(processor):
    url = _data_url(_png_bytes((120, 80)))
    p = processor.process(
        _user({"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"})
    )
    (item,) = p.media
    assert item.kind == "image" and item.num_tokens == item.num_tiles * 4
    assert (
        p.prompt_token_ids[item.offset : item.offset + item.num_tokens]
        == [128002] * item.num_tokens
    )
    assert p.prompt_token_ids.count(128002) == item.num_tokens
    assert item.pixel_values.shape == (item.num_tiles, 3, 56, 56)


def test_detail_low_and_tile_budget(processor):
    url = _data_url(_png_bytes((400, 300)))
    full = processor.process(_user({"type": "image_url", "image_url": {"url": url}}))
    low = processor.process(
        _user({"type": "image_url", "image_url": {"url": url, "detail": "low"}})
    )
    four = processor.process(
        _user({"type": "image_url", "image_url": {"url": url}}), MediaOptions(max_num_tiles=4)
    )
    assert low.media[0].num_tiles == 1
    assert four.media[0].num_tiles <= 5 < full.media[0].num_tiles
    # the cache key changes with the settings but the content hash does not
    assert len({m.media[0].cache_key for m in (full, low, four)}) == 3
    assert len({m.media[0].content_hash for m in (full, low, four)}) == 1


def test_content_hash_tracks_bytes(processor):
    a = processor.process(
        _user({"type": "image_url", "image_url": {"url": _data_url(_png_bytes(color=(1, 2, 3)))}})
    )
    b = processor.process(
        _user({"type": "image_url", "image_url": {"url": _data_url(_png_bytes(color=(1, 2, 4)))}})
    )
    c = processor.process(
        _user({"type": "image_url", "image_url": {"url": _data_url(_png_bytes(color=(1, 2, 3)))}})
    )
    assert a.prompt_token_ids == b.prompt_token_ids  # same token ids ...
    assert a.media[0].content_hash != b.media[0].content_hash  # ... different content
    assert a.media[0].content_hash == c.media[0].content_hash


def test_images_before_videos_within_a_message(processor, tmp_path):
    from media_sets import write_synthetic_video

    video = write_synthetic_video(tmp_path / "v.mp4", frames=12, size=(64, 48))
    url = _data_url(_png_bytes())
    p = processor.process(
        _user(
            {
                "type": "video_url",
                "video_url": {"url": _data_url(video.read_bytes(), "video/mp4"), "num_frames": 4},
            },
            {"type": "text", "text": "compare"},
            {"type": "image_url", "image_url": {"url": url}},
        )
    )
    kinds = [m.kind for m in p.media]
    assert kinds == ["image", "video"]
    assert p.media[0].offset < p.media[1].offset
    assert p.media[1].num_tiles == 4 and p.media[1].num_tokens == 16


def test_file_url_and_allowed_root(tiny_checkpoint, tmp_path):
    cfg = load_model_config(tiny_checkpoint)
    tok = PLMTokenizer.for_model(cfg)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_png_bytes())
    (tmp_path / "secret.png").write_bytes(_png_bytes())
    proc = PLMProcessor(cfg, tok, MediaConfig(allowed_local_media_path=str(allowed)))
    ok = proc.process(
        _user({"type": "image_url", "image_url": {"url": f"file://{allowed / 'a.png'}"}})
    )
    assert len(ok.media) == 1
    with pytest.raises(MediaError, match="outside the allowed directory"):
        proc.process(
            _user({"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'secret.png'}"}})
        )
    with pytest.raises(MediaError, match="outside the allowed directory"):
        proc.process(
            _user({"type": "image_url", "image_url": {"url": f"file://{allowed}/../secret.png"}})
        )


def test_in_memory_pil_and_frames(processor):
    img = Image.new("RGBA", (90, 60), (10, 20, 30, 128))
    frames = np.random.default_rng(0).integers(0, 255, (10, 40, 50, 3), dtype=np.uint8)
    p = processor.process(
        _user({"type": "image", "image": img}, {"type": "video", "video": frames, "num_frames": 5})
    )
    assert [m.kind for m in p.media] == ["image", "video"]
    assert p.media[1].num_tiles == 5


def test_unreadable_image_bytes(processor):
    with pytest.raises(MediaError, match="image"):
        processor.process(
            _user(
                {"type": "image_url", "image_url": {"url": _data_url(b"definitely not a picture")}}
            )
        )


def test_bad_base64_is_not_echoed(processor):
    secret = "QUJD" * 10 + "!!!"
    with pytest.raises(MediaError) as e:
        processor.process(
            _user({"type": "image_url", "image_url": {"url": "data:image/png;base64," + secret}})
        )
    assert secret not in str(e.value)


def test_http_urls_are_refused_clearly(processor):
    with pytest.raises(MediaError, match="http\\(s\\) media URLs are not supported here"):
        processor.process(
            _user({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}})
        )


def test_unsupported_video(processor):
    with pytest.raises(MediaError):
        processor.process(
            _user(
                {"type": "video_url", "video_url": {"url": _data_url(b"\x00" * 4096, "video/mp4")}}
            )
        )


def test_context_overflow_names_both_numbers(processor):
    url = _data_url(_png_bytes((2000, 2000)))
    with pytest.raises(
        PromptError,
        match=r"needs at least \d+ tokens \(\d+ for its first 1 of 1 media item\(s\)\) "
        r"but the context allows 100",
    ):
        processor.process(
            _user({"type": "image_url", "image_url": {"url": url}}), max_prompt_len=100
        )


def test_frame_requests_are_clamped_to_the_ceiling(tiny_checkpoint, tmp_path):
    from media_sets import write_synthetic_video

    cfg = load_model_config(tiny_checkpoint)
    tok = PLMTokenizer.for_model(cfg)
    proc = PLMProcessor(cfg, tok, MediaConfig(max_num_frames=6))
    # 3 s
    video = write_synthetic_video(tmp_path / "v.mp4", frames=30, size=(32, 32), fps=10).read_bytes()
    frames = np.random.default_rng(0).integers(0, 255, (30, 24, 24, 3), dtype=np.uint8)
    for part in (
        {"type": "video", "video": video, "num_frames": 20},
        {"type": "video", "video": video, "fps": 5.0},  # 15 frames asked
        {"type": "video", "video": frames, "num_frames": 20},
        {"type": "video", "video": frames, "fps": 5.0, "video_fps": 10.0},
    ):
        item = proc.process(_user(part)).media[0]
        assert item.num_tiles == 6, part
        assert item.meta["frame_indices"] == [0, 5, 10, 15, 20, 25]
    assert (
        proc.process(_user({"type": "video", "video": video, "num_frames": 4})).media[0].num_tiles
        == 4
    )


def test_detail_high_uses_the_models_budget_and_auto_the_servers(tiny_checkpoint):
    cfg = load_model_config(tiny_checkpoint)
    tok = PLMTokenizer.for_model(cfg)
    # an operator's small default (--max-num-tiles 2)
    proc = PLMProcessor(cfg, tok, MediaConfig(max_num_tiles=2))
    url = _data_url(_png_bytes((400, 300)))
    tiles = {
        d: proc.process(_user({"type": "image_url", "image_url": {"url": url, "detail": d}}))
        .media[0]
        .num_tiles
        for d in ("auto", "high", "low")
    }
    assert tiles["low"] == 1 and tiles["auto"] <= 3 < tiles["high"]
    asked = proc.process(
        _user(
            {"type": "image_url", "image_url": {"url": url, "detail": "high", "max_num_tiles": 4}}
        )
    )
    assert asked.media[0].num_tiles <= 5  # an explicit budget wins over detail


# -- frame settings: the part's own win over the request's -----------------------------------------


def _video_bytes(tmp_path) -> bytes:
    from media_sets import write_synthetic_video

    # 3 s
    return write_synthetic_video(tmp_path / "v.mp4", frames=30, size=(32, 32), fps=10).read_bytes()


def test_part_frame_settings_override_the_request(processor, tmp_path):
    video = _video_bytes(tmp_path)
    by_part_n = processor.process(
        _user({"type": "video", "video": video, "num_frames": 4}), MediaOptions(fps=2.0)
    )
    assert by_part_n.media[0].meta["frame_indices"] == [0, 7, 15, 22]
    by_part_fps = processor.process(
        _user({"type": "video", "video": video, "fps": 1.0}), MediaOptions(num_frames=9)
    )
    assert by_part_fps.media[0].meta["frame_indices"] == [0, 10, 20]  # 3 s at 1 fps
    by_request = processor.process(_user({"type": "video", "video": video}), MediaOptions(fps=1.0))
    assert by_request.media[0].meta["frame_indices"] == [0, 10, 20]


def test_num_frames_and_fps_on_one_level_are_refused(processor, tmp_path):
    video = _video_bytes(tmp_path)
    with pytest.raises(
        PromptError, match=r"content\[0\]: num_frames and fps are mutually exclusive"
    ):
        processor.process(_user({"type": "video", "video": video, "num_frames": 4, "fps": 1.0}))
    with pytest.raises(PromptError, match="num_frames and fps are mutually exclusive"):
        processor.process(
            _user({"type": "video", "video": video}), MediaOptions(num_frames=4, fps=1.0)
        )


# -- message shapes OpenAI allows ------------------------------------------------------------------


def _hf_ids(checkpoint, messages) -> list[int]:
    from hf_reference import hf_inputs

    return hf_inputs(str(checkpoint), messages)["input_ids"][0].tolist()


def test_assistant_content_null_is_empty_text(processor, tiny_checkpoint):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "refusal": "no"},
        {"role": "user", "content": "again"},
    ]
    p = processor.process(msgs)
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>" in p.prompt_text
    as_empty = [msgs[0], {"role": "assistant", "content": []}, msgs[2]]
    assert (
        p.prompt_token_ids
        == processor.process(as_empty).prompt_token_ids
        == _hf_ids(tiny_checkpoint, as_empty)
    )
    with pytest.raises(PromptError, match=r"messages\[0\].content is missing"):
        processor.process([{"role": "user", "content": None}])  # only the assistant's may be null


def test_system_message_after_the_user_is_its_own_turn_as_in_hf(processor, tiny_checkpoint):
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "system", "content": [{"type": "text", "text": "answer in French"}]},
    ]
    p = processor.process(msgs)
    assert p.prompt_text.endswith(
        "<|start_header_id|>system<|end_header_id|>\n\nanswer in French<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert p.prompt_token_ids == _hf_ids(tiny_checkpoint, msgs)
    # string content is kept (HF's template would render an empty turn for it)
    as_string = processor.process([msgs[0], {"role": "system", "content": "answer in French"}])
    assert as_string.prompt_token_ids == p.prompt_token_ids


def _hf_continuation_ids(checkpoint, messages) -> list[int]:
    from hf_reference import hf_processor, to_hf_messages

    proc = hf_processor(str(checkpoint), 36, "thumb+tile")
    hf_msgs, images, _ = to_hf_messages(messages)
    text = proc.apply_chat_template(
        hf_msgs, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    kwargs = {"images": images} if images else {}
    return list(proc(text=text, add_special_tokens=False, **kwargs)["input_ids"][0])


@pytest.mark.parametrize(
    "final",
    [
        "  It is a ",
        "The answer:",
        [{"type": "text", "text": "First. "}, {"type": "text", "text": "Then"}],
    ],
)
def test_continue_final_message_equals_hf(processor, tiny_checkpoint, final):
    image = {"type": "image", "image": Image.new("RGB", (60, 40), (200, 30, 30))}
    msgs = [
        {"role": "user", "content": [image, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": final},
    ]
    p = processor.process(msgs, add_generation_prompt=False, continue_final_message=True)
    assert not p.prompt_text.endswith("<|eot_id|>") and p.prompt_text.endswith(
        ("It is a", "answer:", "Then")
    )
    assert p.prompt_token_ids == _hf_continuation_ids(tiny_checkpoint, msgs)
    # an empty final message continues nothing: the same prompt as a new assistant turn
    empty = processor.process(
        msgs[:1] + [{"role": "assistant", "content": ""}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert empty.prompt_token_ids == processor.process(msgs[:1]).prompt_token_ids


# -- structured errors: `param` names the field at fault -------------------------------------------


def test_processor_level_prompt_errors_name_the_field(processor):
    reserved = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        _user({"type": "text", "text": "fine"}, {"type": "text", "text": "<|video|>"})[0],
    ]
    with pytest.raises(PromptError, match="reserved media tokens") as e:
        processor.process(reserved)
    assert e.value.param == "messages[2].content[1].text"
    with pytest.raises(PromptError, match="reserved media tokens") as e:
        processor.process([{"role": "user", "content": "look: <|image|>"}])
    assert e.value.param == "messages[0].content"
    with pytest.raises(PromptError) as e:
        processor.process([{"role": "user", "content": "bad \ud800 text"}])
    assert e.value.param == "messages[0].content"


@pytest.mark.parametrize(
    "options, kwargs, param",
    [
        (MediaOptions(max_num_tiles=37), {}, "max_num_tiles"),
        (MediaOptions(num_frames=0), {}, "num_frames"),
        (MediaOptions(fps=float("nan")), {}, "fps"),
        (None, {"continue_final_message": True}, "continue_final_message"),
        (None, {"max_prompt_len": 3}, "messages"),
    ],
)
def test_request_level_errors_name_the_option(processor, options, kwargs, param):
    with pytest.raises(PromptError) as e:
        processor.process([{"role": "user", "content": "hello there"}], options, **kwargs)
    assert e.value.param == param


def test_media_errors_name_the_part(processor, tmp_path):
    first = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]
    text = {"type": "text", "text": "x"}
    bad_image = {"type": "image_url", "image_url": {"url": _data_url(b"not a picture")}}
    bad_video = {"type": "video_url", "video_url": _data_url(b"\x00" * 4096, "video/mp4")}
    good = {"type": "image_url", "image_url": {"url": _data_url(_png_bytes())}}
    cases = [
        (first + _user(text, bad_image), "messages[2].content[1].image_url"),
        (_user(good, bad_video), "messages[0].content[1].video_url"),
        (_user({"type": "image", "path": str(tmp_path / "a.png")}), "messages[0].content[0].path"),
        (_user({"type": "video", "video": [1, 2]}), "messages[0].content[0].video"),
    ]
    for messages, param in cases:
        with pytest.raises(MediaError) as e:
            processor.process(messages)
        assert e.value.param == param, messages


def test_context_overflow_from_media_names_the_messages(processor):
    url = _data_url(_png_bytes((2000, 2000)))
    with pytest.raises(ContextLengthError) as e:
        processor.process(
            _user({"type": "image_url", "image_url": {"url": url}}), max_prompt_len=100
        )
    assert e.value.param == "messages"


def test_in_memory_frame_rate_is_part_of_the_cache_key(processor):
    frames = np.random.default_rng(0).integers(0, 255, (30, 24, 24, 3), dtype=np.uint8)
    items = [
        processor.process(
            _user({"type": "video", "video": frames, "fps": 1.0, "video_fps": rate})
        ).media[0]
        for rate in (10.0, 5.0)
    ]
    assert [m.meta["frame_indices"] for m in items] == [[0, 10, 20], [0, 5, 10, 15, 20, 25]]
    assert items[0].content_hash == items[1].content_hash
    assert items[0].cache_key != items[1].cache_key
