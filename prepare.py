"""Request body to model inputs: validation the schema cannot do, refusals, chat template,
media, tokenizing, sampling parameters. Runs before a session exists; raises APIError (400/413).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
import torch
from transformers.video_utils import VideoMetadata

from constraints import (Constraints, constraints, template_tool_calls, tool_chars, tool_spec,
                         with_tools)
from decoding import ToolFormat, prompt_opens_thinking
from media import (MediaError, MediaLimits, Video, decode_image, decode_video, load_bytes,
                   media_url)
from model import ModelHandle
from sampling import SamplingParams
from schemas import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest,
                     OpenAISampling, ResponsesRequest, Sampling, prompt_count, unsupported)
from settings import settings
from upstream import chat_body, completion_body, response_chat_body

log = logging.getLogger("resumable.prepare")


# ---------------------------------------------------------------------------------------------
# Checks every body gets
# ---------------------------------------------------------------------------------------------


# Deeper JSON than any OpenAI body needs; deeper is refused before anything recurses over it
# (json.dumps, the media redaction and the store would hit Python's recursion limit: a 500 and a
# session that never ends).
MAX_JSON_DEPTH = 64


def check_unicode(value: Any) -> None:
    """400 for a body nested deeper than MAX_JSON_DEPTH, or naming the first string that holds
    a lone UTF-16 surrogate ("\\ud800" in JSON is legal, but such text cannot be encoded,
    tokenized or stored). Iterative: hostile nesting cannot exhaust the stack here."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"{path or 'body'}: JSON nested more than {MAX_JSON_DEPTH} "
                                f"levels deep", param=path or None, code="invalid_body")
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"{path or 'body'}: text contains a lone surrogate "
                                    f"(U+{ord(item[e.start]):04X}); send valid Unicode",
                               param=path or None, code="invalid_unicode") from None
        elif isinstance(item, dict):
            for k, v in reversed(list(item.items())):
                stack.append((v, f"{path}.{k}" if path else str(k), depth + 1))
                stack.append((k, path, depth + 1))
        elif isinstance(item, list):
            for i in reversed(range(len(item))):
                stack.append((item[i], f"{path}[{i}]", depth + 1))


def body_digest(body: dict[str, Any]) -> str:
    """Digest of a request body without its `session_id`, for the idempotency check."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "session_id"},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Refusals: fields this server cannot honour
# ---------------------------------------------------------------------------------------------


def refuse_unsupported(req: ChatCompletionRequest, upstream: bool = False) -> None:
    """400 naming the first known chat field or value this server cannot honour (yet). In
    front of an `upstream`, `reasoning_effort` is its to honour or refuse (vLLM takes it)."""
    check_rows("n", req.n or 1)
    names = ("functions", "prediction", "web_search_options", "audio") + (
        () if upstream else ("reasoning_effort",))
    for name in names:
        # Present is a request for the feature ({} turns web search on); an empty tool list
        # asks for nothing.
        if getattr(req, name) is not None and getattr(req, name) != []:
            raise unsupported(name, f"'{name}' is not supported by this server")
    if req.function_call not in (None, "none"):
        raise unsupported("function_call", "'function_call' other than 'none' is not supported "
                                           "by this server", True)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    if req.modalities and set(req.modalities) - {"text"}:
        raise unsupported("modalities", "only the 'text' output modality is supported", True)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options")
    if req.continue_final_message:
        # vLLM's checks (ChatCompletionRequest.check_generation_prompt), and the last message
        # must be the assistant's to continue.
        if req.add_generation_prompt:
            raise APIError(400, "cannot set both continue_final_message and "
                                "add_generation_prompt to true", param="continue_final_message")
        if req.messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs an assistant message last",
                           param="continue_final_message")
    for i, m in enumerate(req.messages):
        if m.role == "function":
            raise unsupported(f"messages[{i}].role", "'function' messages (the deprecated "
                                                     "functions API) are not supported: use "
                                                     "tools and 'tool' messages", True)


def check_rows(param: str, rows: int) -> None:
    """400 when a request asks for more sequences (n x prompts) than one batch may hold."""
    if rows > settings.max_num_seqs:
        raise APIError(400, f"this request asks for {rows} sequences (n x prompts); this server "
                            f"decodes at most {settings.max_num_seqs} at once (MAX_NUM_SEQS)",
                       param=param, code="unsupported_value")


def refuse_unsupported_completion(req: CompletionRequest) -> None:
    """400 for legacy completions features this server cannot honour, or limits exceeded."""
    if req.best_of is not None and req.best_of < (req.n or 1):
        raise APIError(400, "best_of must be greater than or equal to n", param="best_of")
    if req.best_of is not None and req.best_of > (req.n or 1):
        raise unsupported("best_of", "best_of greater than n is not supported (every generated "
                                     "choice is returned)", True)
    if req.echo and req.logprobs is not None:
        raise unsupported("logprobs", "logprobs together with echo (prompt logprobs) is not "
                                      "supported", True)
    check_rows("n", (req.n or 1) * prompt_count(req.prompt))


UNSUPPORTED_ITEM_TYPES = {"file_search_call",
                           "web_search_call", "computer_call", "computer_call_output",
                           "code_interpreter_call", "image_generation_call", "local_shell_call",
                           "mcp_call", "mcp_list_tools", "custom_tool_call", "item_reference"}


def refuse_unsupported_response(body: ResponsesRequest) -> None:
    """400 (unsupported_parameter / unsupported_value) naming the first known Responses
    feature this server does not implement."""
    checks = [  # (param, refused, what, a value of a known field)
        ("conversation", body.conversation is not None, "conversation objects", False),
        ("prompt", body.prompt is not None, "prompt templates", False),
        ("include", bool(set(body.include or []) - {"message.output_text.logprobs"}),
         "include values other than message.output_text.logprobs", True),
        ("truncation", body.truncation not in (None, "disabled"), "truncation 'auto'", True),
        ("reasoning.summary", (body.reasoning or {}).get("summary") is not None,
         "reasoning summaries", True),
    ]
    for param, bad, feature, value in checks:
        if bad:
            raise unsupported(param, f"{feature} is not supported by this server", value)


# ---------------------------------------------------------------------------------------------
# Messages and media
# ---------------------------------------------------------------------------------------------


# Content-part types that carry media: OpenAI's, vLLM's video_url, Qwen's own, Responses' input_image.
MEDIA_PARTS = {"image_url": "image", "input_image": "image", "image": "image",
               "video_url": "video", "video": "video"}


def chat_messages(messages: list[ChatMessage], handle: ModelHandle) -> list[dict[str, Any]]:
    """Request messages in the shape the chat template wants.

    Tokenizer templates get string content; processor templates (vision-language models) get
    content-part lists, media parts as `{"type": "image"|"video", "url", "param"}` for
    `prepare_chat_inputs` to fetch. `developer` becomes `system`, which chat templates know.
    Raises APIError 400 for media the model cannot take, unknown parts, too many media items.
    """
    out, media = [], 0
    for i, m in enumerate(messages):
        parts = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else (m.content or [])
        content: list[dict[str, Any]] = []
        for j, part in enumerate(parts):
            part_type, param = part.get("type"), f"messages[{i}].content[{j}]"
            if part_type in ("text", "input_text") and isinstance(part.get("text"), str):
                content.append({"type": "text", "text": part["text"]})
            elif part_type in MEDIA_PARTS:
                modality = MEDIA_PARTS[part_type]
                if modality not in handle.input_modalities:
                    raise APIError(400, f"the served model {handle.name} does not accept "
                                        f"{modality}s: it takes {', '.join(handle.input_modalities)}",
                                   param=param, code="unsupported_modality")
                url = media_url(part)
                if not isinstance(url, str):
                    raise APIError(400, f"a {part_type} part needs a url string", param=param)
                media += 1
                if media > settings.max_media_per_request:
                    raise APIError(400, f"too many images and videos in one request (at most "
                                        f"{settings.max_media_per_request}, MAX_MEDIA_PER_REQUEST)",
                                   param=param, code="too_many_media")
                content.append({"type": modality, "url": url, "param": param})
            else:
                raise APIError(400, f"unsupported content part type {part_type!r}", param=f"{param}.type")
        role = "system" if m.role == "developer" else m.role
        if handle.processor is not None:
            message = {"role": role, "content": content}
        else:
            message = {"role": role, "content": "".join(p["text"] for p in content)}
        if m.tool_calls:
            message["tool_calls"] = template_tool_calls(m.tool_calls, f"messages[{i}].tool_calls")
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}]: a tool message needs tool_call_id",
                               param=f"messages[{i}].tool_call_id")
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def response_input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """`input` as a list of items: messages `{"type": "message", "role", "content": [parts]}`,
    `function_call` {call_id, name, arguments} and `function_call_output` {call_id, output}.

    Raises APIError 400: unsupported_value for other tool items and file parts, plain for
    shapes it cannot read.
    """
    raw = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    items = []
    for i, item in enumerate(raw):
        item_type = item.get("type", "message")
        if item_type in UNSUPPORTED_ITEM_TYPES:
            raise unsupported(f"input[{i}].type", f"input items of type {item_type!r} are not "
                                                  f"supported by this server", True)
        if item_type == "reasoning":
            continue  # earlier reasoning is context the chat templates drop anyway
        if item_type == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise APIError(400, f"input[{i}]: a function_call item needs call_id, name and "
                                    f"arguments strings", param=f"input[{i}]")
            items.append({"type": "function_call", "call_id": item["call_id"],
                          "name": item["name"], "arguments": item["arguments"]})
            continue
        if item_type == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(p["text"] for p in output
                                 if isinstance(p, dict) and isinstance(p.get("text"), str))
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise APIError(400, f"input[{i}]: a function_call_output item needs call_id and "
                                    f"output", param=f"input[{i}]")
            items.append({"type": "function_call_output", "call_id": item["call_id"],
                          "output": output})
            continue
        if item_type != "message" or item.get("role") not in ("user", "assistant", "system",
                                                          "developer"):
            raise APIError(400, f"input[{i}] must be a message with role user, assistant, system "
                                f"or developer, a function_call or a function_call_output",
                           param=f"input[{i}]")
        content = item.get("content")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise APIError(400, f"input[{i}].content must be a string or a list of parts",
                           param=f"input[{i}].content")
        for j, part in enumerate(parts):
            if not isinstance(part, dict):
                raise APIError(400, f"input[{i}].content[{j}] must be a content part object",
                               param=f"input[{i}].content[{j}]")
            if part.get("type") in ("input_file", "input_audio"):
                raise unsupported(f"input[{i}].content[{j}].type",
                                  f"{part['type']} parts are not supported by this server", True)
        items.append({"type": "message", "role": item["role"], "content": parts})
    return items


def item_messages(items: list[dict[str, Any]]) -> list[ChatMessage]:
    """Input items to chat messages: input_text/output_text become text parts; function calls
    join the assistant turn before them as `tool_calls`; outputs become `tool` messages."""
    out: list[ChatMessage] = []
    for item in items:
        if item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1].role == "assistant":
                out[-1].tool_calls = (out[-1].tool_calls or []) + [call]
            else:
                out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            continue
        if item["type"] == "function_call_output":
            out.append(ChatMessage(role="tool", content=item["output"],
                                   tool_call_id=item["call_id"]))
            continue
        parts = []
        for part in item["content"]:
            if part.get("type") in ("input_text", "output_text", "text"):
                parts.append({"type": "text", "text": part.get("text", "")})
            elif part.get("type") == "refusal":
                parts.append({"type": "text", "text": part.get("refusal", "")})
            else:
                url = media_url(part)
                if isinstance(url, str) and url.startswith("data:") and ",sha256:" in url:
                    raise APIError(400, "an earlier response in this conversation carried inline "
                                        "media, which is not stored: send the conversation in "
                                        "full instead of previous_response_id",
                                   param="previous_response_id")
                parts.append(part)
        out.append(ChatMessage(role=item["role"], content=parts))
    return out


def message_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in template-shaped messages (media parts count nothing)."""
    return sum(len(m["content"]) if isinstance(m["content"], str)
               else sum(len(p.get("text", "")) for p in m["content"]) for m in messages)


def media_limits() -> MediaLimits:
    return MediaLimits(max_bytes=settings.max_media_bytes,
                       max_image_pixels=settings.max_image_pixels,
                       max_video_pixels=settings.max_video_pixels,
                       max_video_frames=settings.max_video_frames,
                       fetch_timeout_seconds=settings.media_fetch_timeout_seconds,
                       allow_private_urls=settings.allow_private_media_urls,
                       media_root=settings.media_root or None)


def load_media(handle: ModelHandle, messages: list[dict[str, Any]]) -> tuple[list, list[Video]]:
    """Fetch and decode every media part (in place, they become bare `{"type": ...}` parts for
    the template). Returns (images as PIL, videos). Raises APIError 400/413 from MediaError."""
    ip = getattr(handle.processor, "image_processor", None)
    factor = getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 2)
    limits, images, videos = media_limits(), [], []
    for m in messages:
        for part in m["content"]:
            if part["type"] not in ("image", "video"):
                continue
            url, param = part.pop("url"), part.pop("param")
            try:
                data = load_bytes(url, limits, param)
                if part["type"] == "image":
                    images.append(decode_image(data, limits, factor, param))
                else:
                    videos.append(decode_video(data, limits, factor, param))
            except MediaError as e:
                raise APIError(e.status, e.message, param=e.param, code="invalid_media") from e
    return images, videos


def redact_media(body: dict[str, Any]) -> dict[str, Any]:
    """The body as stored with the session: `data:` URLs replaced by their SHA-256, so media
    bytes never land in SQLite (the idempotency digest is taken from the full body)."""
    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str) and v[:5].lower() == "data:" and len(v) > 64:
            head = v.split(",", 1)[0]
            return f"{head},sha256:{hashlib.sha256(v.encode()).hexdigest()}"
        return v
    return walk(body)


# ---------------------------------------------------------------------------------------------
# Template and tokenizing
# ---------------------------------------------------------------------------------------------


# Names a request's chat_template_kwargs may never set: what the server passes itself, and every
# argument of apply_chat_template and of the tokenizer call. vLLM passes chat_template_kwargs
# straight through; here {"padding": "max_length", "max_length": 10**7} in a 150-byte request
# once cost 32 s and 1.1 GB. Only variables the template reads reach it (see template_kwargs).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
     "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
     "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
     "tokenizer_kwargs", "processor_kwargs", "load_audio_from_video", "text", "text_pair",
     "add_special_tokens", "stride", "is_split_into_words", "pad_to_multiple_of", "padding_side",
     "return_token_type_ids", "return_attention_mask", "return_overflowing_tokens",
     "return_special_tokens_mask", "return_offsets_mapping", "return_length", "verbose",
     "images", "videos", "audio", "do_sample_frames", "video_metadata", "num_frames", "fps"})


def template_kwargs(handle: ModelHandle, requested: dict[str, Any]) -> dict[str, Any]:
    """The request's chat_template_kwargs reduced to variables the model's template reads.

    Raises APIError 400 for names the server sets itself or that are tokenizer/processor
    arguments; drops (and logs) names the template never reads, as vLLM does.
    """
    reserved = sorted(set(requested) & RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}: only "
                            f"variables of the chat template (e.g. enable_thinking) are allowed",
                       param="chat_template_kwargs", code="invalid_chat_template_kwargs")
    unused = sorted(set(requested) - handle.template_variables)
    if unused:
        log.info("ignoring chat_template_kwargs the template does not read: %s", unused)
    return {k: v for k, v in requested.items() if k in handle.template_variables}


def check_prompt_chars(handle: ModelHandle, chars: int, param: str) -> None:
    """400 before any tokenizing when `chars` characters cannot fit the context: no token
    spells more than `handle.max_token_chars` characters, so this never refuses a prompt that
    fits. A 19 MB prompt used to cost 23 s and 4 GB of tokenizing before the length check."""
    if handle.context_length and chars > handle.context_length * handle.max_token_chars:
        raise APIError(400, f"this model's maximum context length is {handle.context_length} "
                            f"tokens; the prompt has {chars} characters, more than that many "
                            f"tokens can hold", param=param, code="context_length_exceeded")


def prepare_chat_inputs(handle: ModelHandle, messages: list[dict[str, Any]],
                        template_kwargs: dict[str, Any], add_generation_prompt: bool = True,
                        continue_final_message: bool = False) -> dict[str, torch.Tensor]:
    """Fetch media, apply the chat template, tokenize; runs in a worker thread and never
    touches the model. `continue_final_message`: the last (assistant) message is left open
    for the model to continue (vLLM's fields of these names).

    Returns the processor's/tokenizer's tensors: `input_ids` (1, prompt_tokens) and, with
    media, `pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`.
    Raises APIError 400/413 for bad media or a template that fails on these messages.
    """
    turn = {"add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message}
    try:
        if handle.processor is None:
            # Rendered, then tokenized with fixed arguments: what apply_chat_template(tokenize=
            # True) does, with no way for a request to reach the tokenizer's arguments.
            prompt = handle.tokenizer.apply_chat_template(
                messages, tokenize=False, **turn, **template_kwargs)
            encoded = handle.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        else:
            images, videos = load_media(handle, messages)
            prompt = handle.processor.apply_chat_template(
                messages, tokenize=False, **turn, **template_kwargs)
            extra: dict[str, Any] = {}
            if videos:
                # Frames are already sampled (PyAV); the metadata gives their real times,
                # which Qwen3-VL writes into the prompt.
                extra = {"videos": [v.frames for v in videos], "do_sample_frames": False,
                         "video_metadata": [VideoMetadata(
                             total_num_frames=v.total_frames, fps=v.fps, duration=v.duration,
                             frames_indices=v.frame_indices, height=v.frames.shape[1],
                             width=v.frames.shape[2]) for v in videos]}
            encoded = handle.processor(text=[prompt], images=images or None,
                                       return_tensors="pt", **extra)
    except APIError:
        raise
    except jinja2.TemplateError as e:
        # The template's own raise_exception text ("roles must alternate ...") is for the user.
        raise APIError(400, f"the chat template refused these messages: {e}",
                       param="messages") from e
    except Exception as e:  # noqa: BLE001 - template and processor errors are the caller's input
        log.warning("chat template/processor failed on a request: %s: %s", type(e).__name__, e)
        raise APIError(400, f"the chat template or processor could not take these messages "
                            f"({type(e).__name__})", param="messages") from e
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def prompts_ids(handle: ModelHandle, prompt: Any) -> list[tuple[torch.Tensor, str]]:
    """Every prompt of a legacy completions `prompt` (a string, token ids, or a list of
    either) as (input_ids (1, n), its text)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return [prompt_ids(handle, p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [prompt_ids(handle, prompt)]


def prompt_ids(handle: ModelHandle, prompt: Any, param: str = "prompt"
               ) -> tuple[torch.Tensor, str]:
    """One prompt (a string or token ids) to input_ids (1, n) and its text."""
    if isinstance(prompt, str):
        check_prompt_chars(handle, len(prompt), param)
        ids = handle.tokenizer(prompt, return_tensors="pt")["input_ids"]
        if ids.shape[-1] == 0:
            # OpenAI completes an empty prompt from the start of a document: begin with BOS
            # (or, for tokenizers without one, the end-of-text token that separates documents).
            start = handle.tokenizer.bos_token_id
            if start is None:
                start = min(handle.eos_token_ids) if handle.eos_token_ids else 0
            ids = torch.tensor([[start]])
        return ids, prompt
    vocab = len(handle.tokenizer)
    if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be integers in 0..{vocab - 1}", param=param)
    return torch.tensor([prompt]), handle.tokenizer.decode(prompt)


def starts_in_reasoning(handle: ModelHandle, inputs: dict[str, torch.Tensor]) -> bool | None:
    """None when no reasoning split applies; else whether the prompt opened a think block."""
    if settings.reasoning_parser == "none" or not handle.thinks:
        return None
    tail = handle.tokenizer.decode(inputs["input_ids"][0, -16:].tolist())
    return prompt_opens_thinking(tail)



# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sampling_params(req: Sampling, handle: ModelHandle, prompt_tokens: int) -> SamplingParams:
    """The request's SamplingParams with its completion budget fitted to the context (server
    default MAX_TOKENS when it names none); 400 when the context cannot hold the prompt plus
    what it asked for, or a logit_bias token id is outside the vocabulary."""
    requested = req.requested_max_tokens()
    room = None if handle.context_length is None else handle.context_length - prompt_tokens
    if room is not None and (room <= 0 or (requested is not None and requested > room)):
        raise APIError(400, f"this model's maximum context length is {handle.context_length} "
                            f"tokens; the messages take {prompt_tokens} and "
                            f"{requested or 'at least 1'} more were requested for the completion",
                       param="messages" if room <= 0 else "max_tokens",
                       code="context_length_exceeded")
    max_new = requested or settings.max_tokens
    if room is not None:
        max_new = min(max_new, room)
    bias: dict[int, float] = {}
    if isinstance(req, OpenAISampling) and req.logit_bias:
        vocab = handle.model.get_input_embeddings().weight.shape[0]
        for key, value in req.logit_bias.items():
            if not 0 <= int(key) < vocab:
                raise APIError(400, f"logit_bias token id {key} is outside the vocabulary "
                                    f"(0..{vocab - 1})", param="logit_bias")
            bias[int(key)] = value
    return req.to_sampling_params(max_new, settings.temperature, bias)


@dataclass
class Prepared:
    """A route's preparation of a new session: model inputs, sampling, what the session stores
    of the request, and the reasoning split (see `starts_in_reasoning`)."""

    inputs: dict[str, torch.Tensor]
    params: SamplingParams
    stored: dict[str, Any]
    starts_in_reasoning: bool | None = None
    more_inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)  # more prompts
    # Tool calls to parse: (the model's format, the function names offered, most calls per
    # turn: 1 for parallel_tool_calls=false); None: no tools.
    tools: tuple[ToolFormat, frozenset[str], int | None] | None = None
    # `stored` with its inline media, when redaction took some out: kept while the session
    # runs so that a crash does not lose what the prompt is made of (Session.inputs).
    unredacted: dict[str, Any] | None = None
    # In front of an upstream (UPSTREAM_URL): the request to send it, {"path", "body"}; then
    # `inputs` is empty and `params` holds only n and seed.
    upstream: dict[str, Any] | None = None


def with_media(p: Prepared, unredacted: dict[str, Any]) -> Prepared:
    """Keep `unredacted` as the session's inputs if redaction changed it and generations
    continue after a restart (else no media bytes are ever written)."""
    if settings.continue_after_restart and unredacted != p.stored:
        p.unredacted = unredacted
    return p


# ---------------------------------------------------------------------------------------------
# One preparation per API: body -> Prepared (inputs, sampling, what the session stores)
# ---------------------------------------------------------------------------------------------


async def prepare_chat(body: ChatCompletionRequest, handle: ModelHandle,
                       raw: dict[str, Any]) -> Prepared:
    """Chat completions: messages (and tools) through the chat template (media fetched and
    decoded in a worker thread, like all tokenizing); `response_format` or a forced tool call
    as a grammar. `raw` is the body as dumped, stored media-redacted."""
    if handle.upstream is not None:
        return with_media(upstream_prepared(body, body.n or 1, redact_media(raw), "/chat/completions",
                                            chat_body(raw, handle.upstream.model,
                                                      settings.max_tokens)), raw)
    spec = tool_spec(body.tools, body.tool_choice, body.parallel_tool_calls, flat=False)
    messages = chat_messages(body.messages, handle)
    check_prompt_chars(handle, message_chars(messages) + tool_chars(spec, messages), "messages")
    rules = await constraints(handle, spec, body.response_format, "response_format", flat=False)
    messages, tool_kwargs = with_tools(handle, messages, spec, rules.format)
    kwargs = {**template_kwargs(handle, body.chat_template_kwargs or {}), **tool_kwargs}
    inputs = await asyncio.to_thread(prepare_chat_inputs, handle, messages, kwargs,
                                     body.add_generation_prompt, body.continue_final_message)
    return with_media(prepared(handle, body, inputs, redact_media(raw), rules), raw)


def prepared(handle: ModelHandle, body: Any, inputs: dict[str, torch.Tensor],
             stored: dict[str, Any], rules: Constraints) -> Prepared:
    """A chat-templated request's Prepared: sampling fitted to the prompt, the grammar, the
    reasoning split and the tool-call parsing."""
    params = sampling_params(body, handle, int(inputs["input_ids"].shape[-1]))
    params.grammar = rules.grammar
    tools = (rules.format, rules.tools.names, rules.tools.limit) if rules.tools else None
    return Prepared(inputs, params, stored, starts_in_reasoning(handle, inputs), tools=tools)


async def prepare_completion(body: CompletionRequest, handle: ModelHandle,
                             raw: dict[str, Any]) -> Prepared:
    """Legacy completions: the raw prompts (text or token ids), no chat template; with `echo`
    the prompt texts are stored for the formatter (`_echo_texts`). The completion budget is
    fitted to the longest prompt."""
    if handle.upstream is not None:
        return upstream_completion(body, handle, raw)
    prompts = await asyncio.to_thread(prompts_ids, handle, body.prompt)
    inputs = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids, _ in prompts]
    params = sampling_params(body, handle, max(int(ids.shape[-1]) for ids, _ in prompts))
    stored = {**raw, "_echo_texts": [text for _, text in prompts]} if body.echo else raw
    return Prepared(inputs[0], params, stored, more_inputs=inputs[1:])


async def prepare_response(body: ResponsesRequest, handle: ModelHandle, raw: dict[str, Any],
                           history: list[dict[str, Any]]) -> Prepared:
    """Responses: `history` (a previous response's conversation, as input items) plus this
    input, `instructions` as a system message, `reasoning.effort: none` as enable_thinking=False,
    tools and `text.format` as for chat. Stores the input items (`_input_items`) and the whole
    conversation (`_conversation`)."""
    items = response_input_items(body)
    messages = item_messages(history + items)
    if body.instructions:
        messages.insert(0, ChatMessage(role="system", content=body.instructions))
    if handle.upstream is not None:
        unredacted = {**raw, "_input_items": items, "_conversation": history + items}
        request = response_chat_body(raw, messages, handle.upstream.model, settings.max_tokens)
        return with_media(upstream_prepared(body, 1, redact_media(unredacted),
                                            "/chat/completions", request), unredacted)
    kwargs = dict(body.chat_template_kwargs or {})
    if (body.reasoning or {}).get("effort") == "none":
        kwargs.setdefault("enable_thinking", False)
    spec = tool_spec(body.tools, body.tool_choice, body.parallel_tool_calls, flat=True,
                     max_calls=body.max_tool_calls)
    chat = chat_messages(messages, handle)
    check_prompt_chars(handle, message_chars(chat) + tool_chars(spec, chat), "input")
    rules = await constraints(handle, spec, (body.text or {}).get("format")
                              if isinstance(body.text, dict) else body.text, "text.format",
                              flat=True)
    chat, tool_kwargs = with_tools(handle, chat, spec, rules.format)
    inputs = await asyncio.to_thread(prepare_chat_inputs, handle, chat,
                                     {**template_kwargs(handle, kwargs), **tool_kwargs})
    unredacted = {**raw, "_input_items": items, "_conversation": history + items}
    return with_media(prepared(handle, body, inputs, redact_media(unredacted), rules),
                      unredacted)


# ---------------------------------------------------------------------------------------------
# In front of an upstream: the body passed on, nothing tokenized here
# ---------------------------------------------------------------------------------------------


def upstream_prepared(body: Any, choices: int, stored: dict[str, Any], path: str,
                      request: dict[str, Any]) -> Prepared:
    """The Prepared of a request an upstream generates (UPSTREAM_URL): `request` is the body
    sent to the upstream's `path`; `choices` the choices it makes (n x prompts). The upstream
    validates what only it can (context length, tools, schemas) and its 400 reaches the
    client (upstream.upstream_error)."""
    params = SamplingParams(max_new_tokens=0, temperature=0.0, n=choices, seed=body.seed)
    return Prepared({}, params, stored, upstream={"path": path, "body": request})


def upstream_completion(body: CompletionRequest, handle: ModelHandle,
                        raw: dict[str, Any]) -> Prepared:
    """Legacy completions in front of an upstream; `echo` is ours (from the prompt texts),
    so it needs text prompts."""
    stored = raw
    if body.echo:
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "echo needs text prompts in front of an upstream server (token "
                                "ids cannot be turned back into text here)", param="echo")
        stored = {**raw, "_echo_texts": prompts}
    return upstream_prepared(body, prompt_count(body.prompt) * (body.n or 1), stored,
                             "/completions",
                             completion_body(raw, handle.upstream.model, settings.max_tokens))


# ---------------------------------------------------------------------------------------------
# Again, after a crash: a stored request -> the same Prepared
# ---------------------------------------------------------------------------------------------


async def prepare_stored(handle: ModelHandle, kind: str, stored: dict[str, Any]) -> Prepared:
    """The Prepared a session's stored request makes again (to continue its generation after
    a restart): the same template, tokens and sampling, as nothing they depend on is random.
    `kind` is the session's (a formatter kind). Raises APIError when the inputs are gone:
    inline media is stored only as its SHA-256 (redact_media), so such a prompt cannot be
    rebuilt; pass the session's `inputs` (media included) when it has them."""
    raw = {k: v for k, v in stored.items() if not k.startswith("_")}
    if kind == "chat.completion":
        return await prepare_chat(ChatCompletionRequest.model_validate(raw), handle, raw)
    if kind == "text_completion":
        return await prepare_completion(CompletionRequest.model_validate(raw), handle, raw)
    if kind == "response":
        conversation, items = stored.get("_conversation", []), stored.get("_input_items", [])
        return await prepare_response(ResponsesRequest.model_validate(raw), handle, raw,
                                      conversation[:len(conversation) - len(items)])
    raise APIError(400, f"sessions of kind {kind!r} cannot be continued")
