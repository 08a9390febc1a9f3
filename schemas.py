"""OpenAI request bodies, as pydantic models.

Field names and ranges follow the OpenAI API reference (Chat Completions, "Create chat
completion"); the vLLM sampling extensions follow vLLM's OpenAI-compatible server. Unknown
fields are kept (`extra="allow"`) so the server can log and ignore them, as vLLM does
(docs/wire-contract.md, Request fields). Which known fields this server cannot honour is
decided in main.py, which answers 400 `unsupported_parameter`/`unsupported_value` naming them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sampling import SamplingParams

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"


class StreamOptions(BaseModel):
    """`stream_options`: only `include_usage` changes what is sent."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatMessage(BaseModel):
    """One message. `content` is a string or a list of content parts (`{"type": "text", ...}`).

    Parts other than text are checked in main.py against what the served model accepts.
    """

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class VLLMSampling(BaseModel):
    """vLLM's sampling extensions, honoured on every generation route (docs/wire-contract.md)."""

    model_config = ConfigDict(extra="allow")

    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None


class Sampling(VLLMSampling):
    """Sampling fields every generation route has (OpenAI API reference), plus vLLM's."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # OpenAI's seed is an int64; torch.manual_seed takes no more.
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)

    def requested_max_tokens(self) -> int | None:
        """The completion budget the request names, in tokens (None: the server default)."""
        raise NotImplementedError

    def to_sampling_params(self, max_new_tokens: int, default_temperature: float,
                           logit_bias: dict[int, float] | None = None) -> SamplingParams:
        """The engine's SamplingParams: `max_new_tokens` already fitted to the context,
        `default_temperature` for a request without one (TEMPERATURE), `logit_bias` checked
        against the vocabulary (token id -> bias)."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            min_tokens=min(self.min_tokens or 0, max_new_tokens),
            ignore_eos=bool(self.ignore_eos), seed=self.seed)


class OpenAISampling(Sampling):
    """Sampling fields chat and legacy completions share (OpenAI API reference), with checks."""

    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            # (at most 18 digits: a token id; a longer one would also hit int()'s digit limit)
            if not re.fullmatch(r"-?[0-9]{1,18}", key):
                shown = key if len(key) <= 40 else key[:40] + "..."
                raise ValueError(f"logit_bias keys must be token ids, got {shown!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v

    def to_sampling_params(self, max_new_tokens: int, default_temperature: float,
                           logit_bias: dict[int, float] | None = None) -> SamplingParams:
        """As Sampling's, with OpenAI's penalties, logit_bias and stop sequences."""
        return dataclasses.replace(
            super().to_sampling_params(max_new_tokens, default_temperature),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=dict(logit_bias or {}), stop=self.stop)


class ChatCompletionRequest(OpenAISampling):
    """Body of `POST /v1/chat/completions`, plus `session_id` (the resumable-session key)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN)
    stream: bool = False
    stream_options: StreamOptions | None = None

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=128)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    # Informational: accepted and stored, they change nothing in generation.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    # Known OpenAI features; main.py refuses (400 unsupported_*) those it cannot honour when set.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None

    # vLLM: keyword arguments for the chat template (e.g. {"enable_thinking": false}).
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM: continue_final_message=true (with add_generation_prompt=false) renders the last
    # message, an assistant's, open-ended, so the model continues it ("prefill").
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, max_new_tokens: int, default_temperature: float,
                           logit_bias: dict[int, float] | None = None) -> SamplingParams:
        """As OpenAISampling's, with `n` and logprobs (`top_logprobs` alternatives)."""
        return dataclasses.replace(
            super().to_sampling_params(max_new_tokens, default_temperature, logit_bias),
            n=self.n or 1, logprobs=(self.top_logprobs or 0) if self.logprobs else None)


def prompt_count(prompt: Any) -> int:
    """How many prompts a legacy completions `prompt` holds (a string or token ids: one)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


class CompletionRequest(OpenAISampling):
    """Body of `POST /v1/completions` (OpenAI API reference, legacy Completions), plus
    `session_id` and the vLLM sampling extensions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's default for legacy completions is 16 tokens.
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    n: int | None = Field(None, ge=1, le=128)
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, max_new_tokens: int, default_temperature: float,
                           logit_bias: dict[int, float] | None = None) -> SamplingParams:
        """As OpenAISampling's, with `n` and `logprobs` (the legacy int: alternatives)."""
        return dataclasses.replace(
            super().to_sampling_params(max_new_tokens, default_temperature, logit_bias),
            n=self.n or 1, logprobs=self.logprobs)


class ResponsesRequest(Sampling):
    """Body of `POST /v1/responses` (OpenAI API reference, Responses), plus `session_id`.

    `input` is a string or a list of input items (messages with `input_text`/`input_image`
    parts, or earlier `output_text`); main.py checks the items and refuses features it cannot
    honour (400 unsupported_*).
    """

    input: str | list[dict[str, Any]]
    model: str | None = None
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    store: bool = True
    background: bool = False
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    truncation: str | None = None
    user: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None

    # Known features this server refuses (400 unsupported_*) when set.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tool_calls: int | None = Field(None, ge=1)

    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    def to_sampling_params(self, max_new_tokens: int, default_temperature: float,
                           logit_bias: dict[int, float] | None = None) -> SamplingParams:
        """As Sampling's, with logprobs when `include` asks for output_text logprobs."""
        wants = "message.output_text.logprobs" in (self.include or [])
        return dataclasses.replace(
            super().to_sampling_params(max_new_tokens, default_temperature),
            logprobs=(self.top_logprobs or 0) if wants else None)


class ErrorDetail(BaseModel):
    """The `error` object of every error body (OpenAI API reference, Error codes)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`: what every 4xx/5xx of this server answers (never FastAPI's 422)."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# Errors: every error body is {"error": {"message", "type", "param", "code"}}
# ---------------------------------------------------------------------------------------------

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


def unsupported(param: str, message: str, value: bool = False) -> APIError:
    """A field (or, with `value`, a value of a known field) this server cannot honour: 400
    with OpenAI's codes `unsupported_parameter` / `unsupported_value`. Never 501: SDKs retry
    every 5xx, so a refusal was sent three times and surfaced as an internal error."""
    return APIError(400, message, param=param,
                    code="unsupported_value" if value else "unsupported_parameter")


def error_body(status: int, message: str, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _ERROR_TYPES.get(status, "error"),
                      "param": param, "code": code}}


# URLs and host:port pairs: where the server's Redis or upstream lives is the operator's business,
# not a client's (the log has them).
ADDRESS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s,;()'\"]+|\[[0-9a-fA-F:]+\](?::\d{1,5})?"
                     r"|\b[\w-]+(?:\.[\w-]+)*:\d{2,5}\b", re.IGNORECASE)


def without_addresses(message: str) -> str:
    """`message` with every URL and host:port replaced by a placeholder."""
    return ADDRESS.sub("(address in the server log)", message)


def error_response(e: APIError) -> JSONResponse:
    """The OpenAI error body for `e`; a 5xx message is told without internal addresses."""
    message = without_addresses(e.message) if e.status >= 500 else e.message
    return JSONResponse(error_body(e.status, message, e.type, e.param, e.code),
                        status_code=e.status, headers=e.headers)
