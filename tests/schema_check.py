"""A small JSON Schema checker for the tests of constrained decoding (the subset their schemas use:
type, properties, required, additionalProperties, enum, const, string/array lengths, number bounds,
items, anyOf), so the tests need no extra dependency."""

from __future__ import annotations

TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def errors(value, schema: dict, at: str = "$") -> list[str]:
    """Every way `value` breaks `schema`, as readable strings; [] when it conforms."""
    if "anyOf" in schema:
        if all(errors(value, s, at) for s in schema["anyOf"]):
            return [f"{at}: matches none of anyOf"]
        return []
    found = _type_errors(value, schema, at)
    if found:
        return found
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        found.append(f"{at}: {value!r} != {schema['const']!r}")
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        found.append(f"{at}: longer than {schema['maxLength']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            found.append(f"{at}: {value} out of bounds")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            found.append(f"{at}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            found += errors(item, schema.get("items", {}), f"{at}[{i}]")
    if isinstance(value, dict):
        found += _object_errors(value, schema, at)
    return found


def _type_errors(value, schema: dict, at: str) -> list[str]:
    kind = schema.get("type")
    if kind is None:
        return []
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, TYPES[kind])
    return [] if ok else [f"{at}: {value!r} is not {kind}"]


def _object_errors(value: dict, schema: dict, at: str) -> list[str]:
    props = schema.get("properties", {})
    found = [f"{at}: missing {k}" for k in schema.get("required", []) if k not in value]
    for key, item in value.items():
        if key in props:
            found += errors(item, props[key], f"{at}.{key}")
        elif schema.get("additionalProperties", True) is False:
            found.append(f"{at}: unexpected {key}")
    return found
