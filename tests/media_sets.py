"""Test media: the shared real files when the workspace has them, else files generated here."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from support import SHARED_MEDIA

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
HAVE_SHARED = SHARED_MEDIA.is_dir()

SYNTHETIC_IMAGES = {
    "synthetic_rgb.jpg": ((640, 427), "RGB"),
    "synthetic_gray.png": ((300, 500), "L"),
    "synthetic_rgba.png": ((200, 200), "RGBA"),
    "synthetic_palette.gif": ((14, 25), "P"),
    "synthetic_wide.png": ((1920, 1080), "RGB"),
}


def image_names() -> list[str]:
    if HAVE_SHARED:
        return sorted(p.name for p in SHARED_MEDIA.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(SYNTHETIC_IMAGES)


def video_names() -> list[str]:
    if HAVE_SHARED:
        return sorted(p.name for p in SHARED_MEDIA.iterdir() if p.suffix.lower() == ".mp4")
    return ["synthetic.mp4"]


def _pattern(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    base = (rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    draw.ellipse(
        (w // 4, h // 4, 3 * w // 4, 3 * h // 4), outline=(255, 255, 0), width=max(1, w // 50)
    )
    return img


def write_synthetic_image(name: str, directory: Path) -> Path:
    size, mode = SYNTHETIC_IMAGES[name]
    img = _pattern(size, seed=len(name))
    if mode == "RGBA":
        alpha = Image.linear_gradient("L").resize(size)
        img = img.convert("RGBA")
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    path = directory / name
    img.save(path)
    return path


def write_synthetic_video(path: Path, *, frames: int = 60, size=(320, 240), fps: int = 25) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.asarray(_pattern(size, seed=i))
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def media_path(name: str, directory: Path) -> Path:
    """The path of a named test file: the shared original, or a generated one in `directory`."""
    if HAVE_SHARED:
        return SHARED_MEDIA / name
    target = directory / name
    if not target.exists():
        if name.endswith(".mp4"):
            write_synthetic_video(target)
        else:
            write_synthetic_image(name, directory)
    return target
