"""Tool calling and structured output (issue 10): the tool-call parser and grammar masks as
pure pieces, then the real server with the embedded SmolLM2 through the official openai SDK:
two-turn tool conversations (chat and Responses, streamed and not), forced calls, JSON
schemas on many seeds, refusals, and a stream dropped in the middle of a call's arguments."""

from __future__ import annotations

import concurrent.futures
import json
import random
import uuid

import jsonschema
import openai
import pytest
import torch

from conftest import read_events
from decoding import TOOL_FORMATS, ToolCallParser
from sampling import Grammar, GrammarError, RowSampler, SamplingParams, grammar_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "days": {"type": "integer", "minimum": 1,
                                                     "maximum": 14}},
           "required": ["city", "days"], "additionalProperties": False}
CHAT_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather forecast for a city",
    "parameters": WEATHER}}]
RESPONSE_TOOLS = [{"type": "function", "name": "get_weather",
                   "description": "Get the weather forecast for a city", "parameters": WEATHER}]
ASK = "What will the weather be in Paris for the next 3 days?"


# --- the parser, pure -------------------------------------------------------------------------


def parse(text: str, fmt: str = "hermes", seed: int = 0, names=("get_weather", "add")):
    """Feed `text` in random pieces of 1-5 characters; merge consecutive pieces per channel."""
    rng, parser, pieces, i = random.Random(seed), ToolCallParser(TOOL_FORMATS[fmt], set(names)), [], 0
    while i < len(text):
        k = rng.randint(1, 5)
        pieces += parser.feed(text[i:i + k])
        i += k
    pieces += parser.flush()
    merged: list[list[str]] = []
    for channel, piece in pieces:
        if merged and merged[-1][0] == channel and channel != "tool_call":
            merged[-1][1] += piece
        else:
            merged.append([channel, piece])
    return [tuple(m) for m in merged]


@pytest.mark.parametrize("text,expected", [
    ("Just an answer.", [("content", "Just an answer.")]),
    ('Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "s": "}]\\""}}\n</tool_call>',
     [("content", "Sure. "), ("tool_call", "add"), ("tool_arguments", '{"a": 1, "s": "}]\\""}')]),
    ('<tool_call>[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", '
     '"arguments": {"city": "Rome"}}]</tool_call>',
     [("tool_call", "add"), ("tool_arguments", '{"a": 1}'), ("tool_call", "get_weather"),
      ("tool_arguments", '{"city": "Rome"}')]),
    ('<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": '
     '"get_weather", "arguments": {"city": "x"}}</tool_call>',
     [("tool_call", "add"), ("tool_arguments", "{}"), ("tool_call", "get_weather"),
      ("tool_arguments", '{"city": "x"}')]),
    # other key order, arguments as a JSON string: read whole when the object closes
    ('<tool_call>{"arguments": {"a": 2}, "name": "add"}</tool_call>',
     [("tool_call", "add"), ("tool_arguments", '{"a": 2}')]),
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>',
     [("tool_call", "add"), ("tool_arguments", '{"a": 3}')]),
    # SmolLM2's "no call needed"
    ("<tool_call>[]</tool_call>Fine.", [("content", "Fine.")]),
])
def test_tool_calls_parse_the_same_however_the_text_is_split(text, expected):
    for seed in range(15):
        assert parse(text, seed=seed) == expected


@pytest.mark.parametrize("text", [
    "Write <tool_call> tags around the JSON, like the docs say.",  # no object follows
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> is what I would call.',  # unknown
    '<tool_call>{"name": "add" oops}</tool_call>',  # not JSON
    'Half a tag: <tool_ca',
    '<tool_call>{"name": "add", "argu',  # generation ended before a call was known
])
def test_text_that_only_looks_like_a_tool_call_stays_content(text):
    for seed in range(10):
        assert parse(text, seed=seed) == [("content", text)]


def test_whitespace_between_calls_is_not_content():
    text = ('<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>\n<tool_call>\n'
            '{"name": "add", "arguments": {"a": 5}}\n</tool_call>\n')
    for seed in range(10):
        assert parse(text, seed=seed) == [("tool_call", "add"), ("tool_arguments", "{}"),
                                          ("tool_call", "add"), ("tool_arguments", '{"a": 5}')]
    assert parse('<tool_call>{"name": "add", "arguments": 5}</tool_call> Done.')[-1] == (
        "content", " Done.")


def test_model_text_never_breaks_the_parser():
    for text in ['<tool_call>{"name": "a\\qb", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "a\nb", "arguments": {}}</tool_call>']:
        assert parse(text) == [("content", text)]
    lone = parse('<tool_call>{"arguments": {"a": "\\ud800"}, "name": "add"}</tool_call>')
    lone[-1][1].encode("utf-8")  # a lone surrogate would not reach the wire


def test_parallel_tool_calls_false_ends_the_turn_after_the_first_call():
    parser = ToolCallParser(TOOL_FORMATS["smollm2"], {"add"}, limit=1)
    out = parser.feed('<tool_call>[{"name": "add", "arguments": {"a": 1}}, {"name": "add", '
                      '"arguments": {"a": 2}}]</tool_call> and more')
    assert out == [("tool_call", "add"), ("tool_arguments", '{"a": 1}')] and parser.ended
    assert parser.feed("text") == [] and parser.flush() == []


def test_a_call_cut_off_mid_arguments_keeps_what_was_streamed():
    assert parse('<tool_call>{"name": "add", "arguments": {"a": 1') == [
        ("tool_call", "add"), ("tool_arguments", '{"a": 1')]


# --- grammar masks, pure (the embedded tokenizer, random logits) ------------------------------


@pytest.fixture(scope="module")
def table():
    import model
    _, tokenizer = model.gguf_metadata(model.embedded_model_dir(), model.EMBEDDED_GGUF)
    return tokenizer, grammar_tokenizer(tokenizer, 49152, {tokenizer.eos_token_id})


def test_unsupported_schema_keywords_are_named(table):
    with pytest.raises(GrammarError, match="uniqueItems"):
        Grammar("start: " + Grammar.json_schema({"type": "array", "uniqueItems": True}),
                table[1])


def test_forced_call_grammar_keeps_defs_references(table):
    from constraints import ToolSpec, tool_grammar
    params = {"$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object",
              "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"]}
    spec = ToolSpec([{"name": "f", "description": "", "parameters": params}], "required", True)
    for fmt in TOOL_FORMATS.values():
        Grammar(tool_grammar(spec, fmt), table[1])  # compiles: the reference resolves


def test_a_grammar_row_draws_only_valid_json_from_noise(table):
    tokenizer, tt = table
    eos = tokenizer.eos_token_id
    grammar = Grammar("start: " + Grammar.json_schema(WEATHER), tt)
    for seed in range(8):
        sampler = RowSampler(SamplingParams(max_new_tokens=200, temperature=1.0, grammar=grammar),
                             [], {eos}, seed, lambda t: ("", []))
        gen = torch.Generator().manual_seed(seed)
        tokens = []
        while not tokens or tokens[-1] != eos:
            tokens.append(sampler(torch.randn(49152, generator=gen) * 5)[0])
            assert len(tokens) < 200
        jsonschema.validate(json.loads(tokenizer.decode(tokens[:-1])), WEATHER)


# --- the server: tool conversations through the SDK -------------------------------------------


def test_chat_two_turn_tool_conversation(client):
    messages = [{"role": "user", "content": ASK}]
    first = client.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS,
                                           tool_choice="required", temperature=0, max_tokens=60)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C every day."}]
    second = client.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS,
                                            temperature=0, max_tokens=40)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content
    # The second turn streamed: the same answer (greedy), from the same tool result.
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=messages, tools=CHAT_TOOLS, temperature=0, max_tokens=40,
        stream=True) if c.choices)
    assert streamed == second.choices[0].message.content


def test_chat_streamed_tool_call_equals_the_non_streamed(client):
    body = dict(model="m", messages=[{"role": "user", "content": ASK}], tools=CHAT_TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls[0]
    calls, finish, pieces = {}, None, 0
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                if tc.id:
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
                pieces += 1
    assert finish == "tool_calls" and list(calls) == [0] and pieces > 3  # arguments in pieces
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name,
                                                         whole.function.arguments)


def test_responses_two_turn_tool_conversation_streamed_and_not(client):
    first = client.responses.create(model="m", input=ASK, tools=RESPONSE_TOOLS,
                                    tool_choice="required", temperature=0, max_output_tokens=60)
    assert first.status == "completed"
    (call,) = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    follow = dict(model="m", previous_response_id=first.id, tools=RESPONSE_TOOLS, temperature=0,
                  max_output_tokens=40,
                  input=[{"type": "function_call_output", "call_id": call.call_id,
                          "output": "Sunny, 21 C every day."}])
    second = client.responses.create(**follow)
    assert second.status in ("completed", "incomplete") and second.output_text
    # The same turns streamed: the SDK assembles the call from its argument deltas.
    with client.responses.stream(model="m", input=ASK, tools=RESPONSE_TOOLS,
                                 tool_choice="required", temperature=0,
                                 max_output_tokens=60) as stream:
        types = [ev.type for ev in stream]
        streamed = stream.get_final_response()
    assert types.count("response.function_call_arguments.delta") > 3
    assert "response.function_call_arguments.done" in types
    (scall,) = [o for o in streamed.output if o.type == "function_call"]
    assert scall.arguments == call.arguments
    with client.responses.stream(**{**follow, "previous_response_id": streamed.id}) as stream:
        assert stream.get_final_response().output_text == second.output_text


def test_tool_choice_none_and_no_tools_leave_tool_text_alone(client):
    r = client.chat.completions.create(
        model="m", temperature=0, max_tokens=30, tools=CHAT_TOOLS, tool_choice="none",
        messages=[{"role": "user", "content": ASK}])
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


# --- structured output on many seeds ----------------------------------------------------------

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}
SEEDS = range(6)


def person(client, seed: int, constrained: bool, max_tokens: int = 120) -> str:
    extra = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}}} if constrained else {}
    r = client.chat.completions.create(
        model="m", seed=seed, temperature=1.0, max_tokens=max_tokens, **extra,
        messages=[{"role": "user", "content": "Describe a person as JSON with name, age and "
                                              "hobbies."}])
    return r.choices[0].message.content


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_json_schema_output_is_valid_on_every_seed_and_not_without_it(client):
    with concurrent.futures.ThreadPoolExecutor(2 * len(SEEDS)) as pool:  # batched together
        constrained = pool.map(lambda s: person(client, s, True), SEEDS)
        free = pool.map(lambda s: person(client, s, False), SEEDS)
        constrained, free = list(constrained), list(free)
    bad = [t for t in constrained if not valid(t, PERSON)]
    assert not bad, bad
    assert sum(valid(t, PERSON) for t in free) < len(SEEDS)  # the grammar is what made them valid


def test_json_object_and_responses_text_format(client):
    r = client.chat.completions.create(model="m", temperature=0, max_tokens=150, messages=[
        {"role": "user", "content": "Return a JSON object with keys name and age."}],
        response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"  # a budget cut would leave it unfinished
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    resp = client.responses.create(model="m", input="A person as JSON.", max_output_tokens=120,
                                   temperature=1.0, text={"format": {
                                       "type": "json_schema", "name": "person",
                                       "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(resp.output_text), PERSON)
    assert resp.text.format.type == "json_schema"


def test_constrained_and_free_rows_batched_match_alone(client):
    alone = person(client, 7, True, 48), person(client, 8, False, 48)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = tuple(pool.map(lambda a: person(client, *a, 48), [(7, True), (8, False)]))
    assert together == alone


def test_unsupported_schema_is_a_400_naming_the_keyword(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.with_options(max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], tool_choice="required",
            tools=[{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "not": {}}}}])
    assert e.value.status_code == 400 and "not" in e.value.message
    assert e.value.body["param"] == "tools"


# --- resume in the middle of a call's arguments -----------------------------------------------


def tool_arguments(events: list[dict]) -> str:
    out = []
    for ev in events:
        if ev["data"] != "[DONE]":
            for choice in json.loads(ev["data"]).get("choices", []):
                for tc in choice["delta"].get("tool_calls") or []:
                    out.append(tc["function"].get("arguments") or "")
    return "".join(out)


def test_a_stream_dropped_mid_arguments_resumes_to_identical_arguments(http):
    sid = uuid.uuid4().hex
    body = {"session_id": sid, "stream": True, "temperature": 0, "max_tokens": 60,
            "messages": [{"role": "user", "content": ASK}], "tools": CHAT_TOOLS,
            "tool_choice": "required"}
    # role chunk, the call's first chunk (name), two argument pieces: then the line drops
    _, head = read_events(http, "POST", "/v1/chat/completions", limit=4, json=body)
    assert tool_arguments(head) and not json.loads(head[-1]["data"])["choices"][0]["finish_reason"]
    _, rest = read_events(http, "POST", "/v1/chat/completions", json=body,
                          headers={"Last-Event-ID": head[-1]["id"]})
    _, replay = read_events(http, "GET", f"/v1/sessions/{sid}/stream")
    assert [e["raw"] for e in head + rest] == [e["raw"] for e in replay]
    arguments = tool_arguments(head + rest)
    jsonschema.validate(json.loads(arguments), WEATHER)
    assert arguments == tool_arguments(replay)
    final = http.get(f"/v1/sessions/{sid}").json()
    assert final["finish_reason"] == "tool_calls" and final["state"] == "completed"
