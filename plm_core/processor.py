"""Turns OpenAI-format chat messages into prompt token ids and preprocessed media, like HF's processor.

Accepted content: a string, or parts `text`, `image_url` and `video_url` (OpenAI's shapes; the
URL may be `data:`, a local path or `file://`), plus in-memory `{"type": "image", "image": PIL}` and
`{"type": "video", "video": frames}` parts. The output equals HF
`PerceptionLMProcessor.apply_chat_template(..., tokenize=True)`: one BOS, each image expanded to
256 x tiles placeholder tokens (thumbnail + grid), each video to 256 x frames, images before videos
within a message, and pixels equal to HF's. Unlike HF, string content is kept (HF's template drops a
user message whose content is a plain string) and the tile budget can change per request or item.
A system message after the first is rendered as its own system turn, as HF's template does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from plm_core.config import DEFAULT_MAX_IMAGE_PIXELS, ModelConfig
from plm_core.inputs import MediaItem, ProcessedPrompt
from plm_core.media import image as image_ops
from plm_core.media import video as video_ops
from plm_core.media.errors import MediaError
from plm_core.media.image import DEFAULT_MAX_IMAGE_SIDE
from plm_core.media.sources import read_media_url
from plm_core.media.video import DEFAULT_MAX_DECODED_PIXELS
from plm_core.tokenizer import InvalidTextError, PLMTokenizer


class PromptError(ValueError):
    """The conversation is malformed or does not fit the model (a client error)."""


class ContextLengthError(PromptError):
    """The prompt (text + media tokens) is longer than the context allows."""


@dataclass(frozen=True)
class MediaOptions:
    """Per-request preprocessing settings; None means the server default.

    A media part's own settings win over these: a part's num_frames (or fps) replaces the request's
    num_frames and fps for that video. num_frames and fps together on one level are an error.
    """

    max_num_tiles: int | None = (
        None  # tile budget per image (thumbnail not counted), at most the model's
    )
    num_frames: int | None = None  # frames sampled per video
    fps: float | None = None  # or: frames sampled per second of video (exclusive with num_frames)


@dataclass(frozen=True)
class MediaLimits:
    """Ceilings the processor enforces before decoding (from headers), so bad input costs little."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height of an image or a video frame
    max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE  # longest side of an image or a video frame
    max_media_bytes: int | None = None
    max_video_frames: int = 64
    max_video_duration_s: float | None = None
    max_video_decoded_pixels: int | None = (
        DEFAULT_MAX_DECODED_PIXELS  # frames x width x height per video
    )
    allowed_local_root: Path | None = None
    allow_local_files: bool = True


@dataclass
class _MediaRef:
    kind: str  # "image" | "video"
    source: Any  # URL string, bytes, PIL image or array
    max_num_tiles: int | None
    thumbnail_only: bool
    num_frames: int | None
    fps: float | None
    video_fps: float | None = None  # frame rate of in-memory frames (needed to sample them by fps)
    full_budget: bool = (
        False  # detail "high": the model's whole tile budget, not the server default
    )


ROLES = ("system", "developer", "user", "assistant")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tiles(value, name: str, ceiling: int) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise PromptError(f"{name} must be a positive integer")
    if value is not None and value > ceiling:
        raise PromptError(
            f"{name} must be at most {ceiling} (this model's tile budget per image), got {value}"
        )


def _check_num_frames(value, name: str) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise PromptError(f"{name} must be a positive integer")


def _check_fps(value, name: str) -> None:
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise PromptError(f"{name} must be a positive finite number")


class PLMProcessor:
    """Conversation -> `ProcessedPrompt` for one checkpoint."""

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: PLMTokenizer,
        *,
        max_num_tiles: int | None = None,
        default_num_frames: int = 32,
        limits: MediaLimits | None = None,
    ):
        """max_num_tiles: the default tile budget per image, at most the checkpoint's (36 for PLM),
        which is also the most a request may ask for."""
        self.config = config
        self.pcfg = config.processor
        self.tokenizer = tokenizer
        self.max_num_tiles = max_num_tiles or self.pcfg.max_num_tiles
        if (
            not _is_int(self.max_num_tiles)
            or not 1 <= self.max_num_tiles <= self.pcfg.max_num_tiles
        ):
            raise ValueError(
                f"max_num_tiles must be an integer from 1 to the checkpoint's tile budget "
                f"{self.pcfg.max_num_tiles}, got {self.max_num_tiles!r}"
            )
        self.default_num_frames = default_num_frames
        self.limits = limits or MediaLimits()

    # -- messages ---------------------------------------------------------------------------------
    def parse_messages(self, messages: list[dict]) -> tuple[list[dict], list[_MediaRef]]:
        """Validates messages; returns template-ready messages and media refs in placeholder order."""
        if not isinstance(messages, list) or not messages:
            raise PromptError("messages must be a non-empty list")
        out: list[dict] = []
        refs: list[_MediaRef] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise PromptError(f"messages[{i}] must be an object")
            role = msg.get("role")
            if role not in ROLES:
                raise PromptError(
                    f"messages[{i}].role {role!r} is not supported (use system, user or assistant)"
                )
            role = "system" if role == "developer" else role
            content = msg.get("content")
            if content is None and role == "assistant":  # OpenAI allows it (e.g. with a refusal)
                content = []
            texts, images, videos = self._parse_content(content, i)
            if role == "system" and i == 0:
                if images or videos:
                    raise PromptError(
                        "messages[0]: a system message cannot contain images or videos"
                    )
                out.append({"role": "system", "content": "\n".join(t["text"] for t in texts)})
                continue
            if role == "assistant" and (images or videos):
                raise PromptError(
                    f"messages[{i}]: assistant messages cannot contain images or videos"
                )
            # The template emits a message's images, then its videos, then its text.
            refs.extend(images)
            refs.extend(videos)
            parts = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos) + texts
            out.append({"role": role, "content": parts})
        if all(m["role"] == "system" for m in out):
            raise PromptError("the conversation has no user message (only system messages)")
        return out, refs

    def _parse_content(self, content, i: int):
        texts: list[dict] = []
        images: list[_MediaRef] = []
        videos: list[_MediaRef] = []
        if isinstance(content, str):
            return [{"type": "text", "text": content}], images, videos
        if content is None:
            raise PromptError(f"messages[{i}].content is missing")
        if not isinstance(content, list):
            raise PromptError(f"messages[{i}].content must be a string or a list of content parts")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or "type" not in part:
                raise PromptError(f"{where} must be an object with a 'type'")
            kind = part["type"]
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise PromptError(f"{where}.text must be a string")
                texts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image"):
                images.append(self._image_ref(part, where))
            elif kind in ("video_url", "video"):
                videos.append(self._video_ref(part, where))
            else:
                raise PromptError(
                    f"{where}: content part type {kind!r} is not supported "
                    "(use text, image_url or video_url)"
                )
        return texts, images, videos

    def _image_ref(self, part: dict, where: str) -> _MediaRef:
        detail = None
        max_tiles = None
        if part["type"] == "image_url":
            spec = part.get("image_url")
            if isinstance(spec, str):
                spec = {"url": spec}
            if not isinstance(spec, dict) or not spec.get("url"):
                raise PromptError(f"{where}.image_url.url is required")
            source, detail = spec["url"], spec.get("detail")
            max_tiles = spec.get("max_num_tiles")
        else:
            source = next(
                (part[k] for k in ("image", "url", "path") if part.get(k) is not None), None
            )
            if source is None:
                raise PromptError(f"{where}: an image part needs 'image', 'url' or 'path'")
            detail, max_tiles = part.get("detail"), part.get("max_num_tiles")
        if detail not in (None, "auto", "low", "high"):
            raise PromptError(f"{where}.image_url.detail must be 'auto', 'low' or 'high'")
        _check_tiles(max_tiles, f"{where}.image_url.max_num_tiles", self.pcfg.max_num_tiles)
        return _MediaRef(
            "image", source, max_tiles, detail == "low", None, None, full_budget=detail == "high"
        )

    def _video_ref(self, part: dict, where: str) -> _MediaRef:
        num_frames = fps = None
        if part["type"] == "video_url":
            spec = part.get("video_url")
            if isinstance(spec, str):
                spec = {"url": spec}
            if not isinstance(spec, dict) or not spec.get("url"):
                raise PromptError(f"{where}.video_url.url is required")
            source, num_frames, fps = spec["url"], spec.get("num_frames"), spec.get("fps")
        else:
            source = next(
                (part[k] for k in ("video", "url", "path") if part.get(k) is not None), None
            )
            if source is None:
                raise PromptError(f"{where}: a video part needs 'video', 'url' or 'path'")
            num_frames, fps = part.get("num_frames"), part.get("fps")
        video_fps = part.get("video_fps") if part["type"] == "video" else None
        _check_num_frames(num_frames, f"{where}: num_frames")
        _check_fps(fps, f"{where}: fps")
        _check_fps(video_fps, f"{where}: video_fps")
        if num_frames is not None and fps is not None:
            raise PromptError(f"{where}: num_frames and fps are mutually exclusive; give one")
        return _MediaRef("video", source, None, False, num_frames, fps, video_fps)

    def check_options(self, options: MediaOptions) -> None:
        """Raises PromptError for request-level settings out of range (booleans are not integers)."""
        _check_tiles(options.max_num_tiles, "max_num_tiles", self.pcfg.max_num_tiles)
        _check_num_frames(options.num_frames, "num_frames")
        _check_fps(options.fps, "fps")

    # -- media --------------------------------------------------------------------------------------
    def _source_bytes(self, source) -> bytes:
        return read_media_url(
            source,
            allowed_root=self.limits.allowed_local_root,
            allow_local=self.limits.allow_local_files,
            max_bytes=self.limits.max_media_bytes,
        )

    def load_image(self, ref: _MediaRef, options: MediaOptions) -> tuple[MediaItem, torch.Tensor]:
        """Decodes one image; returns its item (counts, hash) and the RGB uint8 tensor [3, H, W].

        Sizes are checked before decoding (pixels, longest side); in-memory images have their
        longest side checked, which bounds the cost of resizing them.
        """
        self.check_options(options)
        src = ref.source
        if isinstance(src, Image.Image):
            image_ops.check_image_side(*src.size, self.limits.max_image_side)
            rgb = image_ops.pil_to_rgb_tensor(src)
            digest = image_ops.pil_content_hash(src)
        elif isinstance(src, (np.ndarray, torch.Tensor)):
            rgb = image_ops.array_to_rgb_tensor(src)
            image_ops.check_image_side(rgb.shape[-1], rgb.shape[-2], self.limits.max_image_side)
            digest = image_ops.pil_content_hash(Image.fromarray(rgb.permute(1, 2, 0).numpy()))
        else:
            data = src if isinstance(src, (bytes, bytearray)) else self._source_bytes(src)
            digest = image_ops.image_content_hash(bytes(data))
            img = image_ops.decode_image(
                bytes(data),
                max_pixels=self.limits.max_image_pixels,
                max_side=self.limits.max_image_side,
            )
            rgb = image_ops.pil_to_rgb_tensor(img)
        height, width = rgb.shape[-2:]
        if ref.thumbnail_only:
            settings, num_tiles = ("thumb", self.pcfg.tile_size), 1
        else:
            budget = (
                ref.max_num_tiles
                or options.max_num_tiles
                or (self.pcfg.max_num_tiles if ref.full_budget else self.max_num_tiles)
            )
            num_tiles = image_ops.num_image_tiles(
                width,
                height,
                tile_size=self.pcfg.tile_size,
                max_num_tiles=budget,
                vision_input_type=self.pcfg.vision_input_type,
            )
            settings = ("tiles", self.pcfg.tile_size, budget, self.pcfg.vision_input_type)
        item = MediaItem(
            "image",
            digest,
            settings,
            num_tiles,
            num_tiles * self.pcfg.tokens_per_tile,
            meta={"width": int(width), "height": int(height)},
        )
        return item, rgb

    def preprocess_image(self, item: MediaItem, rgb: torch.Tensor) -> torch.Tensor:
        if item.settings[0] == "thumb":
            return image_ops.preprocess_image(
                rgb,
                tile_size=self.pcfg.tile_size,
                max_num_tiles=1,
                vision_input_type="single",
                mean=self.pcfg.image_mean,
                std=self.pcfg.image_std,
            )
        _, tile, budget, vit = item.settings
        return image_ops.preprocess_image(
            rgb,
            tile_size=tile,
            max_num_tiles=budget,
            vision_input_type=vit,
            mean=self.pcfg.image_mean,
            std=self.pcfg.image_std,
        )

    def load_video(self, ref: _MediaRef, options: MediaOptions) -> tuple[MediaItem, torch.Tensor]:
        """Decodes only the sampled frames of one video; returns its item and frames uint8 [F, 3, H, W].

        The part's num_frames or fps, if it sets one, replaces the request's; else the request's;
        else the server's default frame count. The decoded pixels (frames x width x height) are
        checked against the limit before decoding.
        """
        self.check_options(options)
        if ref.num_frames is not None or ref.fps is not None:
            num_frames, fps = ref.num_frames, ref.fps
        else:
            num_frames, fps = options.num_frames, options.fps
            if num_frames is not None and fps is not None:
                raise PromptError("num_frames and fps are mutually exclusive; give one")
        if num_frames is None and fps is None:
            num_frames = self.default_num_frames
        cap = self.limits.max_video_frames  # a request asking for more frames gets this many
        if num_frames is not None:
            num_frames = min(num_frames, cap)
        src = ref.source
        if isinstance(src, (np.ndarray, torch.Tensor)) or (
            isinstance(src, list) and src and not isinstance(src, str)
        ):
            frames_all = _frames_to_tensor(src)
            indices = video_ops.sample_frame_indices(
                len(frames_all), num_frames=num_frames, fps=fps, video_fps=ref.video_fps
            )
            if len(indices) > cap:  # fps asked for more frames than the ceiling
                indices = video_ops.sample_frame_indices(
                    len(frames_all), num_frames=cap, video_fps=ref.video_fps
                )
            frames = frames_all[torch.as_tensor(indices, dtype=torch.long)]
            digest = image_ops.image_content_hash(frames_all.numpy().tobytes())
            meta = {"total_frames": len(frames_all)}
        else:
            data = src if isinstance(src, (bytes, bytearray)) else self._source_bytes(src)
            digest = video_ops.video_content_hash(bytes(data))
            frames, info, indices = video_ops.decode_video_frames(
                bytes(data),
                num_frames=num_frames,
                fps=fps,
                max_frames=cap,
                clamp_frames=True,
                max_duration_s=self.limits.max_video_duration_s,
                max_pixels_per_frame=self.limits.max_image_pixels,
                max_side=self.limits.max_image_side,
                max_decoded_pixels=self.limits.max_video_decoded_pixels,
            )
            meta = {
                "total_frames": info.num_frames,
                "fps": info.fps,
                "width": info.width,
                "height": info.height,
            }
        meta["frame_indices"] = list(indices)
        settings = (
            "frames",
            self.pcfg.video_size,
            "n" if fps is None else "fps",
            num_frames or fps,
        )
        n = len(frames)
        item = MediaItem("video", digest, settings, n, n * self.pcfg.tokens_per_frame, meta=meta)
        return item, frames

    def preprocess_video(self, frames: torch.Tensor) -> torch.Tensor:
        return video_ops.preprocess_video_frames(
            frames,
            tile_size=self.pcfg.video_size,
            mean=self.pcfg.image_mean,
            std=self.pcfg.image_std,
        )

    # -- everything ---------------------------------------------------------------------------------
    def process(
        self,
        messages: list[dict],
        options: MediaOptions | None = None,
        *,
        max_prompt_len: int | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> ProcessedPrompt:
        """Messages -> token ids + media with pixels; raises PromptError/MediaError for bad input.

        `continue_final_message` (with add_generation_prompt=False) leaves the final assistant message
        open, so generation continues its text (HF's and vLLM's option of that name)."""
        options = options or MediaOptions()
        self.check_options(options)
        template_messages, refs = self.parse_messages(messages)
        if continue_final_message:
            text = self._render_continuation(template_messages, add_generation_prompt)
        else:
            text = self.tokenizer.render(
                template_messages, add_generation_prompt=add_generation_prompt
            )
        try:
            ids = self.tokenizer.encode(text)
        except InvalidTextError as e:
            raise PromptError(str(e)) from None

        limit = max_prompt_len or self.config.max_model_len
        placeholders = (self.config.image_token_id, self.config.video_token_id)
        text_tokens = sum(1 for t in ids if t not in placeholders)
        if text_tokens > limit:
            raise ContextLengthError(
                f"the prompt has {text_tokens} tokens but the context allows {limit}"
            )
        # One item at a time: decode, count its tokens (refusing as soon as the prompt cannot fit),
        # preprocess, and drop the decoded frames, so a request's peak memory is one item's raw pixels.
        items: list[MediaItem] = []
        for k, ref in enumerate(refs):
            item, raw = (
                self.load_image(ref, options)
                if ref.kind == "image"
                else self.load_video(ref, options)
            )
            items.append(item)
            needed = text_tokens + sum(m.num_tokens for m in items)
            if needed > limit:
                raise ContextLengthError(
                    f"the prompt needs at least {needed} tokens ({needed - text_tokens} for its first {k + 1} of "
                    f"{len(refs)} media item(s)) but the context allows {limit}; use fewer images, a smaller "
                    "tile budget or fewer video frames"
                )
            item.pixel_values = (
                self.preprocess_image(item, raw)
                if item.kind == "image"
                else self.preprocess_video(raw)
            )
            del raw
        prompt_ids = self._expand_placeholders(ids, items)
        return ProcessedPrompt(prompt_token_ids=prompt_ids, media=items, prompt_text=text)

    def _render_continuation(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The prompt cut right after the final (assistant) message's text, as HF's apply_chat_template
        does: the text is found in the rendering, so any template that prints it verbatim works."""
        if add_generation_prompt:
            raise PromptError("continue_final_message needs add_generation_prompt to be false")
        final = messages[-1]
        if final["role"] != "assistant":
            raise PromptError(
                "continue_final_message needs the last message to be an assistant message"
            )
        texts = [p["text"] for p in final["content"] if p["type"] == "text" and p["text"].strip()]
        if not texts:  # nothing to continue: the turn starts from scratch
            return self.tokenizer.render(messages[:-1], add_generation_prompt=True)
        rendered = self.tokenizer.render(messages, add_generation_prompt=False)
        last = texts[-1] if texts[-1] in rendered else texts[-1].strip()
        end = rendered.rfind(last)
        if end < 0:
            raise PromptError(
                "continue_final_message: the chat template changed the final message's text, "
                "so it cannot be continued"
            )
        return rendered[: end + len(last)]

    def _expand_placeholders(self, ids: list[int], items: list[MediaItem]) -> list[int]:
        """Expands each `<|image|>`/`<|video|>` token to its item's token count; sets offsets."""
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        images = [m for m in items if m.kind == "image"]
        videos = [m for m in items if m.kind == "video"]
        n_img = sum(1 for t in ids if t == image_id)
        n_vid = sum(1 for t in ids if t == video_id)
        if n_img != len(images) or n_vid != len(videos):
            raise PromptError(
                "the text contains reserved media tokens (<|image|> or <|video|>); "
                "remove them and send media as image_url/video_url parts"
            )
        out: list[int] = []
        it_img, it_vid = iter(images), iter(videos)
        for t in ids:
            if t == image_id or t == video_id:
                item = next(it_img) if t == image_id else next(it_vid)
                item.offset = len(out)
                out.extend([t] * item.num_tokens)
            else:
                out.append(t)
        return out


def _frames_to_tensor(frames) -> torch.Tensor:
    """In-memory frames ([F, H, W, 3] array/tensor or a list of PIL images) -> uint8 [F, 3, H, W]."""
    if isinstance(frames, list):
        arrays = [
            np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f)
            for f in frames
        ]
        frames = np.stack(arrays)
    t = torch.as_tensor(frames)
    if t.ndim != 4:
        raise MediaError(
            f"video frames must be a 4-D array [frames, height, width, 3], got shape {tuple(t.shape)}"
        )
    if t.dtype != torch.uint8:
        raise MediaError(f"video frames must be uint8, got {t.dtype}")
    if t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    elif t.shape[1] == 4:
        t = t[:, :3]
    return t.contiguous()
