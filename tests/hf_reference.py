"""The reference side of parity tests: HF transformers' PerceptionLM processor, model and generate.

Kept independent of plm_core: images are opened with Pillow and handed to HF's processor, videos
are decoded frame by frame with PyAV and sampled with HF's own `sample_frames`.
"""

from __future__ import annotations

from functools import lru_cache

import av
import numpy as np
import torch
from PIL import Image


@lru_cache(maxsize=4)
def hf_processor(path: str, max_num_tiles: int = 36, vision_input_type: str = "thumb+tile"):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    # HF ignores a per-call max_num_tiles when choosing the grid: set it on the instance.
    proc.image_processor.max_num_tiles = max_num_tiles
    # "vanilla": one squashed tile (our detail=low)
    proc.image_processor.vision_input_type = vision_input_type
    return proc


@lru_cache(maxsize=2)
def hf_model(path: str):
    from transformers import PerceptionLMForConditionalGeneration

    return PerceptionLMForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def decode_all_frames(path) -> tuple[np.ndarray, float]:
    """Every frame of a video as uint8 [T, H, W, 3], and its average frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate)
    return np.stack(frames), fps


def hf_sampled_frames(path, num_frames: int = 32) -> np.ndarray:
    """The frames HF's video processor keeps with `num_frames=N`, from a full decode."""
    from transformers.video_utils import VideoMetadata

    frames, fps = decode_all_frames(path)
    from transformers import PerceptionLMVideoProcessor

    meta = VideoMetadata(
        total_num_frames=len(frames), fps=fps, width=frames.shape[2], height=frames.shape[1]
    )
    indices = PerceptionLMVideoProcessor().sample_frames(meta, num_frames=num_frames)
    return frames[np.asarray(indices)]


def to_hf_messages(messages: list[dict]) -> tuple[list[dict], list[Image.Image], list[np.ndarray]]:
    """Our test conversations use {"image": path|PIL} / {"video": frames} parts; HF gets
    placeholders."""
    out, images, videos = [], [], []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            content = content if msg["role"] == "system" else [{"type": "text", "text": content}]
            out.append({"role": msg["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part["type"] == "image":
                img = part["image"]
                images.append(Image.open(img) if not isinstance(img, Image.Image) else img)
                parts.append({"type": "image"})
            elif part["type"] == "video":
                videos.append(part["hf_frames"])
                parts.append({"type": "video"})
            else:
                parts.append(part)
        out.append({"role": msg["role"], "content": parts})
    return out, images, videos


def hf_inputs(
    path: str, messages: list[dict], max_num_tiles: int = 36, vision_input_type: str = "thumb+tile"
) -> dict:
    """HF's input_ids and pixel tensors for a conversation (several tile counts allowed)."""
    proc = hf_processor(path, max_num_tiles, vision_input_type)
    hf_msgs, images, videos = to_hf_messages(messages)
    text = proc.apply_chat_template(hf_msgs, tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    enc = proc(text=text, add_special_tokens=False, **kwargs)
    inputs = {"input_ids": torch.tensor([enc["input_ids"][0]])}
    if images:
        inputs["pixel_values"] = torch.cat(
            [torch.as_tensor(np.asarray(p)) for p in enc["pixel_values"]]
        )[None]
    if videos:
        inputs["pixel_values_videos"] = torch.cat(
            [torch.as_tensor(np.asarray(p)) for p in enc["pixel_values_videos"]]
        )[None]
    return inputs


@torch.inference_mode()
def hf_generate(
    path: str,
    messages: list[dict],
    max_new_tokens: int,
    max_num_tiles: int = 36,
    vision_input_type: str = "thumb+tile",
) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy generated ids) from HF generate in fp32."""
    inputs = hf_inputs(path, messages, max_num_tiles, vision_input_type)
    model = hf_model(path)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt) :].tolist()
