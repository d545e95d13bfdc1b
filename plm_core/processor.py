"""Chat messages to prompt token ids and preprocessed media, like HF's processor.

Orchestration only: parsing is plm_core.messages', loading and preprocessing media
plm_core.media.loader's.

Accepted content: a string, or parts `text`, `image_url` and `video_url` (OpenAI's shapes; the
URL may be `data:`, a local path or `file://`), plus in-memory `{"type": "image", "image": PIL}` and
`{"type": "video", "video": frames}` parts. The output equals HF
`PerceptionLMProcessor.apply_chat_template(..., tokenize=True)`: one BOS, each image expanded to
256 x tiles placeholder tokens (thumbnail + grid), each video to 256 x frames, images before videos
within a message, and pixels equal to HF's. Unlike HF, string content is kept (HF's template drops
a user message whose content is a plain string) and the tile budget can change per request or item.
A system message after the first is rendered as its own system turn, as HF's template does.

Repeats are cheap: media read from bytes (data: URLs, files, fetched URLs) is remembered in a
RawMediaCache by content hash and settings, so the same bytes are not decoded again to count their
tokens, and their pixels are not made at all when `is_resident` says the engine holds the item's
encoder output (the item then carries a pixel source, which the engine calls if it ever must).
"""

from __future__ import annotations

from collections.abc import Callable

from plm_core.config import MediaConfig
from plm_core.errors import ContextLengthError, MediaError, PromptError
from plm_core.inputs import MediaItem, ProcessedPrompt
from plm_core.media.loader import MediaLoader, located
from plm_core.media.raw_cache import DEFAULT_RAW_CACHE_ENTRIES, RawMediaCache
from plm_core.messages import (
    Conversation,
    MediaOptions,
    MediaRef,
    check_options,
    is_int,
    parse_messages,
    render_prompt,
)
from plm_core.model_config import ModelConfig
from plm_core.tokenizer import InvalidTextError, PLMTokenizer

__all__ = [
    "ContextLengthError",
    "MediaError",
    "MediaOptions",
    "PLMProcessor",
    "PromptError",
]


def _is_invalid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class PLMProcessor:
    """Conversation -> `ProcessedPrompt` for one checkpoint."""

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: PLMTokenizer,
        media: MediaConfig | None = None,
        *,
        raw_cache_entries: int = DEFAULT_RAW_CACHE_ENTRIES,
    ):
        """media.max_num_tiles: the default tile budget per image, at most the checkpoint's (36 for
        PLM), which is also the most a request may ask for. raw_cache_entries: how many media
        items' facts the raw-media cache keeps (0: no cache, every item is decoded)."""
        self.model_config = model_config
        self.pcfg = model_config.processor
        self.tokenizer = tokenizer
        self.media = media = media or MediaConfig()
        self.max_num_tiles = media.max_num_tiles or self.pcfg.max_num_tiles
        if not is_int(self.max_num_tiles) or not 1 <= self.max_num_tiles <= self.pcfg.max_num_tiles:
            raise ValueError(
                f"max_num_tiles must be an integer from 1 to the checkpoint's tile budget "
                f"{self.pcfg.max_num_tiles}, got {self.max_num_tiles!r}"
            )
        self.raw_cache = RawMediaCache(raw_cache_entries) if raw_cache_entries > 0 else None
        self.loader = MediaLoader(self.pcfg, media, self.max_num_tiles, self.raw_cache)

    def process(
        self,
        messages: list[dict],
        options: MediaOptions | None = None,
        *,
        max_prompt_len: int | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        is_resident: Callable[[str], bool] | None = None,
    ) -> ProcessedPrompt:
        """Messages -> token ids + media with pixels; raises PromptError/MediaError for bad input,
        with `param` naming the field at fault.

        `continue_final_message` (with add_generation_prompt=False) leaves the final assistant
        message open, so generation continues its text (HF's and vLLM's option of that name).
        `is_resident(item.cache_key)`: True when the engine holds the item's encoder output (or
        its whole prefix is cached); a raw-cache hit it says True for gets no pixels, only a pixel
        source (`MediaItem.pixels()` makes them). It is called from the calling thread; process()
        may run in several threads at once (they share the raw-media cache)."""
        options = options or MediaOptions()
        check_options(options, self.pcfg.max_num_tiles)
        conv = parse_messages(messages, max_num_tiles=self.pcfg.max_num_tiles)
        text = render_prompt(
            self.tokenizer,
            conv,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        ids = self._encode(text, conv)
        limit = max_prompt_len or self.model_config.max_model_len
        placeholders = (self.model_config.image_token_id, self.model_config.video_token_id)
        text_tokens = sum(1 for t in ids if t not in placeholders)
        if text_tokens > limit:
            raise ContextLengthError(
                f"the prompt has {text_tokens} tokens but the context allows {limit}",
                param="messages",
            )
        items = self._load_media(conv.media, options, text_tokens, limit, is_resident)
        prompt_ids = self._expand_placeholders(ids, items, conv)
        return ProcessedPrompt(prompt_token_ids=prompt_ids, media=items, prompt_text=text)

    def _encode(self, text: str, conv: Conversation) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except InvalidTextError as e:
            raise PromptError(str(e), param=conv.param_of_text(_is_invalid_unicode)) from None

    def _load_media(
        self,
        refs: list[MediaRef],
        options: MediaOptions,
        text_tokens: int,
        limit: int,
        is_resident: Callable[[str], bool] | None = None,
    ) -> list[MediaItem]:
        """One item at a time: decode (unless the raw-media cache knows the bytes), count its
        tokens (refusing as soon as the prompt cannot fit), preprocess, and drop the decoded
        frames, so a request's peak memory is one item's raw pixels. A cache hit is decoded and
        preprocessed here too, unless `is_resident` says the engine will not need its pixels."""
        items: list[MediaItem] = []
        for k, ref in enumerate(refs):
            item, raw = self.loader.load(ref, options)
            items.append(item)
            needed = text_tokens + sum(m.num_tokens for m in items)
            if needed > limit:
                raise ContextLengthError(
                    f"the prompt needs at least {needed} tokens ({needed - text_tokens} for its "
                    f"first {k + 1} of {len(refs)} media item(s)) but the context allows {limit}; "
                    "use fewer images, a smaller tile budget or fewer video frames",
                    param="messages",
                )
            with located(ref.param):
                if raw is not None:
                    item.pixel_values = self.loader.preprocess(item, raw)
                elif item.has_pixels:  # decoded with its settings just now
                    pass
                elif is_resident is not None and is_resident(item.cache_key):
                    assert self.raw_cache is not None  # only a cache hit has no raw pixels
                    self.raw_cache.note_skipped()
                else:
                    item.pixels()  # here, not on the engine thread
            del raw
        return items

    def _expand_placeholders(
        self, ids: list[int], items: list[MediaItem], conv: Conversation
    ) -> list[int]:
        """Expands each `<|image|>`/`<|video|>` token to its item's token count; sets offsets."""
        image_id, video_id = self.model_config.image_token_id, self.model_config.video_token_id
        images = iter([m for m in items if m.kind == "image"])
        videos = iter([m for m in items if m.kind == "video"])
        n_img = sum(1 for t in ids if t == image_id)
        n_vid = sum(1 for t in ids if t == video_id)
        if n_img + n_vid != len(items) or n_img != sum(m.kind == "image" for m in items):
            reserved = [self.tokenizer.token_text(t) for t in (image_id, video_id)]
            raise PromptError(
                "the text contains reserved media tokens (<|image|> or <|video|>); "
                "remove them and send media as image_url/video_url parts",
                param=conv.param_of_text(lambda text: any(r in text for r in reserved)),
            )
        out: list[int] = []
        for t in ids:
            if t == image_id or t == video_id:
                item = next(images) if t == image_id else next(videos)
                item.offset = len(out)
                out.extend([t] * item.num_tokens)
            else:
                out.append(t)
        return out
