"""Server start cost of the embedded model: loading SmolLM2-135M from its GGUF (parse +
dequantize, what every start did before) against loading the float32 copy that the first
start caches (model.py, `load_embedded_weights`). Medians of several rounds, in one process,
same machine; prints seconds and the ratio. Run by hand: `python bench/bench_start.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bench-start-")
    import model  # after XDG_CACHE_HOME: a cold cache of its own
    from transformers import AutoModelForCausalLM

    directory = model.embedded_model_dir()
    config, _ = model.gguf_metadata(directory, model.EMBEDDED_GGUF)
    cached = model.gguf_cache_dir(directory, model.EMBEDDED_GGUF)
    weights = os.path.join(cached, model.GGUF_WEIGHTS)
    gguf, copy = [], []
    for _ in range(args.rounds):
        if os.path.exists(weights):
            os.remove(weights)
        t = time.perf_counter()
        model.load_embedded_weights(AutoModelForCausalLM, config, cached)  # converts, caches
        gguf.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.load_embedded_weights(AutoModelForCausalLM, config, cached)
        copy.append(time.perf_counter() - t)
    g, c = statistics.median(gguf), statistics.median(copy)
    print(f"load from the GGUF (incl. writing the copy): {g:.2f} s  (rounds {gguf})")
    print(f"load from the cached copy:                   {c:.2f} s  (rounds {copy})")
    print(f"ratio GGUF / copy: {g / c:.1f}x   (copy {os.path.getsize(weights) / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
