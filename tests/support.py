"""Paths and cached checkpoints the tests share (imported by conftest and by the test helpers)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plm_core.demo import cached_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_MEDIA = SHARED / "media"
CACHE = Path(os.environ.get("PLM_TEST_CACHE", REPO / ".cache" / "checkpoints"))


def checkpoint_path(preset: str) -> Path:
    """A preset's random checkpoint, built once and cached across runs by generator version."""
    return cached_checkpoint(preset, CACHE, quiet=True)


@contextmanager
def served_state(checkpoint: Path, model_name: str) -> Iterator[Any]:
    """A loaded server state (CPU engine, 4 sequences) for in-process app tests; shut down after."""
    from plm_core.config import EngineConfig
    from plm_core.engine.async_engine import AsyncEngine
    from plm_core.runtime import load_runtime
    from server.config import ServerConfig
    from server.state import ServerState

    config = EngineConfig.from_flat(model=str(checkpoint), device="cpu", max_num_seqs=4)
    engine = AsyncEngine(load_runtime(config))
    state = ServerState(ServerConfig(served_model_name=model_name, engine=engine.runtime.config))
    state.engine = engine
    try:
        yield state
    finally:
        engine.shutdown()
