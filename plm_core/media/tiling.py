"""PLM's tile grid: the tiles an image of a given size gets under a budget, as HF picks them.

Sizes only, no pixels (and no torch).
"""

from __future__ import annotations

import functools
import math
import operator

from plm_core.media.errors import MediaError
from plm_core.media.settings import THUMB_AND_TILES

# The largest tile budget any grid is computed for: enumerating the grids costs O(n^1.5)
# (PLM uses 36).
MAX_TILE_BUDGET = 1024

Grid = tuple[int, int]  # (n_w, n_h): tiles across, tiles down


def _factors(n: int) -> list[int]:
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return sorted(set(small) | {n // i for i in small})


def _tile_budget(max_num_tiles: object) -> int:
    """The budget as an int; refuses booleans, non-integers and budgets over MAX_TILE_BUDGET."""
    if isinstance(max_num_tiles, bool):
        raise MediaError("max_num_tiles must be an integer, not a boolean")
    try:
        budget = operator.index(max_num_tiles)  # type: ignore[arg-type]
    except TypeError:
        raise MediaError(
            f"max_num_tiles must be an integer, got {type(max_num_tiles).__name__}"
        ) from None
    if budget > MAX_TILE_BUDGET:
        raise MediaError(
            f"max_num_tiles {budget} is over the largest supported budget of {MAX_TILE_BUDGET}"
        )
    return budget


@functools.lru_cache(maxsize=64, typed=True)
def _aspect_ratio_table(max_num_tiles: int) -> tuple[tuple[float, tuple[Grid, ...]], ...]:
    """(ratio n_w/n_h, grids with that ratio) for every grid of at most max_num_tiles tiles.

    The order is HF's and decides ties: tile counts from max_num_tiles down, within a count the
    width factors ascending; a ratio keeps the place where it first appeared. The work grows as
    n^1.5, so the caller refuses budgets over MAX_TILE_BUDGET first.
    """
    table: dict[float, list[Grid]] = {}
    for count in range(max_num_tiles, 0, -1):
        for n_w in _factors(count):
            n_h = count // n_w
            table.setdefault(n_w / n_h, []).append((n_w, n_h))
    return tuple((ratio, tuple(grids)) for ratio, grids in table.items())


def _size_in_canvas(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[float, float]:
    """The image's size scaled into the canvas keeping its aspect ratio (HF's float arithmetic)."""
    scale = width / height
    factor = min(canvas_w / width, canvas_h / height)
    if scale > 1.0:
        new_w = factor * width
        return new_w, math.floor(new_w / scale)
    new_h = factor * height
    return math.floor(new_h * scale), new_h


def _fit_to_canvas(width: int, height: int, tile_size: int, max_num_tiles: int) -> Grid | None:
    """The grid whose canvas holds the image without downscaling and upscales it most, else None."""
    scale = width / height
    best: Grid | None = None
    best_size = (0.0, 0.0)
    for _, grids in _aspect_ratio_table(max_num_tiles):
        for n_w, n_h in grids:
            canvas_w, canvas_h = n_w * tile_size, n_h * tile_size
            if canvas_w < width or canvas_h < height:
                continue
            size = _size_in_canvas(width, height, canvas_w, canvas_h)
            if best is None or (
                size[0] >= best_size[0] if scale < 1.0 else size[1] >= best_size[1]
            ):
                best, best_size = (n_w, n_h), size
    return best


def _closest_aspect_ratio(width: int, height: int, max_num_tiles: int) -> Grid:
    """The grid of the closest ratio not wider (landscape) / narrower (portrait) than the image."""
    target = width / height
    table = _aspect_ratio_table(max_num_tiles)
    if target >= 1:
        _, grids = min(
            ((r, g) for r, g in table if r <= target), key=lambda rg: abs(rg[0] - target)
        )
        return max(grids, key=lambda g: g[0])
    _, grids = min(
        ((r, g) for r, g in table if r > target), key=lambda rg: abs(1 / rg[0] - 1 / target)
    )
    return max(grids, key=lambda g: g[1])


@functools.lru_cache(maxsize=4096, typed=True)  # typed: True is not a cached budget of 1
def tile_grid(width: int, height: int, tile_size: int, max_num_tiles: int) -> Grid:
    """(n_w, n_h) tiles for an image, as HF's PerceptionLM resize picks them, honoring this budget.

    The largest canvas the image fits into without downscaling wins; if none fits, the closest
    aspect ratio. A budget of 1 or less gives (1, 1); one over MAX_TILE_BUDGET is a MediaError.
    """
    if width < 1 or height < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    budget = _tile_budget(max_num_tiles)
    if budget <= 1:
        return 1, 1
    grid = _fit_to_canvas(width, height, tile_size, budget)
    return grid if grid is not None else _closest_aspect_ratio(width, height, budget)


def num_image_tiles(
    width: int,
    height: int,
    *,
    tile_size: int,
    max_num_tiles: int,
    vision_input_type: str = THUMB_AND_TILES,
) -> int:
    """Tiles (thumbnail included) HF produces for an image of this size; no pixels are touched.

    thumb+tile gives 1 + n_w * n_h, so a budget of 1 still gives 2 (thumbnail and one tile);
    any other vision_input_type gives the single squashed tile.
    """
    if vision_input_type != THUMB_AND_TILES:
        return 1
    n_w, n_h = tile_grid(width, height, tile_size, max_num_tiles)
    return 1 + n_w * n_h
