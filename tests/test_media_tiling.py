"""PLM's tile grid against HF's choice (sizes only), budgets and the tile-count seam."""

from __future__ import annotations

import functools
import random
import time

import numpy as np
import pytest

from plm_core.media.errors import MediaError
from plm_core.media.settings import ImageSettings
from plm_core.media.tiling import MAX_TILE_BUDGET, num_image_tiles, tile_grid


@functools.cache
def hf_processor(max_num_tiles: int = 36):
    from transformers import PerceptionLMImageProcessor

    # HF reads the tile budget from the instance, so build one per budget
    return PerceptionLMImageProcessor(max_num_tiles=max_num_tiles)


def hf_grid(width: int, height: int, max_num_tiles: int, tile_size: int = 448) -> tuple[int, int]:
    """HF's own choice of grid, through its private methods (cheap enough for a wide sweep)."""
    if max_num_tiles <= 1:
        return 1, 1
    p = hf_processor(max_num_tiles)
    grid = p._fit_image_to_canvas(img_width=width, img_height=height, tile_size=tile_size)
    return grid or p._find_closest_aspect_ratio(
        img_width=width, img_height=height, tile_size=tile_size
    )


# -- tile grids ------------------------------------------------------------------------------------


def test_tile_grid_sweep_equals_hf():
    rng = random.Random(0)
    sizes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(300)]
    sizes += [(rng.randint(1, 900), rng.randint(1, 900)) for _ in range(300)]
    sizes += [(448 * a, 448 * b) for a in range(1, 8) for b in range(1, 8)]
    sizes += [(1, 1), (1, 5000), (5000, 1), (447, 449), (449, 447)]
    for budget in (1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 36):
        for w, h in sizes:
            assert tile_grid(w, h, 448, budget) == hf_grid(w, h, budget), (w, h, budget)


def test_tile_grid_other_tile_size_equals_hf():
    p = hf_processor(9)
    for w, h in [(100, 700), (1000, 300), (336, 336), (337, 335)]:
        ref = p._fit_image_to_canvas(
            img_width=w, img_height=h, tile_size=336
        ) or p._find_closest_aspect_ratio(img_width=w, img_height=h, tile_size=336)
        assert tile_grid(w, h, 336, 9) == ref


def test_tile_counts_from_notes():
    assert num_image_tiles(448, 448, tile_size=448, max_num_tiles=36) == 37
    assert num_image_tiles(1920, 1080, tile_size=448, max_num_tiles=36) == 33
    # a budget of 1 still gives the thumbnail plus one tile, as in HF
    assert num_image_tiles(1920, 1080, tile_size=448, max_num_tiles=1) == 2
    assert tile_grid(1920, 1080, 448, 0) == (1, 1)


def test_tile_budget_is_honored_per_call():
    assert tile_grid(448, 448, 448, 36) == (6, 6)
    assert tile_grid(448, 448, 448, 4) == (2, 2)
    assert tile_grid(448, 448, 448, 36) == (6, 6)


@pytest.mark.parametrize("budget", [1025, 10**7, 10**30])  # MAX_TILE_BUDGET is 1024
def test_huge_tile_budgets_are_refused_at_once(budget):
    start = time.perf_counter()
    with pytest.raises(MediaError, match=f"over the largest supported budget of {MAX_TILE_BUDGET}"):
        tile_grid(97, 61, 448, budget)
    assert time.perf_counter() - start < 0.5
    assert tile_grid(97, 61, 448, MAX_TILE_BUDGET) is not None  # the guard's own value still works


@pytest.mark.parametrize("bad", [True, False, 4.0, "4", None])
def test_tile_budget_must_be_an_integer(bad):
    with pytest.raises(MediaError, match="max_num_tiles must be an integer"):
        tile_grid(100, 100, 448, bad)
    assert tile_grid(100, 100, 448, np.int64(4)) == tile_grid(100, 100, 448, 4)


def test_image_settings_keys():
    tiled = ImageSettings(448, 36)
    assert tiled.tiled and tiled.key == "tiles:448:36"
    assert ImageSettings(448, 4).key != tiled.key
    thumb = ImageSettings.thumbnail(448)
    assert not thumb.tiled and thumb.key == "single:448"
    # a checkpoint without tiles ("vanilla") gives the same single tile as a thumbnail
    assert ImageSettings(448, 36, "vanilla").key == thumb.key
    one = num_image_tiles(900, 600, tile_size=448, max_num_tiles=1, vision_input_type="thumbnail")
    assert one == 1
