"""Benchmark, run by hand (not a test): this server in front of llama.cpp's `llama-server`.

`python bench/bench_upstream.py --llama-server PATH [--runs 5] [--tokens 96] [--clients 8]`
(PATH: a llama-server binary, also LLAMA_SERVER_PATH; see README, "In front of llama.cpp /
vLLM"). Starts, on this machine and with the same embedded GGUF file: llama-server itself,
this server in front of it (UPSTREAM_URL), and this server with its own engine. Streams the
same greedy request (`--tokens` new tokens, ignore_eos) to each, one client and then
`--clients` at once, and prints tokens/s (medians of `--runs`) with every figure as a ratio
over llama-server direct, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import Server, free_port  # noqa: E402 - the tests' real-process launcher
from model import EMBEDDED_GGUF, embedded_model_dir  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon."}]


def stream_once(url: str, tokens: int) -> tuple[int, float, float]:
    """One streamed chat completion: (completion tokens from usage, seconds to the first
    content, seconds in all)."""
    body = {"messages": PROMPT, "temperature": 0, "max_tokens": tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, count = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any((c.get("delta") or {}).get("content")
                                     for c in chunk.get("choices") or []):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return count, first or 0.0, time.perf_counter() - start


def rates(url: str, runs: int, tokens: int, clients: int) -> tuple[float, float, float]:
    """Medians over `runs`: single-stream tokens/s, time to first token (ms), and aggregate
    tokens/s of `clients` concurrent streams."""
    stream_once(url, 8)  # warm-up
    single, ttft, many = [], [], []
    for _ in range(runs):
        n, first, total = stream_once(url, tokens)
        single.append(n / total)
        ttft.append(first * 1000)
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            counts = [c for c, _, _ in pool.map(lambda _: stream_once(url, tokens),
                                                 range(clients))]
        many.append(sum(counts) / (time.perf_counter() - t))
    return statistics.median(single), statistics.median(ttft), statistics.median(many)


def start_llama(binary: str, clients: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([binary, "-m", os.path.join(embedded_model_dir(), EMBEDDED_GGUF),
                             "--host", "127.0.0.1", "--port", str(port), "-np", str(clients),
                             "-c", str(1024 * clients), "--jinja"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"llama-server did not start; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_PATH"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--skip-local", action="store_true",
                        help="leave out this server's own engine (slow on a CPU)")
    args = parser.parse_args()
    if not args.llama_server:
        raise SystemExit("give --llama-server PATH (or LLAMA_SERVER_PATH)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-upstream-"))
    llama, llama_url = start_llama(args.llama_server, args.clients, tmp / "llama.log")
    servers = []
    try:
        front = Server(tmp / "front", UPSTREAM_URL=llama_url + "/v1",
                       MAX_NUM_SEQS=str(args.clients))
        (tmp / "front").mkdir()
        servers.append(front.start())
        results = {"llama-server direct": rates(llama_url, args.runs, args.tokens, args.clients),
                   "this server in front of it": rates(front.url, args.runs, args.tokens,
                                                       args.clients)}
        if not args.skip_local:
            (tmp / "local").mkdir()
            local = Server(tmp / "local", MAX_NUM_SEQS=str(args.clients))
            servers.append(local.start())
            results["this server, own engine"] = rates(local.url, args.runs, args.tokens,
                                                       args.clients)
    finally:
        for srv in servers:
            srv.stop()
        llama.terminate()
    base = results["llama-server direct"]
    print(f"\n{args.tokens} greedy tokens, medians of {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"| | 1 client tok/s | ratio | TTFT ms | {args.clients} clients tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, (single, ttft, many) in results.items():
        print(f"| {name} | {single:.1f} | {single / base[0]:.2f}x | {ttft:.0f} | {many:.1f} | "
              f"{many / base[2]:.2f}x |")


if __name__ == "__main__":
    main()
