"""Prometheus metrics, served at /metrics.

Metrics live in a module of their own because collectors register in a process-wide registry:
`python main.py` runs main.py as `__main__` and uvicorn then imports it again as `main`, so
collectors defined in main.py were registered twice and the server crashed at once. A module
imported by both is imported once.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

GENERATIONS_STARTED = Counter("resumable_generations_started_total",
                              "Generations the engine started")
GENERATIONS_FINISHED = Counter("resumable_generations_finished_total",
                               "Sessions that ended, by finish reason", ["reason"])
COMPLETION_TOKENS = Counter("resumable_completion_tokens_total", "Tokens generated")
RESUMES = Counter("resumable_resumes_total", "Streams opened after a Last-Event-ID")
QUEUE_DEPTH = Gauge("resumable_queue_depth", "Generation jobs waiting for the engine")
# The engine's batch, as vLLM names them (num_requests_running/waiting, kv_cache_usage_perc).
RUNNING_SEQUENCES = Gauge("resumable_num_requests_running",
                          "Sequences in the running batch (a request with n=4 counts 4)")
WAITING_SEQUENCES = Gauge("resumable_num_requests_waiting",
                          "Sequences waiting for room in the batch")
KV_CACHE_USAGE = Gauge("resumable_kv_cache_usage_perc",
                       "Share of MAX_BATCH_TOKENS reserved by running sequences (0..1)")
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TIME_TO_FIRST_TOKEN = Histogram("resumable_time_to_first_token_seconds",
                                "From submission to the engine to a request's first token",
                                buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("resumable_inter_token_latency_seconds",
                                "Between two tokens of one sequence", buckets=_LATENCY_BUCKETS)


def configure_logging(level: str) -> None:
    """One format for every `resumable.<module>` logger; LOG_LEVEL sets the level."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
