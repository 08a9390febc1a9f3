"""Structured-output benchmark, run by hand (not a test): `python bench/bench_structured.py
[--runs 3] [--streams 8]`.

Prints ratios measured in one run against baselines from the same server, each the median of
`--runs` rounds (greedy; a schema that forces a 60-integer array, so constrained and free
requests generate comparable lengths):
  G1  one constrained stream's tok/s over one free stream's tok/s
  G2  8 streams, half constrained: aggregate tok/s over 8 free streams
  G3  a free stream's tok/s next to 7 constrained ones over next to 7 free ones
      (what a grammar row costs its neighbours)
  grammar compile time of the schema (ms, in-process, tokenizer table cached)
Environment: MODEL_REPO_ID etc. as for the server (default: the embedded SmolLM2).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_server import median, print_table  # noqa: E402
from conftest import Server  # noqa: E402 - the tests' real-process launcher

TOKENS = 140  # the schema below needs ~120-130 tokens; free rows get the same budget
NUMBERS = {"type": "object", "properties": {"numbers": {
    "type": "array", "minItems": 60, "maxItems": 60,
    "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
    "required": ["numbers"], "additionalProperties": False}


def request(url: str, constrained: bool) -> tuple[int, float]:
    """(completion tokens, seconds) of one non-streamed chat."""
    body = {"messages": [{"role": "user", "content": "List sixty numbers as JSON."}],
            "temperature": 0, "max_tokens": TOKENS}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "numbers", "schema": NUMBERS}}
    else:
        body["ignore_eos"] = True
    t = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()
    return r["usage"]["completion_tokens"], time.perf_counter() - t


def rate(results: list[tuple[int, float]], wall: float) -> float:
    return sum(n for n, _ in results) / wall


def mixed(url: str, kinds: list[bool]) -> tuple[float, float]:
    """(aggregate tok/s, tok/s of the first request) with requests of `kinds` sent together."""
    t = time.perf_counter()
    with ThreadPoolExecutor(len(kinds)) as pool:
        results = list(pool.map(lambda c: request(url, c), kinds))
    first_n, first_s = results[0]
    return rate(results, time.perf_counter() - t), first_n / first_s


def compile_ms(runs: int) -> float:
    import constraints
    import model
    handle = model.ModelHandle(name=model.served_model_name())
    model.load_model(handle)
    lark = constraints.format_grammar({"type": "json_schema", "json_schema": {
        "name": "n", "schema": NUMBERS}}, "response_format", flat=False)
    constraints.compile_grammar(handle, lark, "x")  # the tokenizer table, once per model
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        constraints.compile_grammar(handle, lark, "x")
        times.append(time.perf_counter() - t)
    return median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds per figure (median taken)")
    ap.add_argument("--streams", type=int, default=8, help="concurrent requests in G2/G3")
    args = ap.parse_args()
    k = args.streams
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp)).start()
        try:
            request(srv.url, True), request(srv.url, False)  # warm-up
            one_c = median([(lambda r: r[0] / r[1])(request(srv.url, True))
                            for _ in range(args.runs)])
            one_f = median([(lambda r: r[0] / r[1])(request(srv.url, False))
                            for _ in range(args.runs)])
            half = [i % 2 == 0 for i in range(k)]
            all_free = [False] * k
            agg_half = median([mixed(srv.url, half)[0] for _ in range(args.runs)])
            agg_free = median([mixed(srv.url, all_free)[0] for _ in range(args.runs)])
            next_to_c = median([mixed(srv.url, [False] + [True] * (k - 1))[1]
                                for _ in range(args.runs)])
            next_to_f = median([mixed(srv.url, all_free)[1] for _ in range(args.runs)])
        finally:
            srv.stop()
    ms = compile_ms(args.runs)
    print_table(f"medians of {args.runs} runs, {TOKENS}-token budget", [
        ("G1 one constrained / one free stream (tok/s)", one_c / one_f,
         f"{one_c:.1f} / {one_f:.1f}"),
        (f"G2 {k} streams half constrained / {k} free (aggregate tok/s)", agg_half / agg_free,
         f"{agg_half:.1f} / {agg_free:.1f}"),
        (f"G3 a free stream next to {k - 1} constrained / next to {k - 1} free", next_to_c /
         next_to_f, f"{next_to_c:.1f} / {next_to_f:.1f}"),
        ("grammar compile (60-integer array schema)", None, f"{ms:.1f} ms"),
    ])


if __name__ == "__main__":
    main()
