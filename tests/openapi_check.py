"""Validate server output against the published OpenAPI schemas copied into tests/schemas/.

    validate(obj, "ResponseResource")                          # Open Responses (default spec)
    validate(obj, "Response", spec="openai-responses")         # OpenAI's own Responses schemas
    validate(chunk, "CreateChatCompletionStreamResponse", spec="openai-chat")
    validate_stream_event(event)                               # picks the schema by event["type"]
    validate_stream_event(event, spec="openai-responses")

Each copy (tests/schemas/*.json) keeps the published `components.schemas` as written, less the
documentation keys; its "x-source" says where and when it was copied from (openai-responses.json
also trims a few large unions, such as output items and tools, to the members this server can
emit: its x-source.notes lists every trim). When loading:

- OpenAPI 3.0 `nullable: true` (still present in places of OpenAI's 3.1 document) becomes
  `anyOf: [<the schema without nullable>, {"type": "null"}]`: null is allowed besides what the
  schema allows, also where the schema has an `enum` or a `$ref`;
- `discriminator` is an annotation only (JSON Schema ignores unknown keywords): `oneOf`/`anyOf`
  decide on their own;
- formats are not asserted (OpenAI's "unixtime" is no JSON Schema format).

A failure raises AssertionError listing every failing path (JSON-path style) with what the spec
wants, and for anyOf/oneOf the reasons each alternative rejected the value.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
from referencing.jsonschema import DRAFT202012

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
SPECS = {"openresponses": "openresponses.json", "openai-chat": "openai-chat.json",
         "openai-responses": "openai-responses.json"}


def _translate(node: Any) -> Any:
    """OpenAPI 3.0 -> JSON Schema 2020-12, recursively (see the module docstring)."""
    if isinstance(node, list):
        return [_translate(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _translate(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.lru_cache(maxsize=None)
def load(spec: str = "openresponses") -> dict[str, Any]:
    """The spec's document as copied, `components.schemas` translated."""
    raw = json.loads((SCHEMAS_DIR / SPECS[spec]).read_text())
    doc = copy.deepcopy(raw)
    doc["components"]["schemas"] = _translate(raw["components"]["schemas"])
    return doc


@functools.lru_cache(maxsize=None)
def _registry(spec: str) -> referencing.Registry:
    resource = referencing.Resource.from_contents(load(spec), default_specification=DRAFT202012)
    return referencing.Registry().with_resource(f"urn:openapi:{spec}", resource)


@functools.lru_cache(maxsize=None)
def _validator(schema_name: str, spec: str) -> jsonschema.protocols.Validator:
    if schema_name not in load(spec)["components"]["schemas"]:
        raise KeyError(f"{spec} has no schema {schema_name!r}")
    root = {"$ref": f"urn:openapi:{spec}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(root, registry=_registry(spec))


def _path(path) -> str:
    out = "$"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(err: jsonschema.ValidationError, indent: str = "  ", depth: int = 0) -> list[str]:
    where = _path(err.absolute_path)
    rule = "/".join(str(p) for p in err.schema_path)
    if err.validator in ("anyOf", "oneOf") and err.context and depth < 3:
        lines = [f"{indent}{where}: {_short(err.instance)} matches no alternative of "
                 f"{err.validator}  [schema: {rule}]"]
        by_branch: dict[int, list[jsonschema.ValidationError]] = {}
        for sub in err.context:
            by_branch.setdefault(sub.schema_path[0], []).append(sub)
        for branch, subs in sorted(by_branch.items()):
            lines.append(f"{indent}  alternative {branch}:")
            for sub in sorted(subs, key=lambda e: len(e.absolute_path))[:4]:
                lines += _describe(sub, indent + "    ", depth + 1)
        return lines
    return [f"{indent}{where}: {err.message}  [schema: {rule}]"]


def errors(obj: Any, schema_name: str, spec: str = "openresponses") -> list[str]:
    """Readable descriptions of every way `obj` fails `schema_name` (empty if it conforms)."""
    try:
        errs = sorted(_validator(schema_name, spec).iter_errors(obj),
                      key=lambda e: (list(map(str, e.absolute_path)), str(e.schema_path)))
    except referencing.exceptions.Unresolvable as e:
        return [f"  unresolvable reference in the copied schema: {getattr(e, 'ref', str(e)[:200])} "
                f"({type(e).__name__}; see x-source.notes of tests/schemas/{SPECS[spec]})"]
    out: list[str] = []
    for err in errs:
        out += _describe(err)
    return out


def validate(obj: Any, schema_name: str, spec: str = "openresponses") -> None:
    """Raise AssertionError, listing every failing path, unless `obj` conforms to the schema."""
    problems = errors(obj, schema_name, spec)
    if problems:
        raise AssertionError(
            f"{spec} schema {schema_name} rejects the object:\n" + "\n".join(problems)
            + f"\nobject: {_short(obj, 1500)}")


# --- Responses streaming events --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def stream_event_schemas(spec: str = "openresponses") -> dict[str, str]:
    """{event type: schema name} for every schema in the spec's union of streaming events: Open
    Responses' `x-streaming-events` (its /responses text/event-stream oneOf), OpenAI's
    `ResponseStreamEvent` anyOf."""
    doc = load(spec)
    union = (doc["x-streaming-events"]["oneOf"] if "x-streaming-events" in doc
             else doc["components"]["schemas"]["ResponseStreamEvent"]["anyOf"])
    out: dict[str, str] = {}
    for alt in union:
        name = alt["$ref"].rsplit("/", 1)[1]
        for event_type in doc["components"]["schemas"][name]["properties"]["type"]["enum"]:
            assert event_type not in out, f"event type {event_type} listed twice"
            out[event_type] = name
    return out


def validate_stream_event(event: Any, spec: str = "openresponses") -> str:
    """Validate one streamed Responses event by its `type`; returns the schema name used.

    Fails if the event has no `type` or a type that the spec's event-stream schema does not list.
    """
    table = stream_event_schemas(spec)
    event_type = event.get("type") if isinstance(event, dict) else None
    if event_type not in table:
        raise AssertionError(
            f"the server emitted an event of type {event_type!r}, which the {spec} spec does not "
            f"list among its streaming events ({len(table)} types: {sorted(table)})\n"
            f"event: {_short(event, 1500)}")
    validate(event, table[event_type], spec)
    return table[event_type]
