"""Shared fixtures: random checkpoints (built once, cached under .cache/) and shared media."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import SHARED_MEDIA, checkpoint_path


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    return checkpoint_path("tiny")


@pytest.fixture(scope="session")
def shared_media() -> Path:
    if not SHARED_MEDIA.is_dir():
        pytest.skip(
            f"shared test media not found at {SHARED_MEDIA} (only present in the project workspace)"
        )
    return SHARED_MEDIA
