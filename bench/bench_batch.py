"""Batching benchmark, run by hand (not a test): `python bench/bench_batch.py [--runs 3]
[--tokens 96] [--streams 8]`.

Prints ratios measured in one run, each the median of `--runs` rounds (greedy, ignore_eos, the
same prompt and model for everything):
  P1  server single stream tok/s over raw `model.generate` tok/s            (target >= 0.95)
  P2  server, 8 concurrent streams, aggregate tok/s over transformers'
      continuous batching (`model.generate_batch`) on the same 8 prompts   (target >= 1.0)
  P3  server 8 streams over server 1 stream (aggregate tok/s)               (target >= 3)
      time to first token of a request sent while 8 streams run (p50)
      persistence on over off, 8 streams (aggregate tok/s)
Environment: MODEL_REPO_ID etc. as for the server (default: the embedded SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_server import PROMPT, median, print_table, raw_baseline  # noqa: E402
from conftest import Server  # noqa: E402 - the tests' real-process launcher

# Eight different prompts, so the rows have different lengths (as real traffic does).
PROMPTS = [f"Write a long story about a {animal}." for animal in
           ("dragon", "cat", "whale", "small brave mouse", "fox", "very old owl", "horse",
            "crow that could talk")]


def cb_baseline(runs: int, tokens: int, streams: int) -> float:
    """Median aggregate tok/s of transformers' continuous batching over `streams` prompts."""
    import torch
    from transformers import GenerationConfig

    import model
    handle = model.ModelHandle(name=model.served_model_name())
    model.load_model(handle)
    tok = handle.tokenizer
    inputs = [tok.apply_chat_template([{"role": "user", "content": p}],
                                      add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
              for p in (PROMPTS * streams)[:streams]]
    cfg = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1,
                           pad_token_id=tok.pad_token_id)
    m = handle.model
    if "paged" not in str(m.config._attn_implementation):
        m.set_attn_implementation("paged|sdpa")  # what generate_batch needs (CPU included)
    rates = []
    with torch.inference_mode():
        m.generate_batch(inputs[:2], generation_config=cfg, max_new_tokens=4)  # warm-up
        for _ in range(runs):
            t = time.perf_counter()
            out = m.generate_batch(inputs, generation_config=cfg)
            n = sum(len(o.generated_tokens) for o in out.values())
            rates.append(n / (time.perf_counter() - t))
    return median(rates)


def stream(url: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to first content, seconds total, completion tokens) of one streamed chat."""
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, n = time.perf_counter(), None, 0
    with httpx.Client(timeout=600) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get(
                        "content"):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - t0, n


def concurrent(url: str, streams: int, tokens: int) -> float:
    """Aggregate tok/s of `streams` streams started together."""
    t = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda p: stream(url, p, tokens), (PROMPTS * streams)[:streams]))
    return sum(n for _, _, n in results) / (time.perf_counter() - t)


def ttft_under_load(url: str, streams: int, tokens: int) -> float:
    """Time to first token of one request sent once `streams` long streams are running."""
    with ThreadPoolExecutor(streams + 1) as pool:
        load = [pool.submit(stream, url, p, tokens * 3) for p in (PROMPTS * streams)[:streams]]
        time.sleep(2.0)  # let them be admitted and decoding
        first, _, _ = pool.submit(stream, url, "Say hi.", 8).result()
        for f in load:
            f.result()
    return first


def server_figures(srv: Server, runs: int, tokens: int, streams: int) -> dict[str, float]:
    stream(srv.url, PROMPT[0]["content"], 4)  # warm-up
    one = median([(lambda r: r[2] / r[1])(stream(srv.url, PROMPT[0]["content"], tokens))
                  for _ in range(runs)])
    many = median([concurrent(srv.url, streams, tokens) for _ in range(runs)])
    ttft = median([ttft_under_load(srv.url, streams, tokens) for _ in range(runs)])
    return {"one": one, "many": many, "ttft": ttft}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds per figure (median taken)")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per stream")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    raw_rate, _ = raw_baseline(args.runs, args.tokens)
    cb_rate = cb_baseline(args.runs, args.tokens, args.streams)
    tmp = Path(tempfile.mkdtemp(prefix="resumable-bench-batch-"))
    figures = {}
    for persist in ("1", "0"):
        (tmp / persist).mkdir()
        srv = Server(tmp / persist, PERSIST_SESSIONS=persist, LOG_LEVEL="warning").start()
        try:
            figures[persist] = server_figures(srv, args.runs, args.tokens, args.streams)
        finally:
            srv.stop()
    on, off = figures["1"], figures["0"]
    rows = [
        ("P1 server 1 stream / raw generate (tok/s)", on["one"] / raw_rate,
         f"{on['one']:.1f} / {raw_rate:.1f}"),
        (f"P2 server {args.streams} streams / transformers generate_batch", on["many"] / cb_rate,
         f"{on['many']:.1f} / {cb_rate:.1f}"),
        (f"P3 server {args.streams} streams / server 1 stream", on["many"] / on["one"],
         f"{on['many']:.1f} / {on['one']:.1f}"),
        (f"TTFT p50 with {args.streams} streams running (ms)", None,
         f"{on['ttft'] * 1000:.0f} ms"),
        (f"persistence on / off, {args.streams} streams", on["many"] / off["many"],
         f"{on['many']:.1f} / {off['many']:.1f}"),
    ]
    print_table(f"medians of {args.runs} rounds, {args.tokens} new tokens per stream", rows)


if __name__ == "__main__":
    main()
