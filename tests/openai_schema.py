"""OpenAI's published API schemas (../shared/openai-openapi.json) as a validator of responses.

`openai_validator()` gives check(schema_name, obj), raising jsonschema's ValidationError, or None
where the file is absent (a user's clone): the tests' own assertions still run then.
"""

from __future__ import annotations

import json

from support import SHARED

OPENAPI = SHARED / "openai-openapi.json"


def _convert(node):
    """OpenAPI 3.0 -> JSON Schema: `nullable` becomes a null alternative, component refs $defs."""
    if isinstance(node, dict):
        node = {k: _convert(v) for k, v in node.items()}
        if node.pop("nullable", False):
            node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_convert(v) for v in node]
    if isinstance(node, str):
        return node.replace("#/components/schemas/", "#/$defs/")
    return node


def openai_validator():
    if not OPENAPI.exists():
        return None
    import jsonschema

    defs = _convert(json.loads(OPENAPI.read_text())["components"]["schemas"])

    def check(name: str, obj: dict) -> None:
        # OpenAPI 3.0 schemas are draft-4 style (boolean exclusiveMinimum)
        jsonschema.Draft4Validator({"$ref": f"#/$defs/{name}", "$defs": defs}).validate(obj)

    return check
