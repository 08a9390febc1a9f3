"""Compiled-decode benchmark, run by hand (not a test): `python bench/bench_compiled.py
[--runs 3] [--tokens 128] [--streams 8,32]`. Meant for a GPU; runs on a CPU too (slowly).

Prints ratios measured in one run, each the median of `--runs` rounds (greedy, ignore_eos):
  C1  server, compiled decode, 1 stream / transformers' `generate` with a static cache and
      torch.compile (its own fast path, same process kind, same card)        (goal >= 0.9)
  C2  server compiled, N streams aggregate / that generate single stream     (goal x8 >= 3,
                                                                              x32 >= 8)
  C3  server compiled / server eager (COMPILE_DECODE=false), 1 and N streams
and the warm-up (compile) seconds from the server log, and raw eager `generate` for scale.
Environment: MODEL_REPO_ID etc. as for the server (default: the embedded SmolLM2).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_batch import concurrent, stream  # noqa: E402
from bench_server import PROMPT, median, print_table, raw_baseline  # noqa: E402
from conftest import Server  # noqa: E402 - the tests' real-process launcher


def static_compile_baseline(runs: int, tokens: int) -> tuple[float, float]:
    """transformers' own fast path: (median tok/s of `generate(cache_implementation="static")`
    compiled, seconds of its first call, the compile)."""
    import torch
    from transformers import CompileConfig

    import model
    handle = model.ModelHandle(name=model.served_model_name())
    model.load_model(handle)
    m, tok = handle.model, handle.tokenizer
    inputs = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")
    inputs = {k: v.to(m.device) for k, v in inputs.items()}
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # a CPU too (transformers skips it there)
    if m.device.type != "cuda":
        compile_config.mode = None
    common = dict(do_sample=False, pad_token_id=tok.pad_token_id, max_new_tokens=tokens,
                  min_new_tokens=tokens, cache_implementation="static",
                  compile_config=compile_config)
    with torch.inference_mode():
        t = time.perf_counter()
        m.generate(**inputs, **common)
        first = time.perf_counter() - t
        rates = []
        for _ in range(runs):
            t = time.perf_counter()
            m.generate(**inputs, **common)
            rates.append(tokens / (time.perf_counter() - t))
    del handle
    return median(rates), first


def server_rates(tmp: Path, compiled: bool, runs: int, tokens: int, streams: list[int]
                 ) -> tuple[dict[int, float], float | None]:
    """({streams: median aggregate tok/s}, warm-up seconds from the log) of one server."""
    most = max(streams)
    srv = Server(tmp, LOG_LEVEL="info", PERSIST_SESSIONS="1", MAX_NUM_SEQS=str(most),
                 COMPILE_DECODE="true" if compiled else "false",
                 MAX_CACHE_LEN=os.environ.get("MAX_CACHE_LEN", "1024")).start(timeout=1800)
    try:
        stream(srv.url, PROMPT[0]["content"], 4)  # first request: nothing left to compile
        rates = {1: median([(lambda r: r[2] / r[1])(stream(srv.url, PROMPT[0]["content"],
                                                            tokens))
                            for _ in range(runs)])}
        for n in streams:
            if n > 1:
                rates[n] = median([concurrent(srv.url, n, tokens) for _ in range(runs)])
        warm = re.search(r"compiled decode ready: .* ([\d.]+) s", srv.logs())
    finally:
        srv.stop()
    return rates, float(warm.group(1)) if warm else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds per figure (median taken)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    ap.add_argument("--streams", default="8,32", help="concurrent streams, comma-separated")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    streams = [1] + [int(s) for s in args.streams.split(",") if int(s) > 1]

    eager_rate, _ = raw_baseline(args.runs, args.tokens)
    fast_rate, compile_s = static_compile_baseline(args.runs, args.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="resumable-bench-compiled-"))
    (tmp / "c").mkdir()
    (tmp / "e").mkdir()
    comp, warm = server_rates(tmp / "c", True, args.runs, args.tokens, streams)
    eager, _ = server_rates(tmp / "e", False, args.runs, args.tokens, streams)
    rows = [("generate static+compile / generate eager (tok/s)", fast_rate / eager_rate,
             f"{fast_rate:.1f} / {eager_rate:.1f}; its compile {compile_s:.0f} s"),
            ("C1 server compiled 1 stream / generate static+compile", comp[1] / fast_rate,
             f"{comp[1]:.1f} / {fast_rate:.1f}; server warm-up {warm or 0:.0f} s")]
    for n in streams[1:]:
        rows.append((f"C2 server compiled x{n} / generate static+compile", comp[n] / fast_rate,
                     f"{comp[n]:.1f} / {fast_rate:.1f}"))
    for n in streams:
        rows.append((f"C3 server compiled / eager, x{n}", comp[n] / eager[n],
                     f"{comp[n]:.1f} / {eager[n]:.1f}"))
    print_table(f"medians of {args.runs} rounds, {args.tokens} new tokens per stream", rows)


if __name__ == "__main__":
    main()
