"""OpenAI-format chat messages: validation, template-ready messages and typed media references.

No torch, numpy or PIL is imported here. Every PromptError names the offending field (`param`) as
OpenAI writes paths: `messages[1].content[0].image_url.detail`, `messages[0].role`, `fps`.
Within a message the template shows its images, then its videos, then its text parts, so the media
references come back in the order of the prompt's placeholders.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from plm_core.errors import PromptError

ROLES = ("system", "developer", "user", "assistant")
DETAILS = (None, "auto", "low", "high")


@dataclass(frozen=True)
class MediaOptions:
    """Per-request preprocessing settings; None means the server default.

    A media part's own settings win over these: a part's num_frames (or fps) replaces the request's
    num_frames and fps for that video. num_frames and fps together on one level are an error.
    """

    # tile budget per image (thumbnail not counted), at most the model's
    max_num_tiles: int | None = None
    num_frames: int | None = None  # frames sampled per video
    fps: float | None = None  # or: frames sampled per second of video (exclusive with num_frames)


@dataclass(frozen=True)
class MediaRef:
    """One image or video part of a request, validated but not read yet."""

    kind: Literal["image", "video"]
    source: Any  # URL string or bytes; in-memory: a PIL image, an array or a list of frames
    param: str  # the field holding it, e.g. messages[1].content[0].image_url
    # images: "low" (the thumbnail alone), "high" (the model's whole tile budget), "auto" or None
    detail: str | None = None
    max_num_tiles: int | None = None  # images: this part's tile budget
    num_frames: int | None = None  # videos: this part's frame count (exclusive with fps)
    fps: float | None = None  # videos: this part's frames per second of video
    video_fps: float | None = None  # in-memory frames: their frame rate


@dataclass(frozen=True)
class TextRef:
    """One text of the conversation and the field holding it (to name it in errors)."""

    param: str
    text: str


@dataclass
class Conversation:
    """Messages ready for the chat template, their media in placeholder order, and their texts."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    media: list[MediaRef] = field(default_factory=list)
    texts: list[TextRef] = field(default_factory=list)

    def param_of_text(self, fault: Callable[[str], bool]) -> str:
        """The param of the first text `fault` holds for, else "messages"."""
        return next((t.param for t in self.texts if fault(t.text)), "messages")


class ChatTemplate(Protocol):
    """What renders template-ready messages to prompt text (PLMTokenizer does)."""

    def render(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str: ...


# -- values ---------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_tiles(value: object, name: str, ceiling: int, param: str) -> None:
    """A tile budget: None or a positive integer up to the model's budget."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PromptError(f"{name} must be a positive integer", param=param)
    if value > ceiling:
        raise PromptError(
            f"{name} must be at most {ceiling} (this model's tile budget per image), got {value}",
            param=param,
        )


def check_num_frames(value: object, name: str, param: str) -> None:
    """A frame count: None or a positive integer."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PromptError(f"{name} must be a positive integer", param=param)


def check_fps(value: object, name: str, param: str) -> None:
    """A frame rate: None or a positive finite number."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise PromptError(f"{name} must be a positive finite number", param=param)


def check_options(options: MediaOptions, max_num_tiles: int) -> None:
    """Raises PromptError for request-level settings out of range (booleans are not integers)."""
    check_tiles(options.max_num_tiles, "max_num_tiles", max_num_tiles, "max_num_tiles")
    check_num_frames(options.num_frames, "num_frames", "num_frames")
    check_fps(options.fps, "fps", "fps")


# -- messages -------------------------------------------------------------------------------------


def parse_messages(messages: object, *, max_num_tiles: int) -> Conversation:
    """Validates OpenAI-format messages; `max_num_tiles` is the most tiles a part may ask for."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list", param="messages")
    conv = Conversation()
    for i, msg in enumerate(messages):
        _parse_message(conv, i, msg, max_num_tiles)
    if all(m["role"] == "system" for m in conv.messages):
        raise PromptError(
            "the conversation has no user message (only system messages)", param="messages"
        )
    return conv


def _parse_message(conv: Conversation, i: int, msg: object, max_num_tiles: int) -> None:
    if not isinstance(msg, dict):
        raise PromptError(f"messages[{i}] must be an object", param=f"messages[{i}]")
    role = msg.get("role")
    if role not in ROLES:
        raise PromptError(
            f"messages[{i}].role {role!r} is not supported (use system, user or assistant)",
            param=f"messages[{i}].role",
        )
    role = "system" if role == "developer" else role
    content = msg.get("content")
    if content is None and role == "assistant":  # OpenAI allows it (e.g. with a refusal)
        content = []
    texts, images, videos = _parse_content(content, i, max_num_tiles)
    conv.texts.extend(texts)
    media = images + videos
    if role == "system" and i == 0:
        if media:
            raise PromptError(
                "messages[0]: a system message cannot contain images or videos",
                param=media[0].param,
            )
        conv.messages.append({"role": "system", "content": "\n".join(t.text for t in texts)})
        return
    if role == "assistant" and media:
        raise PromptError(
            f"messages[{i}]: assistant messages cannot contain images or videos",
            param=media[0].param,
        )
    # The template emits a message's images, then its videos, then its text.
    conv.media.extend(media)
    parts: list[dict[str, Any]] = [{"type": "image"}] * len(images)
    parts += [{"type": "video"}] * len(videos)
    parts += [{"type": "text", "text": t.text} for t in texts]
    conv.messages.append({"role": role, "content": parts})


def _parse_content(
    content: object, i: int, max_num_tiles: int
) -> tuple[list[TextRef], list[MediaRef], list[MediaRef]]:
    """(texts, images, videos) of one message's content."""
    texts: list[TextRef] = []
    images: list[MediaRef] = []
    videos: list[MediaRef] = []
    if isinstance(content, str):
        return [TextRef(f"messages[{i}].content", content)], images, videos
    if content is None:
        raise PromptError(f"messages[{i}].content is missing", param=f"messages[{i}].content")
    if not isinstance(content, list):
        raise PromptError(
            f"messages[{i}].content must be a string or a list of content parts",
            param=f"messages[{i}].content",
        )
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise PromptError(f"{where} must be an object with a 'type'", param=where)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise PromptError(f"{where}.text must be a string", param=f"{where}.text")
            texts.append(TextRef(f"{where}.text", part["text"]))
        elif kind in ("image_url", "image"):
            images.append(_image_ref(part, where, max_num_tiles))
        elif kind in ("video_url", "video"):
            videos.append(_video_ref(part, where))
        else:
            raise PromptError(
                f"{where}: content part type {kind!r} is not supported "
                "(use text, image_url or video_url)",
                param=f"{where}.type",
            )
    return texts, images, videos


def _source(part: dict[str, Any], where: str) -> tuple[Any, dict[str, Any], str]:
    """(source, settings, param) of a media part: the URL of an `image_url`/`video_url` spec, or
    the `image`/`video`, `url` or `path` of an in-memory part, whose settings sit beside it."""
    kind = part["type"]
    if kind in ("image_url", "video_url"):
        spec = part.get(kind)
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, dict) or not spec.get("url"):
            path = f"{where}.{kind}" if not isinstance(spec, dict) else f"{where}.{kind}.url"
            raise PromptError(f"{where}.{kind}.url is required", param=path)
        return spec["url"], spec, f"{where}.{kind}"
    key = next((k for k in (kind, "url", "path") if part.get(k) is not None), None)
    if key is None:
        article = "an" if kind == "image" else "a"
        raise PromptError(
            f"{where}: {article} {kind} part needs '{kind}', 'url' or 'path'", param=where
        )
    return part[key], part, f"{where}.{key}"


def _image_ref(part: dict[str, Any], where: str, max_num_tiles: int) -> MediaRef:
    source, spec, param = _source(part, where)
    at = param if part["type"] == "image_url" else where  # where the settings are
    detail, tiles = spec.get("detail"), spec.get("max_num_tiles")
    if detail not in DETAILS:
        raise PromptError(
            f"{where}.image_url.detail must be 'auto', 'low' or 'high'", param=f"{at}.detail"
        )
    check_tiles(tiles, f"{where}.image_url.max_num_tiles", max_num_tiles, f"{at}.max_num_tiles")
    return MediaRef("image", source, param, detail=detail, max_num_tiles=tiles)


def _video_ref(part: dict[str, Any], where: str) -> MediaRef:
    source, spec, param = _source(part, where)
    at = param if part["type"] == "video_url" else where
    num_frames, fps = spec.get("num_frames"), spec.get("fps")
    video_fps = part.get("video_fps") if part["type"] == "video" else None
    check_num_frames(num_frames, f"{where}: num_frames", f"{at}.num_frames")
    check_fps(fps, f"{where}: fps", f"{at}.fps")
    check_fps(video_fps, f"{where}: video_fps", f"{where}.video_fps")
    if num_frames is not None and fps is not None:
        raise PromptError(f"{where}: num_frames and fps are mutually exclusive; give one", param=at)
    return MediaRef("video", source, param, num_frames=num_frames, fps=fps, video_fps=video_fps)


# -- rendering ------------------------------------------------------------------------------------


def render_prompt(
    template: ChatTemplate,
    conv: Conversation,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """The prompt text: the whole conversation, or cut after the final message's text."""
    if continue_final_message:
        return render_continuation(template, conv.messages, add_generation_prompt)
    return template.render(conv.messages, add_generation_prompt=add_generation_prompt)


def render_continuation(
    template: ChatTemplate, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> str:
    """The prompt cut right after the final (assistant) message's text, as HF's
    apply_chat_template does: the text is found in the rendering, so any template that prints it
    verbatim works."""
    param = "continue_final_message"
    if add_generation_prompt:
        raise PromptError(
            "continue_final_message needs add_generation_prompt to be false", param=param
        )
    final = messages[-1]
    if final["role"] != "assistant":
        raise PromptError(
            "continue_final_message needs the last message to be an assistant message", param=param
        )
    texts = [p["text"] for p in final["content"] if p["type"] == "text" and p["text"].strip()]
    if not texts:  # nothing to continue: the turn starts from scratch
        return template.render(messages[:-1], add_generation_prompt=True)
    rendered = template.render(messages, add_generation_prompt=False)
    last = texts[-1] if texts[-1] in rendered else texts[-1].strip()
    end = rendered.rfind(last)
    if end < 0:
        raise PromptError(
            "continue_final_message: the chat template changed the final message's text, "
            "so it cannot be continued",
            param=param,
        )
    return rendered[: end + len(last)]
