"""Paths and cached checkpoints the tests share (imported by conftest and by the test helpers)."""

from __future__ import annotations

import os
from pathlib import Path

from plm_core.demo import cached_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_MEDIA = SHARED / "media"
CACHE = Path(os.environ.get("PLM_TEST_CACHE", REPO / ".cache" / "checkpoints"))


def checkpoint_path(preset: str) -> Path:
    """A preset's random checkpoint, built once and cached across runs by generator version."""
    return cached_checkpoint(preset, CACHE, quiet=True)
