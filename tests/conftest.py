"""Shared fixtures: random checkpoints built once per run (cached under .cache/), shared media paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDIA = REPO.parent / "shared" / "media"
CACHE = Path(os.environ.get("PLM_TEST_CACHE", REPO / ".cache" / "checkpoints"))


def _generator_version() -> str:
    h = hashlib.sha256()
    for name in ("make_checkpoint.py", "tokenizer.py"):
        h.update((REPO / "plm_core" / "testing" / name).read_bytes())
    return h.hexdigest()[:12]


def checkpoint_path(preset: str) -> Path:
    """Builds (once, cached across runs by generator version) and returns a preset's checkpoint."""
    from plm_core.testing.make_checkpoint import write_checkpoint

    path = CACHE / f"{preset}-{_generator_version()}"
    if not (path / "config.json").exists():
        write_checkpoint(preset, path, overwrite=True)
    return path


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
