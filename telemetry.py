"""Prometheus metrics, served at /metrics.

Metrics live in a module of their own because collectors register in a process-wide registry:
`python main.py` runs main.py as `__main__` and uvicorn then imports it again as `main`, so
collectors defined in main.py were registered twice and the server crashed at once. A module
imported by both is imported once.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge

GENERATIONS_STARTED = Counter("resumable_generations_started_total",
                              "Generations the engine started")
GENERATIONS_FINISHED = Counter("resumable_generations_finished_total",
                               "Sessions that ended, by finish reason", ["reason"])
COMPLETION_TOKENS = Counter("resumable_completion_tokens_total", "Tokens generated")
RESUMES = Counter("resumable_resumes_total", "Streams opened after a Last-Event-ID")
QUEUE_DEPTH = Gauge("resumable_queue_depth", "Generation jobs waiting for the engine")


def configure_logging(level: str) -> None:
    """One format for every `resumable.<module>` logger; LOG_LEVEL sets the level."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
