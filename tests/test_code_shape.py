"""The code keeps the shape the project agreed on: small modules and short functions."""

from __future__ import annotations

import ast

from support import REPO

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
PACKAGES = ("plm_core", "server")


def _sources():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def test_modules_are_small_and_say_what_they_own():
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(REPO)
        assert len(text.splitlines()) <= MAX_FILE_LINES, f"{rel} has over {MAX_FILE_LINES} lines"
        if text.strip():
            assert ast.get_docstring(ast.parse(text)), f"{rel} has no module docstring"


def test_functions_are_short():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
