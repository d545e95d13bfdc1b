"""In-memory pixels to RGB uint8 tensors, converted as HF converts them.

PIL images, arrays of one image, and video frames (an array or a list of PIL images).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from plm_core.media.errors import MediaError, describe_error


def pil_to_rgb_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W], converted like HF (transparency composited onto white).

    The tensor is a channels-last view of the pixels' HWC memory (no transposing copy); call
    .contiguous() where CHW memory is needed.
    """
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        elif img.mode != "RGB":
            rgb = img.convert("RGB")
        else:
            rgb = img
        arr = np.array(rgb)  # [H, W, 3], a writable copy
    except (OSError, ValueError) as e:
        raise MediaError(
            f"could not convert image of mode {img.mode} to RGB: {describe_error(e)}"
        ) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise MediaError(f"could not convert image of mode {img.mode} to 8-bit RGB")
    return torch.from_numpy(arr).permute(2, 0, 1)  # [3, H, W] over [H, W, 3] memory


def array_to_rgb_tensor(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 array/tensor, [H, W], HWC or CHW with 1, 3 or 4 channels -> uint8 [3, H, W], like HF.

    As in HF, a shape whose first and last dims both look like channels is read as CHW, one channel
    is repeated, and a fourth (alpha) channel is composited onto white. An HWC input comes back as a
    channels-last view where no conversion was needed.
    """
    t = torch.from_numpy(np.ascontiguousarray(arr)) if isinstance(arr, np.ndarray) else arr
    if not isinstance(t, torch.Tensor):
        raise MediaError(
            f"image array must be a numpy array or torch tensor, got {type(arr).__name__}"
        )
    if t.dtype != torch.uint8:
        raise MediaError(f"image array must be uint8, got {t.dtype}")
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 3:
        if t.shape[0] not in (1, 3, 4):
            if t.shape[2] not in (1, 3, 4):
                raise MediaError(
                    f"image array must have 1, 3 or 4 channels, got shape {tuple(t.shape)}"
                )
            t = t.permute(2, 0, 1)  # HWC -> CHW
    else:
        raise MediaError(f"image array must be 2-D or 3-D, got shape {tuple(t.shape)}")
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise MediaError(f"image array has an empty size, shape {tuple(t.shape)}")
    t = tvF.grayscale_to_rgb(t)
    if t.shape[0] == 4:
        x = tvF.to_dtype(t.movedim(0, -1), torch.float32, scale=True)  # [H, W, 4] in [0, 1]
        x = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
        t = tvF.to_dtype(x, torch.uint8, scale=True).movedim(-1, 0)
    return t  # [3, H, W]


def is_frame_sequence(source: object) -> bool:
    """Whether a video source is in-memory frames: an array, a tensor or a non-empty list."""
    return isinstance(source, (np.ndarray, torch.Tensor)) or (
        isinstance(source, list) and bool(source)
    )


def frames_to_tensor(frames: Any) -> torch.Tensor:
    """In-memory frames ([F, H, W, 3] array/tensor, list of PIL images) -> uint8 [F, 3, H, W]."""
    if isinstance(frames, list):
        arrays = [
            np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f)
            for f in frames
        ]
        frames = np.stack(arrays)
    t = torch.as_tensor(frames)
    if t.ndim != 4:
        raise MediaError(
            "video frames must be a 4-D array [frames, height, width, 3], "
            f"got shape {tuple(t.shape)}"
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
