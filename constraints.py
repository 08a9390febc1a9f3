"""What a request asks of its output's structure: tool calling and structured output, on the
request side. Checks `tools`/`tool_choice` (chat's nested and Responses' flat shapes) into a
`ToolSpec`, shows the tools to the model (the chat template's own `tools`, or the SmolLM2 tool
prompt for templates without), and turns forced calls and `response_format` / `text.format`
into an llguidance grammar (`Constraints`). Parsing calls out of the output is decoding's
`ToolCallParser`; applying the grammar per row is sampling's `RowSampler`. Raises APIError 400.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from decoding import TOOL_FORMATS, ToolFormat
from model import ModelHandle
from sampling import Grammar, GrammarError, grammar_tokenizer
from schemas import APIError, unsupported
from settings import settings


# ---------------------------------------------------------------------------------------------
# Tools and structured output
# ---------------------------------------------------------------------------------------------


TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ToolSpec:
    """A request's tools, one shape for chat and Responses: `functions` as
    {"name", "description", "parameters"}; `choice` "auto", "required" or a function name;
    `parallel`: more than one call allowed (if not, a forced call's grammar writes one and the
    parser ends the turn after the first)."""

    functions: list[dict[str, Any]]
    choice: str
    parallel: bool
    max_calls: int | None = None  # Responses' max_tool_calls

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f["name"] for f in self.functions)

    @property
    def limit(self) -> int | None:
        """Most calls in one turn (the parser ends the turn there); None: no limit."""
        limits = [n for n in (None if self.parallel else 1, self.max_calls) if n is not None]
        return min(limits) if limits else None


def tool_spec(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None,
              flat: bool, max_calls: int | None = None) -> ToolSpec | None:
    """The request's function tools, checked; None when no tool may be called (no tools, or
    tool_choice "none": the tools then stay out of the prompt too). `flat`: Responses' shape
    ({"type": "function", "name", ...}), else chat's ({"type": "function", "function": {...}}).
    Raises APIError 400 for other tool types, bad names or a tool_choice naming no tool."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise unsupported(f"tools[{i}].type", f"tools of type "
                                                  f"{(tool or {}).get('type')!r} are not "
                                                  f"supported: only 'function'", True)
        fn = tool if flat else tool.get("function")
        if not isinstance(fn, dict) or not TOOL_NAME_RE.match(str(fn.get("name", ""))):
            raise APIError(400, f"tools[{i}] needs a function name of 1-64 letters, digits, "
                                f"'_' or '-'", param=f"tools[{i}]")
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise APIError(400, f"tools[{i}] parameters must be a JSON schema object",
                           param=f"tools[{i}]")
        functions.append({"name": fn["name"], "description": fn.get("description") or "",
                          "parameters": parameters})
    if tool_choice in (None, "auto", "required", "none"):
        choice = tool_choice or "auto"
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        named = tool_choice if flat else tool_choice.get("function")
        choice = named.get("name") if isinstance(named, dict) else None
        if not isinstance(choice, str) or choice not in {f["name"] for f in functions}:
            raise APIError(400, f"tool_choice names function {choice!r}, which is not in tools",
                           param="tool_choice")
    else:
        raise unsupported("tool_choice", "tool_choice must be none, auto, required or a "
                                         "function", True)
    if choice == "none":
        return None
    return ToolSpec(functions, choice, parallel is not False, max_calls)


def tool_format(handle: ModelHandle) -> ToolFormat:
    """The served model's tool-call format: TOOL_CALL_PARSER, or for "auto" `hermes` when the
    chat template takes `tools` (Qwen's, Hermes') and else `smollm2` (the embedded model's
    trained format, whose tool prompt the server writes)."""
    name = settings.tool_call_parser
    if name == "auto":
        name = "hermes" if "tools" in handle.template_variables else "smollm2"
    return TOOL_FORMATS[name]


def template_tool_calls(calls: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` for chat templates: arguments as an object (what
    Hugging Face templates expect), the call id kept."""
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"{param}[{j}] needs function.name", param=f"{param}[{j}]")
        arguments = fn.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # kept as the string the client sent
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


# SmolLM2-Instruct's function-calling prompt (its model card), for templates without tools.
SMOLLM2_TOOL_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible "
    "functions. Based on the question, you will need to make one or more function/tool calls "
    "to achieve the purpose. If none of the functions can be used, answer the question "
    "directly.\n\nYou have access to the following tools:\n<tools>{tools}</tools>\n\nTo call "
    "tools, the output MUST strictly adhere to the following format. Please make sure the "
    "parameter type is correct.\n<tool_call>[\n{{\"name\": \"func_name1\", \"arguments\": "
    "{{\"argument1\": \"value1\", \"argument2\": \"value2\"}}}},\n... (more tool calls as "
    "required)\n]</tool_call>")


def with_tools(handle: ModelHandle, messages: list[dict[str, Any]], spec: ToolSpec | None,
               fmt: ToolFormat) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (and template kwargs) that show the model its tools and earlier calls.

    A template that takes `tools` gets them as `tools=[{"type": "function", "function"}]` and
    renders calls and results itself. Otherwise the server writes them in `fmt`: the tool
    prompt in the system message, earlier calls as `<tool_call>` text in the assistant turn,
    results as `tool` turns.
    """
    if "tools" in handle.template_variables:
        tools = [{"type": "function", "function": f} for f in spec.functions] if spec else None
        return messages, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        m.pop("tool_call_id", None)
        if calls:
            text = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                    for c in calls]
            bodies = ([json.dumps(text, ensure_ascii=False)] if fmt.listed
                      else [json.dumps(c, ensure_ascii=False) for c in text])  # a tag per call
            tag = "\n".join(f"{fmt.open}{body}{fmt.close}" for body in bodies)
            if isinstance(m["content"], list):
                m["content"] = m["content"] + [{"type": "text", "text": tag}]
            else:
                m["content"] = (m["content"] or "") + tag
        out.append(m)
    if spec:
        prompt = SMOLLM2_TOOL_PROMPT.format(tools=json.dumps(
            [{"name": f["name"], "description": f["description"], "parameters": f["parameters"]}
             for f in spec.functions], ensure_ascii=False))
        if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        elif out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + [{"type": "text", "text": prompt}]}
        else:
            text = prompt if handle.processor is None else [{"type": "text", "text": prompt}]
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def tool_grammar(spec: ToolSpec, fmt: ToolFormat) -> str | None:
    """Lark grammar forcing tool calls (tool_choice "required" or a named function): `fmt`'s
    tags around {"name", "arguments"} objects whose arguments match the function's
    parameters; one call unless parallel calls are allowed. None for "auto"."""
    if spec.choice == "auto":
        return None
    chosen = [f for f in spec.functions if spec.choice in ("required", f["name"])]
    call = Grammar.json_schema({"anyOf": [
        {"type": "object", "properties": {
            "name": {"const": f["name"]},
            "arguments": rebase_refs(f["parameters"], f"#/anyOf/{i}/properties/arguments")},
         "required": ["name", "arguments"], "additionalProperties": False}
        for i, f in enumerate(chosen)]})
    many = spec.parallel and spec.choice == "required"
    if fmt.listed:
        calls = 'call (", " call)*' if many else "call"
        return (f'start: {json.dumps(fmt.open)} "[" {calls} "]" {json.dumps(fmt.close)}\n'
                f"call: {call}")
    tag = f'{json.dumps(fmt.open + chr(10))} call {json.dumps(chr(10) + fmt.close)}'
    return f'start: tag{" (" + json.dumps(chr(10)) + " tag)*" if many else ""}\n' \
           f"tag: {tag}\ncall: {call}"


def rebase_refs(schema: Any, base: str) -> Any:
    """`schema` with its local `$ref`s ("#", "#/$defs/X") pointing under `base`, where it is
    nested in the call grammar's schema (Pydantic-made tool schemas use `$defs`)."""
    if isinstance(schema, dict):
        return {k: (base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else rebase_refs(v, base)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [rebase_refs(v, base) for v in schema]
    return schema


def tool_chars(spec: "ToolSpec | None", messages: list[dict[str, Any]]) -> int:
    """Characters the tools and earlier calls add to a prompt, for the character bound
    (check_prompt_chars): a template renders them outside the message text."""
    calls = [c for m in messages for c in m.get("tool_calls") or []]
    return (len(json.dumps(spec.functions)) if spec else 0) + len(json.dumps(calls))


def format_grammar(fmt: Any, param: str, flat: bool) -> str | None:
    """Lark grammar for `response_format` (chat) or `text.format` (Responses, `flat`):
    json_object any JSON object, json_schema valid against the schema; None for text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type", "text"), str):
        raise APIError(400, f"{param} must be an object with a type", param=param)
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "start: " + Grammar.json_schema({"type": "object"})
    if kind != "json_schema":
        raise unsupported(f"{param}.type", f"{param} type {kind!r} is not supported (text, "
                                           f"json_object, json_schema)", True)
    spec = fmt if flat else fmt.get("json_schema")
    where = param if flat else f"{param}.json_schema"
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise APIError(400, f"{where} needs a name", param=where)
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise APIError(400, f"{where}.schema must be a JSON schema object",
                       param=f"{where}.schema")
    return "start: " + Grammar.json_schema(schema)


def vocab_size(handle: ModelHandle) -> int:
    """Width of the model's logits (embedding rows; may exceed the tokenizer's length)."""
    out = handle.model.get_output_embeddings()
    return int((out if out is not None else handle.model.get_input_embeddings()).weight.shape[0])


def compile_grammar(handle: ModelHandle, lark: str | None, param: str) -> Grammar | None:
    """The grammar checked and compiled for the served tokenizer (in a worker thread; ~ms).
    Raises APIError 400 naming what llguidance cannot enforce (e.g. 'not', 'uniqueItems')."""
    if lark is None:
        return None
    try:
        return Grammar(lark, grammar_tokenizer(handle.tokenizer, vocab_size(handle),
                                               handle.eos_token_ids))
    except GrammarError as e:
        reason = str(e).split("\n")[0]
        reason = re.sub(r"^at \d+\(\d+\): ", "", reason)
        raise APIError(400, f"{param}: this schema cannot be enforced: {reason}", param=param,
                       code="invalid_json_schema") from e


@dataclass
class Constraints:
    """What a request asks of its output's structure: tool calls to parse, a grammar."""

    tools: ToolSpec | None
    format: ToolFormat
    grammar: Grammar | None


async def constraints(handle: ModelHandle, spec: ToolSpec | None, fmt_value: Any,
                      fmt_param: str, flat: bool) -> Constraints:
    """Tool calling and structured output of one request: forced tool calls win over the
    response format (OpenAI applies the format to the answer, not to the calls)."""
    fmt = tool_format(handle)
    lark, param = (tool_grammar(spec, fmt), "tools") if spec else (None, "tools")
    if lark is None:
        lark = format_grammar(fmt_value, fmt_param, flat)
        param = f"{fmt_param}.schema" if flat else f"{fmt_param}.json_schema.schema"
    grammar = await asyncio.to_thread(compile_grammar, handle, lark, param) if lark else None
    return Constraints(spec, fmt, grammar)
