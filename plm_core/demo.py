"""Offline random-weight checkpoints, built once and cached: the `--demo` server,
`python -m plm_core --demo` and the test suite all get theirs here.

A checkpoint's folder name holds a hash of the generator's source, so a changed generator builds a
new one instead of serving a stale one. It is written to a private folder and renamed into place,
so replicas (or test workers) sharing one cache volume can start together: the first rename wins.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

_GENERATOR = Path(__file__).resolve().parent / "testing"


def demo_dir() -> Path:
    """$PLM_SERVE_CACHE/checkpoints, else $XDG_CACHE_HOME (or ~/.cache)/plm-serve/checkpoints."""
    root = os.environ.get("PLM_SERVE_CACHE")
    if root:
        return Path(root) / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "plm-serve" / "checkpoints"


def generator_version() -> str:
    """A short hash of the checkpoint generator's source (make_checkpoint.py and tokenizer.py)."""
    h = hashlib.sha256()
    for name in ("make_checkpoint.py", "tokenizer.py"):
        h.update((_GENERATOR / name).read_bytes())
    return h.hexdigest()[:12]


def cached_checkpoint(preset: str, root: Path, *, quiet: bool = False) -> Path:
    """The `preset` checkpoint under `root`, built there first if it is not yet."""
    from plm_core.testing.make_checkpoint import write_checkpoint

    path = Path(root) / f"{preset}-{generator_version()}"
    if (path / "config.json").exists():
        return path
    if not quiet:
        print(f"building the {preset} checkpoint (random weights) in {path} ...", file=sys.stderr)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    write_checkpoint(preset, tmp, overwrite=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").exists():
            raise
    return path


def demo_checkpoint(preset: str = "tiny") -> Path:
    """The demo checkpoint of `preset` (tiny or bench) under demo_dir()."""
    return cached_checkpoint(preset, demo_dir())
