"""What every serving benchmark result carries: the command that made it, the machine and software
it ran on, and how it is written."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command_line(argv: list[str]) -> str:
    """The benchmark's command as run from the repository root."""
    python = Path(sys.executable)
    shown = python.relative_to(REPO) if python.is_relative_to(REPO) else python.name
    return shlex.join([str(shown), "benchmarks/serve_bench.py", *argv])


def environment() -> dict:
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    dirty = git("diff", "--quiet", "HEAD", "--")
    versions = {}
    for pkg in ("torch", "transformers", "httpx"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
        "git_commit": head.stdout.strip() if head and head.returncode == 0 else None,
        "git_dirty": None if dirty is None else dirty.returncode != 0,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def report_head(title: str, results: dict) -> list[str]:
    """A report's first lines: its title, the command that made it, the date, machine and notes."""
    return [
        f"# {title}",
        "",
        "Made with (from the repository root):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        *environment_lines(results["environment"]),
        *[f"- Note: {n}" for n in results.get("notes") or []],
    ]


def environment_lines(env: dict) -> list[str]:
    """The report's date and machine lines."""
    return [
        f"- Date: {env.get('date')}; git commit `{env.get('git_commit')}`"
        + (" (with uncommitted changes)" if env.get("git_dirty") else ""),
        f"- Machine: {env.get('cpus_usable')} usable CPUs ({env.get('cpu_count')} in all), "
        f"{env.get('platform')}; Python {env.get('python')}, torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}",
    ]


def load_average() -> float | None:
    """The machine's 1-minute load average (other work on a shared machine shows here), None if
    unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"
