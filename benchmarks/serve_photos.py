"""Synthetic photos for the serving scenarios: seeded JPEGs that compress like photographs, sized in
the checkpoint's tiles, with the tile counts PLM's tiling gives them.

PLM's tiling (HF's, reproduced in plm_core.media.tiling) scales an image up into the largest grid
of at most max_num_tiles tiles that holds it; only an image larger than every such canvas gets the
grid of its aspect ratio instead. Under PLM's default budget of 36 no image gets fewer than 11
tiles (10 in a grid and the thumbnail), and a photo small enough to fit a canvas gets 30 to 37. The
shapes below are larger than every canvas of 36 tiles, at aspect ratios whose grid is small: 13, 16
and 11 tiles with the thumbnail (a 448-px tile makes them 9 to 12 megapixel phone photos).
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) in tiles, and what the shape is
PHOTO_SHAPES = (
    (8.0, 6.0, "4:3 landscape"),
    (10.0, 6.0, "5:3 landscape"),
    (10.0, 4.0, "5:2 panorama"),
    (9.0, 6.75, "4:3 landscape"),
)
JPEG_QUALITY = 85


@dataclass(frozen=True)
class TileBudget:
    """How the checkpoint tiles images: tile size, default tile budget, tokens per tile."""

    tile_size: int = 448
    max_num_tiles: int = 36
    tokens_per_tile: int = 256
    source: str = "PLM's defaults"  # where these figures come from

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> TileBudget:
        from plm_core.model_config import load_model_config

        proc = load_model_config(path).processor
        return cls(proc.tile_size, proc.max_num_tiles, proc.tokens_per_tile, f"{path}")


@dataclass(frozen=True)
class Photo:
    """One synthetic photo: its id, size, tiling and bytes (a base64 JPEG data: URL)."""

    id: str
    shape: str
    width: int
    height: int
    grid: tuple[int, int]  # (tiles across, tiles down), thumbnail not counted
    tiles: int  # thumbnail included
    image_tokens: int
    jpeg_bytes: int
    url: str = field(repr=False)

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "url"}

    def part(self) -> dict:
        """The OpenAI image_url content part."""
        return {"type": "image_url", "image_url": {"url": self.url}}


def photo_pixels(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A sky-to-ground gradient with soft blobs and buildings, a few sharp edges, sensor noise."""
    lw, lh = max(8, width // 8), max(8, height // 8)
    top, bottom = rng.integers(40, 230, 3), rng.integers(20, 200, 3)
    ramp = np.linspace(0.0, 1.0, lh)[:, None, None]
    sky = (top * (1 - ramp) + bottom * ramp).repeat(lw, axis=1)
    mottle = rng.integers(0, 256, (lh // 24 + 2, lw // 24 + 2, 3), dtype=np.uint8)
    mottle = np.asarray(Image.fromarray(mottle).resize((lw, lh), Image.Resampling.BICUBIC))
    img = Image.fromarray((0.7 * sky + 0.3 * mottle).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):  # soft shapes: drawn small, blurred by the upscale
        x0, y0 = int(rng.integers(0, lw)), int(rng.integers(lh // 3, lh))
        w, h = int(rng.integers(2, max(3, lw // 3))), int(rng.integers(2, max(3, lh // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.rectangle((x0, y0 - h, x0 + w // 2, y0), fill=colour)
    img = img.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):  # sharp details at full resolution
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line((x0, y0, x1, y1), fill=colour, width=max(1, width // 400))
    pixels = np.asarray(img, dtype=np.int16)
    pixels += rng.integers(-6, 7, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class PhotoBook:
    """Photos by (role, index), the same for every target and on every machine for one seed; a
    new (role, index) is a photo no server has seen."""

    def __init__(self, budget: TileBudget, seed: int = 0):
        self.budget, self.seed = budget, seed
        self._made: dict[str, Photo] = {}

    def get(self, role: str, index: int) -> Photo:
        pid = f"{role}-{index}"
        if pid not in self._made:
            self._made[pid] = self._make(pid, index)
        return self._made[pid]

    def _make(self, pid: str, index: int) -> Photo:
        from plm_core.media.tiling import num_image_tiles, tile_grid

        b = self.budget
        w_tiles, h_tiles, shape = PHOTO_SHAPES[index % len(PHOTO_SHAPES)]
        width, height = round(w_tiles * b.tile_size), round(h_tiles * b.tile_size)
        digest = hashlib.sha256(f"{self.seed}:{pid}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        data = jpeg_bytes(photo_pixels(rng, width, height))
        tiles = num_image_tiles(width, height, tile_size=b.tile_size, max_num_tiles=b.max_num_tiles)
        return Photo(
            pid,
            shape,
            width,
            height,
            tile_grid(width, height, b.tile_size, b.max_num_tiles),
            tiles,
            tiles * b.tokens_per_tile,
            len(data),
            "data:image/jpeg;base64," + base64.b64encode(data).decode(),
        )

    def made(self) -> list[dict]:
        """What every photo handed out so far is, for the results."""
        return [p.describe() for p in self._made.values()]
