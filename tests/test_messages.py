"""Message parsing without torch: validation, media references, and `param` on every fault."""

from __future__ import annotations

import subprocess
import sys

import pytest

from plm_core.errors import PromptError
from plm_core.messages import (
    MediaOptions,
    MediaRef,
    check_options,
    parse_messages,
    render_continuation,
)


def parse(messages):
    return parse_messages(messages, max_num_tiles=36)


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_importing_messages_imports_no_torch():
    code = (
        "import sys, plm_core.messages, plm_core.media.sampling, plm_core.media.tiling\n"
        "heavy = [m for m in ('torch', 'numpy', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_media_refs_in_placeholder_order():
    conv = parse(
        [
            {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": "v.mp4", "fps": 2}},
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": "a.png"},
                    {"type": "image", "path": "b.png", "detail": "low", "max_num_tiles": 4},
                ],
            },
        ]
    )
    assert conv.messages == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "video"},
                {"type": "text", "text": "compare"},
            ],
        },
    ]
    assert conv.media == [
        MediaRef("image", "a.png", "messages[1].content[2].image_url"),
        MediaRef("image", "b.png", "messages[1].content[3].path", detail="low", max_num_tiles=4),
        MediaRef("video", "v.mp4", "messages[1].content[0].video_url", fps=2),
    ]
    assert [t.param for t in conv.texts] == [
        "messages[0].content[0].text",
        "messages[1].content[1].text",
    ]


def _text(*texts):
    return [{"type": "text", "text": t} for t in texts]


@pytest.mark.parametrize(
    "messages, match, param",
    [
        ("hello", "non-empty list", "messages"),
        ([], "non-empty list", "messages"),
        ([{"role": "user", "content": "a"}, "b"], "must be an object", "messages[1]"),
        ([{"role": "tool", "content": "x"}], "role 'tool' is not supported", "messages[0].role"),
        ([{"role": "user"}], "content is missing", "messages[0].content"),
        ([{"role": "user", "content": 5}], "string or a list", "messages[0].content"),
        (_user("x"), "must be an object with a 'type'", "messages[0].content[0]"),
        (
            _user({"type": "text", "text": 5}),
            "text must be a string",
            "messages[0].content[0].text",
        ),
        (
            _user({"type": "audio_url", "audio_url": {}}),
            "'audio_url' is not supported",
            "messages[0].content[0].type",
        ),
        (
            _user({"type": "image_url", "image_url": {}}),
            "image_url.url is required",
            "messages[0].content[0].image_url.url",
        ),
        (
            _user({"type": "image_url", "image_url": 7}),
            "image_url.url is required",
            "messages[0].content[0].image_url",
        ),
        (_user({"type": "video"}), "a video part needs", "messages[0].content[0]"),
        (
            _user({"type": "image_url", "image_url": {"url": "x", "detail": "ultra"}}),
            "detail",
            "messages[0].content[0].image_url.detail",
        ),
        (
            _user(*_text("x"), {"type": "image", "image": "x", "detail": "ultra"}),
            "detail",
            "messages[0].content[1].detail",
        ),
        (
            _user({"type": "image_url", "image_url": {"url": "x", "max_num_tiles": 99}}),
            r"image_url\.max_num_tiles must be at most 36",
            "messages[0].content[0].image_url.max_num_tiles",
        ),
        (
            _user({"type": "video_url", "video_url": {"url": "x", "num_frames": 0}}),
            "num_frames must be a positive integer",
            "messages[0].content[0].video_url.num_frames",
        ),
        (
            _user({"type": "video", "video": "x", "fps": 1.0, "video_fps": 0}),
            "video_fps must be a positive finite number",
            "messages[0].content[0].video_fps",
        ),
        (
            _user({"type": "video_url", "video_url": {"url": "x", "num_frames": 2, "fps": 1.0}}),
            r"content\[0\]: num_frames and fps are mutually exclusive",
            "messages[0].content[0].video_url",
        ),
        (
            [{"role": "system", "content": [*_text("x"), {"type": "image_url", "image_url": "x"}]}],
            "system message cannot contain images",
            "messages[0].content[1].image_url",
        ),
        (
            [
                *_user(*_text("x")),
                {"role": "assistant", "content": [{"type": "video", "path": "v"}]},
            ],
            "assistant messages cannot contain",
            "messages[1].content[0].path",
        ),
        ([{"role": "system", "content": "only a system prompt"}], "no user message", "messages"),
        (
            [{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}],
            "no user message",
            "messages",
        ),
    ],
)
def test_bad_messages_say_what_and_where(messages, match, param):
    with pytest.raises(PromptError, match=match) as e:
        parse(messages)
    assert e.value.param == param


@pytest.mark.parametrize(
    "options, param",
    [
        (MediaOptions(max_num_tiles=0), "max_num_tiles"),
        (MediaOptions(max_num_tiles=37), "max_num_tiles"),
        (MediaOptions(num_frames=True), "num_frames"),
        (MediaOptions(fps=float("inf")), "fps"),
    ],
)
def test_request_options_name_themselves(options, param):
    with pytest.raises(PromptError) as e:
        check_options(options, 36)
    assert e.value.param == param
    check_options(MediaOptions(max_num_tiles=36, num_frames=4, fps=2), 36)


class _Template:
    def render(self, messages, *, add_generation_prompt=True):
        text = "".join(
            f"<{m['role']}>" + "".join(p.get("text", "") for p in m["content"]) + "</>"
            for m in messages
        )
        return text + ("<assistant>" if add_generation_prompt else "")


def test_continuation_cuts_after_the_final_text():
    conv = parse([*_user(*_text("hi")), {"role": "assistant", "content": "It is "}])
    assert render_continuation(_Template(), conv.messages, False) == "<user>hi</><assistant>It is "
    empty = parse([*_user(*_text("hi")), {"role": "assistant", "content": " "}])
    assert render_continuation(_Template(), empty.messages, False) == "<user>hi</><assistant>"


@pytest.mark.parametrize(
    "messages, add_generation_prompt, match",
    [
        (_user(*_text("hi")), False, "last message to be an assistant"),
        ([*_user(*_text("hi")), {"role": "assistant", "content": "x"}], True, "add_generation"),
    ],
)
def test_continuation_errors_name_the_option(messages, add_generation_prompt, match):
    conv = parse(messages)
    with pytest.raises(PromptError, match=match) as e:
        render_continuation(_Template(), conv.messages, add_generation_prompt)
    assert e.value.param == "continue_final_message"
