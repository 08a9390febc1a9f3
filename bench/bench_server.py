"""Benchmark, run by hand (not a test): `python bench/bench_server.py [--runs 5] [--tokens 128]`.

Prints ratios measured in one run, each the median of several runs, because these machines are
noisy and absolute numbers differ between them:
  - server single-stream tokens/s over raw `model.generate` tokens/s (persistence on)
  - persistence on over persistence off (server tokens/s)
  - time to first token over the server minus raw prefill time (ms)
  - reconnect to first replayed event: in memory, and from SQLite after a restart, in ms and
    over a plain GET /health round trip on the same server
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import Server  # noqa: E402 - the tests' real-process launcher

PROMPT = [{"role": "user", "content": "Write a long story about a dragon."}]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --- the baseline: raw model.generate in this process -------------------------------------------

def raw_baseline(runs: int, tokens: int) -> tuple[float, float]:
    """Median (tokens/s of generate with `tokens` new tokens, seconds of a 1-token generate)."""
    import torch

    import model
    handle = model.ModelHandle(name=model.served_model_name())
    model.load_model(handle)
    if handle.state != "ready":
        raise SystemExit(f"model failed to load: {handle.error}")
    inputs = handle.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                                  return_dict=True, return_tensors="pt")
    inputs = {k: v.to(handle.model.device) for k, v in inputs.items()}
    common = dict(do_sample=False, pad_token_id=handle.tokenizer.pad_token_id)
    with torch.inference_mode():
        handle.model.generate(**inputs, max_new_tokens=4, **common)  # warm-up
        rates, prefills = [], []
        for _ in range(runs):
            t = time.perf_counter()
            handle.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **common)
            rates.append(tokens / (time.perf_counter() - t))
            t = time.perf_counter()
            handle.model.generate(**inputs, max_new_tokens=1, **common)
            prefills.append(time.perf_counter() - t)
    del handle
    return median(rates), median(prefills)


# --- the server ---------------------------------------------------------------------------------

def stream_once(http: httpx.Client, tokens: int, session_id: str) -> tuple[float, float, int]:
    """One streamed request: (seconds to first content, total seconds, completion tokens)."""
    body = {"messages": PROMPT, "temperature": 0, "max_tokens": tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "session_id": session_id}
    t0 = time.perf_counter()
    first, usage = None, None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    return first, time.perf_counter() - t0, usage["completion_tokens"]


def server_rates(srv: Server, runs: int, tokens: int, tag: str) -> tuple[float, float, list[str]]:
    """Median tokens/s and median time to first token; returns the session ids used."""
    ids, rates, ttfts = [], [], []
    with httpx.Client(base_url=srv.url, timeout=300) as http:
        stream_once(http, 4, f"{tag}-warm")
        for i in range(runs):
            sid = f"{tag}-{i}-{time.time_ns()}"
            ttft, total, n = stream_once(http, tokens, sid)
            rates.append(n / total)
            ttfts.append(ttft)
            ids.append(sid)
    return median(rates), median(ttfts), ids


def reconnect_latency(srv: Server, ids: list[str], runs: int) -> tuple[float, float]:
    """Median seconds from opening a resume GET to its first event, and of a GET /health."""
    resumes, healths = [], []
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for i in range(runs):
            sid = ids[i % len(ids)]
            t = time.perf_counter()
            with http.stream("GET", f"/v1/sessions/{sid}/stream",
                             headers={"Last-Event-ID": f"{sid}:10"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
            resumes.append(time.perf_counter() - t)
            t = time.perf_counter()
            http.get("/health")
            healths.append(time.perf_counter() - t)
    return median(resumes), median(healths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median taken)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    raw_rate, raw_prefill = raw_baseline(args.runs, args.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="resumable-bench-"))
    on = Server(tmp / "on", PERSIST_SESSIONS="1", LOG_LEVEL="warning")
    (tmp / "on").mkdir()
    on.start()
    on_rate, on_ttft, ids = server_rates(on, args.runs, args.tokens, "on")
    mem_resume, health = reconnect_latency(on, ids, args.runs)
    on.stop()
    on.start()  # the same database: replay now comes from SQLite
    disk_resume, health_after = reconnect_latency(on, ids, args.runs)
    on.stop()
    (tmp / "off").mkdir()
    off = Server(tmp / "off", PERSIST_SESSIONS="0", LOG_LEVEL="warning").start()
    off_rate, _, _ = server_rates(off, args.runs, args.tokens, "off")
    off.stop()

    rows = [
        ("server tok/s / raw generate tok/s (persistence on)", on_rate / raw_rate,
         f"{on_rate:.1f} / {raw_rate:.1f} tok/s"),
        ("persistence on / off (server tok/s)", on_rate / off_rate,
         f"{on_rate:.1f} / {off_rate:.1f} tok/s"),
        ("time to first token - raw prefill", None,
         f"{(on_ttft - raw_prefill) * 1000:.1f} ms ({on_ttft * 1000:.1f} - {raw_prefill * 1000:.1f})"),
        ("reconnect to first replayed event, memory / GET /health", mem_resume / health,
         f"{mem_resume * 1000:.2f} ms / {health * 1000:.2f} ms"),
        ("reconnect after restart (SQLite) / GET /health", disk_resume / health_after,
         f"{disk_resume * 1000:.2f} ms / {health_after * 1000:.2f} ms"),
    ]
    print_table(f"medians of {args.runs} runs, {args.tokens} new tokens", rows)


def print_table(title: str, rows: list[tuple[str, float | None, str]]) -> None:
    """Rows of (figure, ratio or None, detail), under `title` and the model's name."""
    print(f"\n{title}, model "
          f"{os.environ.get('MODEL_REPO_ID') or 'SmolLM2-135M-Instruct (embedded)'}")
    for name, ratio, detail in rows:
        print(f"  {name:<58} {'' if ratio is None else f'{ratio:6.3f}':>6}   {detail}")


if __name__ == "__main__":
    main()
