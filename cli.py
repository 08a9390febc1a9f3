"""`python main.py [MODEL] [--model X] [--host H] [--port P] [...]`: the flags of `vllm serve`
that mean the same here, then uvicorn. Kept apart from main.py so that `python main.py --help`
answers without importing torch and the model stack (about 11 s); uvicorn then imports `main`.
"""

from __future__ import annotations

import argparse
import json
import os

from pydantic import ValidationError

from settings import reload_settings, settings

DESCRIPTION = ("resumable: an OpenAI-compatible inference server whose streams survive dropped "
               "connections.")


# vLLM's `vllm serve` flags that mean the same here, and the setting each one sets.
CLI_FLAGS = {
    "--model": ("MODEL_REPO_ID", "Hugging Face id or local directory; default: the embedded "
                                 "SmolLM2-135M-Instruct"),
    "--served-model-name": ("SERVED_MODEL_NAME", "the model name clients see"),
    "--api-key": ("API_KEYS", "API key(s), comma-separated; clients send Bearer <key>"),
    "--dtype": ("TORCH_DTYPE", "auto, bfloat16, float16 or float32"),
    "--max-num-seqs": ("MAX_NUM_SEQS", "sequences decoded together"),
    "--allowed-origins": ("CORS_ALLOW_ORIGINS", "CORS origins, comma-separated ('*': any)"),
    "--log-format": ("LOG_FORMAT", "text or json"),
}


def cli(argv: list[str] | None = None) -> None:
    """`python main.py [MODEL] [--model X] [--host H] [--port P] [...]`: the flags a vLLM user
    reaches for (`vllm serve MODEL --host --port --api-key ...`), each setting the environment
    variable of the same setting (CLI_FLAGS), then uvicorn. A flag wins over the environment.

    uvicorn imports `main:app` afresh (main.py ran as `__main__`): the flags reach it through
    the environment and the settings instance read again; metrics live in telemetry.py so the
    second import does not register them twice.
    """
    import uvicorn

    parser = argparse.ArgumentParser(prog="python main.py", description=DESCRIPTION)
    parser.add_argument("model_positional", nargs="?", metavar="MODEL",
                        help="same as --model (as in `vllm serve MODEL`)")
    for flag, (env, help) in CLI_FLAGS.items():
        parser.add_argument(flag, help=f"{help} ({env})")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own code (TRUST_REMOTE_CODE)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (PORT, default 8000)")
    parser.add_argument("--root-path", default="", help="path prefix behind a proxy (uvicorn)")
    args = parser.parse_args(argv)
    if args.model_positional and args.model and args.model_positional != args.model:
        parser.error("give the model once: positionally or with --model")
    args.model = args.model or args.model_positional
    for flag, (env, _) in CLI_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value.startswith("["):  # vLLM takes '["*"]'; we take *,...
            try:
                value = ",".join(json.loads(value))
            except (ValueError, TypeError):
                parser.error(f"{flag}: not a JSON list of strings: {value}")
        if value is not None:
            os.environ[env] = value
    if args.trust_remote_code:
        os.environ["TRUST_REMOTE_CODE"] = "true"
    # uvicorn's import of `main` finds settings.py already imported (by this __main__), so
    # the flags reach it only through the one settings instance, read again here.
    try:
        reload_settings()
    except ValidationError as e:
        parser.error("; ".join(f"{'.'.join(map(str, err['loc'])).upper()}: {err['msg']}"
                               for err in e.errors()))
    uvicorn.run("main:app", host=args.host, port=args.port, root_path=args.root_path,
                log_level=settings.log_level.lower())
