"""The request's output constraint, read into one plain `StructuredOutput` for the engine.

It comes from OpenAI's `response_format`, or vLLM's `structured_outputs` (and its older `guided_*`
fields); a request without one gets None.
"""

from __future__ import annotations

import json
import re
from typing import Any

from plm_core.sampling import StructuredOutput

_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_VLLM_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


class ConstraintError(ValueError):
    """A malformed output constraint; `param` names the request field (for the 400's envelope)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def structured_output(extra: dict[str, Any]) -> tuple[StructuredOutput | None, str | None]:
    """(the constraint, the request field it came from) from the request's extra fields;
    ConstraintError for a malformed one or for more than one."""
    found: list[tuple[StructuredOutput, str]] = []
    fmt = extra.get("response_format")
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append((spec, "response_format"))
    so = extra.get("structured_outputs")
    if so is not None:
        found.append((_vllm(so, "structured_outputs"), "structured_outputs"))
    for name, kind in _GUIDED.items():
        if extra.get(name) is not None:
            found.append((_vllm({kind: extra[name]}, name), name))
    if len(found) > 1:
        raise ConstraintError(
            f"give one output constraint, not {' and '.join(p for _, p in found)}", found[1][1]
        )
    return found[0] if found else (None, None)


def _response_format(fmt: object) -> StructuredOutput | None:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ConstraintError("response_format must be an object with a 'type'", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind != "json_schema":
        raise ConstraintError(
            f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
            f"'json_schema'",
            "response_format.type",
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ConstraintError(
            "response_format of type 'json_schema' needs a 'json_schema' object",
            "response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ConstraintError(
            "response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
            "response_format.json_schema.name",
        )
    schema = spec.get("schema", {})  # no schema: any JSON value
    if not isinstance(schema, dict):
        raise ConstraintError(
            "response_format.json_schema.schema must be a JSON Schema object",
            "response_format.json_schema.schema",
        )
    try:
        return StructuredOutput(json=json.dumps(schema))
    except RecursionError:
        raise ConstraintError(
            "the JSON schema is nested too deeply", "response_format.json_schema.schema"
        ) from None


def _vllm(so: object, param: str) -> StructuredOutput:
    if not isinstance(so, dict):
        raise ConstraintError(
            f"{param} must be an object with one of {', '.join(_VLLM_KINDS)}", param
        )
    kwargs = {k: v for k, v in so.items() if k in _VLLM_KINDS and v is not None and v is not False}
    try:
        if isinstance(kwargs.get("json"), dict):
            kwargs["json"] = json.dumps(kwargs["json"])
        return StructuredOutput(**kwargs)
    except RecursionError:
        raise ConstraintError(f"{param}: the JSON schema is nested too deeply", param) from None
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"{param}: {e}", param) from None
