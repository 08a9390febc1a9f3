"""The engine: one thread owns the model and runs generation jobs from a bounded queue.

The seam above it is `has_room()`, `submit(job)` and each job's `cancel` flag; output leaves
only through the job's sink. It knows no session, formatter, store or HTTP: a batching engine
can replace the one-job loop behind the same calls.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from decoding import IncrementalDecoder, ReasoningParser, StopMatcher
from model import ModelHandle
from sampling import OpenAIPenalties, SamplingParams
from telemetry import COMPLETION_TOKENS, GENERATIONS_STARTED

log = logging.getLogger("resumable.engine")


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


class JobSink(Protocol):
    """Where a job's output goes. Called on the engine thread; implementations hand the work
    to their own loop (runtime.SessionSink). Token counts are counts of generated tokens."""

    def started(self, prompt_tokens: int) -> None: ...

    def delta(self, text: str, completion_tokens: int, channel: str = "content") -> None: ...

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int,
                 reasoning_tokens: int = 0) -> None: ...

    def failed(self, message: str) -> None: ...


@dataclass
class GenerationJob:
    """A unit of work for the engine: an id (for logs), the cancel flag the engine polls
    between tokens and layers, prepared model inputs (`input_ids` (1, prompt_tokens), plus
    vision tensors), sampling, and where output goes."""

    id: str
    cancel: threading.Event
    inputs: dict[str, torch.Tensor]
    params: SamplingParams
    sink: JobSink
    # None: no reasoning split; else whether the prompt already opened the think block.
    starts_in_reasoning: bool | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


class GenerationCancelled(Exception):
    """Raised inside the model's forward pass by the engine's cancel hook."""


# ---------------------------------------------------------------------------------------------
# Hooks into generate
# ---------------------------------------------------------------------------------------------


class CancelCriteria(StoppingCriteria):
    """The cancel hook: stops `generate` at the next token once the job's cancel flag is
    set or a stop sequence matched. Shapes: input_ids (batch, seq) -> BoolTensor (batch,)."""

    def __init__(self, cancel: threading.Event, matcher: StopMatcher):
        self.cancel, self.matcher = cancel, matcher

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = self.cancel.is_set() or self.matcher.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class SessionStreamer(BaseStreamer):
    """Receives tokens from `generate` on the engine thread and forwards text to the sink.

    `generate` first puts the whole prompt, then each new token (shape (1,) or (1, 1)).
    """

    def __init__(self, job: GenerationJob, tokenizer, matcher: StopMatcher):
        self.job, self.matcher = job, matcher
        self.decoder = IncrementalDecoder(tokenizer)
        self.parser = (None if job.starts_in_reasoning is None
                       else ReasoningParser(job.starts_in_reasoning))
        self.prompt_seen = False
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.last_token: int | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.completion_tokens += 1
            self.last_token = token_id
            before = self.parser.state if self.parser is not None else None
            self._emit(self.matcher.feed(self.decoder.push(token_id)))
            # Reasoning if it opened, continued or closed the think block.
            if self.parser is not None and "reasoning" in (before, self.parser.state):
                self.reasoning_tokens += 1

    def end(self) -> None:
        self._emit(self.matcher.feed(self.decoder.flush()) + self.matcher.flush(), final=True)

    def _emit(self, text: str, final: bool = False) -> None:
        if self.parser is None:
            parts = [("content", text)] if text else []
        else:
            parts = self.parser.feed(text) + (self.parser.flush() if final else [])
        for channel, piece in parts:
            self.job.sink.delta(piece, self.completion_tokens, channel)


# ---------------------------------------------------------------------------------------------
# The engine thread
# ---------------------------------------------------------------------------------------------


class Engine:
    """Owns the model on one thread and runs generation jobs from a bounded queue.

    The seam the HTTP layer sees is `has_room()` and `submit(job)`; output goes only through
    each job's sink. A batching engine that runs several jobs per forward pass can replace
    this one-at-a-time loop behind the same two calls.
    """

    def __init__(self, handle: ModelHandle, max_queued: int):
        self.handle = handle
        self.max_queued = max_queued
        self.jobs: queue.Queue[GenerationJob | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.current: GenerationJob | None = None

    def start(self) -> None:
        self._install_cancel_hooks()
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the engine finish at a step boundary and wait for its thread (callers cancel the
        running job first). A thread left inside torch at interpreter exit aborts the process
        ("terminate called without an active exception")."""
        self.jobs.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _install_cancel_hooks(self) -> None:
        """Check the running job's cancel flag before every decoder layer (and vision block).

        The StoppingCriteria sees the flag only after a whole forward pass; a long prompt's
        prefill is one pass of many seconds on a CPU, during which a cancel used to leave the
        engine busy (the next request waited 27-38 s behind a 2,700-token prefill). A layer
        hook ends it within one layer. Costs one attribute check per layer per step.
        """
        model = self.handle.model
        layers = [m for m in model.modules()
                  if type(m).__name__.endswith(("DecoderLayer", "Block"))] or [model]
        for layer in layers:
            layer.register_forward_pre_hook(self._cancel_hook)

    def _cancel_hook(self, module, args) -> None:
        job = self.current
        if job is not None and job.cancel.is_set():
            raise GenerationCancelled()

    def has_room(self) -> bool:
        return self.jobs.qsize() < self.max_queued

    def submit(self, job: GenerationJob) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set():
                continue  # cancelled while queued: the loop side already ended it
            self.current = job
            try:
                self._generate(job)
            except Exception:  # noqa: BLE001 - one failed job must not stop the engine
                log.exception("generation failed in job %s", job.id)
                # The exception text stays in the log: it can name files and internals.
                job.sink.failed(f"generation failed in session {job.id}; the server "
                                f"log has the details")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            finally:
                self.current = None

    def _generate(self, job: GenerationJob) -> None:
        model, p = self.handle.model, job.params
        GENERATIONS_STARTED.inc()
        job.sink.started(job.prompt_tokens)
        matcher = StopMatcher(p.stop)
        streamer = SessionStreamer(job, self.handle.tokenizer, matcher)
        processors = LogitsProcessorList()
        if p.presence_penalty or p.frequency_penalty or p.logit_bias:
            processors.append(OpenAIPenalties(job.prompt_tokens, p.presence_penalty,
                                              p.frequency_penalty, p.logit_bias))
        kwargs: dict[str, Any] = {
            "max_new_tokens": p.max_new_tokens, "streamer": streamer,
            "logits_processor": processors,
            "stopping_criteria": StoppingCriteriaList([CancelCriteria(job.cancel,
                                                                      matcher)]),
            "pad_token_id": self.handle.pad_token_id,
        }
        if p.temperature == 0:
            # Greedy; the model's own sampling defaults must not leak in.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
        else:
            kwargs.update(do_sample=True, temperature=p.temperature)
            kwargs["top_p"] = p.top_p if p.top_p is not None else 1.0
            kwargs["top_k"] = p.top_k if p.top_k and p.top_k > 0 else None
            if p.min_p:
                kwargs["min_p"] = p.min_p
        if p.repetition_penalty is not None:
            kwargs["repetition_penalty"] = p.repetition_penalty
        if p.ignore_eos:
            kwargs["min_new_tokens"] = p.max_new_tokens
        elif p.min_tokens:
            kwargs["min_new_tokens"] = p.min_tokens
        if p.seed is not None:
            torch.manual_seed(p.seed)
        inputs = {k: v.to(model.device) for k, v in job.inputs.items()}
        try:
            with torch.inference_mode():
                model.generate(**inputs, **kwargs)
        except GenerationCancelled:
            pass  # the cancel hook ended a forward pass: the flag below says cancelled
        COMPLETION_TOKENS.inc(streamer.completion_tokens)
        if job.cancel.is_set():
            reason = "cancelled"
        elif matcher.stopped or streamer.last_token in self.handle.eos_token_ids:
            reason = "stop"
        elif streamer.completion_tokens >= p.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        job.sink.finished(reason, job.prompt_tokens, streamer.completion_tokens,
                          streamer.reasoning_tokens)
