"""The engine: one thread owns the model and decodes every running sequence together.

Continuous batching over the model's own forward pass and a padded `DynamicCache`
(kv_cache.py): each step (1) admits waiting jobs while the cache budget allows (prefill,
batch 1, cancellable per layer), (2) runs one decode forward for all running rows, (3)
samples each row with its own `RowSampler`, (4) retires finished, stopped and cancelled rows
at once (their cache rows are dropped). A job joins at the next step, not when the batch ends. The same loop serves text and
vision-language models (Qwen-VL's M-RoPE positions are carried per row), because it only needs
`model(input_ids, attention_mask, position_ids, cache)`.

The seam above it is `has_room()`, `submit(job)`, each job's `cancel` flag, and `stats()`;
output leaves only through the job's sink. It knows no session, formatter, store or HTTP.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from decoding import TextPipeline, ToolCallParser, ToolFormat, token_piece
from kv_cache import BatchCache, CompiledDecode, StaticBatchCache, static_cache_for
from model import ModelHandle
from sampling import RowSampler, SamplingParams, row_seed
from telemetry import (COMPLETION_TOKENS, GENERATIONS_STARTED, INTER_TOKEN_LATENCY,
                       TIME_TO_FIRST_TOKEN)

log = logging.getLogger("resumable.engine")


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


class JobSink(Protocol):
    """Where a job's output goes. Called on the engine thread; implementations hand the work
    to their own loop (runtime.SessionSink). Token counts are counts of generated tokens;
    `index` is the choice index (prompt index * n + choice of that prompt).

    `delta` and `choice_finished` carry what one sampled token produced: text `parts`
    ((channel, text) pairs, possibly several: `</think>` ends reasoning and starts content),
    the logprob entries of the tokens that text shows (ride on the first part), and `tokens`,
    the ids accepted since the last call for this choice (held-back tokens of a partial stop
    string or tag come with the text they finally produce). The lists are the sink's to keep:
    the engine starts new ones. A sink that persists these with
    the text can continue the choice after a crash (GenerationJob.resume). `seed` is the
    row's generator seed (drawn when the request has none).
    """

    def started(self, prompt_tokens: int) -> None: ...

    def delta(self, index: int, parts: list[tuple[str, str]], completion_tokens: int,
              logprobs: list[dict[str, Any]] | None, tokens: list[int], seed: int) -> None: ...

    def choice_finished(self, index: int, reason: str, parts: list[tuple[str, str]],
                        completion_tokens: int, reasoning_tokens: int,
                        logprobs: list[dict[str, Any]] | None, tokens: list[int]) -> None: ...

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int,
                 reasoning_tokens: int = 0) -> None: ...

    def failed(self, message: str) -> None: ...


@dataclass
class Resume:
    """Where a crashed generation stood, per choice index: the token ids generated and
    delivered (`tokens`), each row's generator seed, and the choices already finished
    (reason, completion_tokens, reasoning_tokens). The engine re-prefills prompt + tokens,
    replays them through the sampler (penalties, grammar) and the text pipeline (decoder,
    stop matcher, parsers) without output, and goes on at the next token."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    seeds: dict[int, int] = field(default_factory=dict)
    done: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    # In front of an upstream (no token ids): the (channel, text) parts delivered and the
    # tokens counted, per choice index.
    parts: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    counted: dict[int, int] = field(default_factory=dict)

    def completion_tokens(self) -> dict[int, int]:
        """Tokens generated before the crash, per choice index."""
        counts = {c: len(t) for c, t in self.tokens.items()}
        counts.update({c: max(n, counts.get(c, 0)) for c, n in self.counted.items()})
        counts.update({c: d[1] for c, d in self.done.items()})
        return counts


@dataclass
class GenerationJob:
    """A unit of work for the engine: an id (for logs), the cancel flag the engine polls
    between steps and layers, prepared model inputs (`input_ids` (1, prompt_tokens), plus
    vision tensors; `more_inputs` for the other prompts of a legacy completions request),
    sampling (`params.n` choices per prompt), and where output goes."""

    id: str
    cancel: threading.Event
    inputs: dict[str, torch.Tensor]
    params: SamplingParams
    sink: JobSink
    # None: no reasoning split; else whether the prompt already opened the think block.
    starts_in_reasoning: bool | None = None
    more_inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # Tool calls to parse out of the content: (format, function names offered, most calls
    # per turn or None).
    tools: tuple[ToolFormat, frozenset[str], int | None] | None = None
    resume: Resume | None = None  # a generation continued after a crash
    submitted_at: float = field(default_factory=time.monotonic)
    # In front of an upstream server (upstream.py): the request to send ({"path", "body"})
    # instead of `inputs`, and the future that says whether the upstream accepted it.
    upstream: dict[str, Any] | None = None
    opened: Any = None

    @property
    def prompts(self) -> list[dict[str, torch.Tensor]]:
        return [self.inputs, *self.more_inputs]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens (0 before an upstream has said how many)."""
        return sum(int(p["input_ids"].shape[-1]) for p in self.prompts if "input_ids" in p)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.params.n

    @property
    def longest_prompt(self) -> int:
        return max(int(p["input_ids"].shape[-1]) for p in self.prompts)


def job_finish_reason(reasons: Iterable[str]) -> str:
    """A job's finish reason from its choices': theirs when they agree, else "stop"."""
    distinct = set(reasons)
    return distinct.pop() if len(distinct) == 1 else "stop"


class GenerationCancelled(Exception):
    """Raised inside the model's forward pass by the engine's cancel hook."""


@dataclass(eq=False)
class Row:
    """One running sequence: a choice of a job, its cache row's bookkeeping and its text."""

    job: "JobState"
    index: int  # choice index in the response
    prompt_len: int
    sampler: RowSampler
    text: TextPipeline
    rope_delta: int = 0  # M-RoPE offset of this row's text positions (Qwen-VL); else 0
    length: int = 0  # real (unpadded) tokens in this row's cache
    last_token: int = 0
    completion_tokens: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)  # logprobs not yet sent
    unsent: list[int] = field(default_factory=list)  # token ids not yet sent with text
    last_at: float = 0.0


@dataclass(eq=False)
class JobState:
    """The engine's view of a running job: rows still running, counts for usage."""

    job: GenerationJob
    running: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    reasons: dict[int, str] = field(default_factory=dict)
    first_token_seen: bool = False


# ---------------------------------------------------------------------------------------------
# The engine thread
# ---------------------------------------------------------------------------------------------


class Engine:
    """Owns the model on one thread and decodes all running sequences in one batch per step.

    Admission: a job waits (FIFO) until the batch has room for all its rows (`max_num_seqs`)
    and the padded cache can hold every row to its end (`max_batch_tokens`: rows x the widest
    row's final length, since rows are padded to a common width); `has_room()` is False once
    `max_queued` jobs wait (the HTTP layer answers 429).

    With `compiled`, decode steps run compiled over a static cache (kv_cache.StaticBatchCache)
    warmed up in `start()`; a job that does not fit it (prompt + max_tokens past
    max_cache_len, more rows than its largest batch size) waits for the batch to drain and
    runs eagerly, with whatever joins it, until the batch is empty again.
    """

    def __init__(self, handle: ModelHandle, max_queued: int, max_num_seqs: int = 16,
                 max_batch_tokens: int = 262144, compiled: CompiledDecode | None = None):
        self.handle = handle
        self.max_queued, self.max_num_seqs = max_queued, max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.compiled = compiled
        self.waiting: collections.deque[GenerationJob] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.rows: list[Row] = []
        self.eager = BatchCache(self._forward)
        self.static: StaticBatchCache | None = None
        self.batch: BatchCache | StaticBatchCache = self.eager
        self.warmed = threading.Event()
        self.warm_up_seconds: float | None = None
        self.prefilling: GenerationJob | None = None
        self.token_text: dict[int, tuple[str, list[int]]] = {}
        # Set by start(), once the model is loaded.
        self.mrope, self.cache_arg, self.keep_arg = False, "cache", None

    # --- the seam ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; the model must be loaded."""
        model = self.handle.model
        # Qwen-VL keeps M-RoPE offsets of the last prefill on the model; rows carry their own.
        self.mrope = hasattr(getattr(model, "model", None), "rope_deltas")
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache (the old name warns until 5.40).
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        self._install_cancel_hooks()
        try:
            self.static = static_cache_for(model, self._forward, self.compiled,
                                           self.max_num_seqs, self.handle.context_length)
        except Exception:  # noqa: BLE001 - the compiler's setup must not stop the server
            log.exception("compiled decode off: it could not be set up")
        self.thread.start()
        self.warmed.wait()  # the compile happens now, not in the first request

    def _warm_up(self) -> None:
        """Compile every batch size of the static cache (on this thread: CUDA graphs are
        replayed by the thread that recorded them). A failure leaves the eager decode."""
        try:
            if self.static is not None:
                # Storage in the shapes the model really writes: those of a 1-token prefill.
                one = torch.tensor([[self.handle.pad_token_id or 0]])
                cache = self._prefill({"input_ids": one, "attention_mask": torch.ones_like(one)})[0]
                self.static.allocate_like(cache)
                self.warm_up_seconds = self.static.warm_up(self.mrope, lambda: self.stopping)
                log.info("compiled decode ready: batch sizes %s, %d columns, %.1f s",
                         self.static.batch_sizes, self.static.max_cache_len,
                         self.warm_up_seconds)
        except Exception:  # noqa: BLE001 - a compiler failure must not stop the server
            log.exception("compiled decode failed to warm up; decoding eagerly")
            self.static = None
        finally:
            self.warmed.set()

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """The model's decode forward: logits (rows, 1, vocab) of the last position."""
        kwargs = {self.cache_arg: cache}
        if self.keep_arg:
            kwargs[self.keep_arg] = 1
        return self.handle.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=True, **kwargs).logits

    def stop(self, timeout: float = 30.0) -> None:
        """Let the engine finish at a step boundary and wait for its thread (callers cancel the
        running jobs first). A thread left inside torch at interpreter exit aborts the process
        ("terminate called without an active exception")."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def decode(self) -> str:
        """`compiled` once the static cache is warm (until then, or without it: `eager`)."""
        return "compiled" if self.static is not None and self.warmed.is_set() else "eager"

    def has_room(self) -> bool:
        return len(self.waiting) < self.max_queued

    def submit(self, job: GenerationJob) -> None:
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()

    def stats(self) -> dict[str, float]:
        """running/waiting sequences; `kv_cache_usage`: the padded cache the running rows will
        need at most (`projected_tokens`) over MAX_BATCH_TOKENS (0..1, may pass 1 for a job
        admitted alone); `kv_cache_tokens`: cache entries held now."""
        return {"running": len(self.rows), "waiting": sum(j.rows for j in list(self.waiting)),
                "kv_cache_usage": self.projected_tokens() / self.max_batch_tokens,
                "kv_cache_tokens": self.batch.tokens()}

    def projected_tokens(self, job: GenerationJob | None = None) -> int:
        """Cache entries the batch will need at its widest if `job` joins now: rows x (current
        width + the longest remaining budget). Every row ends at that column or earlier."""
        width, count = self.batch.columns, len(self.rows)
        if job is not None:
            width, count = max(width, job.longest_prompt), count + job.rows
        return count * (width + self._remaining(job))

    def _remaining(self, job: GenerationJob | None = None) -> int:
        """The longest budget of new tokens left to a running row (or to `job`'s rows)."""
        remaining = max((r.job.job.params.max_new_tokens - r.completion_tokens
                         for r in list(self.rows)), default=0)
        return max(remaining, job.params.max_new_tokens) if job is not None else remaining

    # --- cancel inside a forward pass --------------------------------------------------------

    def _install_cancel_hooks(self) -> None:
        """Check the prefilling job's cancel flag before every decoder layer (and vision block).

        A long prompt's prefill is one pass of many seconds on a CPU, during which a cancel
        used to leave the engine busy (the next request waited 27-38 s behind a 2,700-token
        prefill). A layer hook ends it within one layer. Decode steps are short and shared by
        every row: a cancel there takes effect at the step's end, for that row only.
        """
        model = self.handle.model
        layers = [m for m in model.modules()
                  if type(m).__name__.endswith(("DecoderLayer", "Block"))] or [model]
        for layer in layers:
            layer.register_forward_pre_hook(self._cancel_hook)

    def _cancel_hook(self, module, args) -> None:
        if torch.compiler.is_compiling():  # decode steps only: prefill is never compiled
            return
        job = self.prefilling
        if job is not None and job.cancel.is_set():
            raise GenerationCancelled()

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        # One inference-mode scope for the thread: cache surgery and sampling outside the
        # forward pass then skip autograd bookkeeping too.
        with torch.inference_mode():
            self._warm_up()
            while True:
                job = self._next_job()
                if job is None and self.stopping:
                    break
                try:
                    if job is not None:
                        self._admit(job)
                    if self.rows:
                        self._step()
                except Exception:  # noqa: BLE001 - the engine thread must outlive any bug
                    self._reset(job)

    def _reset(self, admitting: GenerationJob | None) -> None:
        """Last resort after an unexpected error outside the guarded model calls: fail every
        running job (and the one being admitted) and start from an empty batch, so later
        requests are still served."""
        jobs = list(dict.fromkeys(r.job for r in self.rows))
        log.exception("engine step failed outside the model; failing %d running jobs",
                      len(jobs))
        self.rows, self.prefilling = [], None
        self.batch.clear()
        if admitting is not None and all(s.job is not admitting for s in jobs):
            jobs.append(JobState(admitting))
        for state in jobs:
            state.running = 0
            self._fail_job(state, log_it=False)

    def _next_job(self) -> GenerationJob | None:
        """The next waiting job that fits now (blocking while nothing runs), or None."""
        with self.wake:
            while True:
                if any(j.cancel.is_set() for j in self.waiting):
                    # cancelled while queued: the loop side already ended them
                    self.waiting = collections.deque(j for j in self.waiting
                                                     if not j.cancel.is_set())
                if self.stopping:
                    return None
                if self.waiting and self._room_for(self.waiting[0]):
                    return self.waiting.popleft()
                if self.rows:
                    return None
                self.wake.wait()

    def _room_for(self, job: GenerationJob) -> bool:
        if not self.rows:
            return True  # a job too large for the limits runs alone rather than never
        return (len(self.rows) + job.rows <= self.max_num_seqs
                and self.projected_tokens(job) <= self.max_batch_tokens
                and self.batch.fits(len(self.rows) + job.rows, job.longest_prompt,
                                    self._remaining(job)))

    def _batch_for(self, job: GenerationJob) -> BatchCache | StaticBatchCache:
        """The cache an empty batch starts with: the compiled one when the job fits it."""
        if self.static is not None and self.static.fits(job.rows, job.longest_prompt,
                                                        job.params.max_new_tokens):
            return self.static
        return self.eager

    # --- admission: prefill a job and merge its rows -----------------------------------------

    def _admit(self, job: GenerationJob) -> None:
        GENERATIONS_STARTED.inc()
        state = JobState(job)
        if not self.rows:
            self.batch.clear()
            self.batch = self._batch_for(job)
        if job.resume is not None:
            # Delivered before the crash: counted first, so a cancel inside the re-prefill
            # still reports them.
            state.completion_tokens = sum(job.resume.completion_tokens().values())
        job.sink.started(job.prompt_tokens)
        self.prefilling = job
        try:
            joined: list[tuple[DynamicCache, list[Row], int]] = []
            for p_index, inputs in enumerate(job.prompts):
                for tokens, indices in self._prefill_groups(state, p_index):
                    cache, logits, delta, length = self._prefill(inputs, tokens)
                    rows = [self._new_row(state, i, inputs, delta, length) for i in indices]
                    for row in rows:
                        self._replay(row, tokens)
                    if len(rows) > 1:
                        cache.batch_repeat_interleave(len(rows))
                    joined.append((cache, rows, length))
                    for row in rows:
                        self._accept(row, row.sampler(logits))
        except GenerationCancelled:
            self.prefilling = None
            self._end_job(state, "cancelled")
            return
        except Exception:  # noqa: BLE001 - one failed job must not stop the engine
            self.prefilling = None
            self._fail_job(state)
            return
        self.prefilling = None
        try:
            for cache, rows, length in joined:
                keep = [i for i, row in enumerate(rows) if not self._finished(row)]
                if not keep:
                    continue
                if len(keep) < len(rows):
                    cache.batch_select_indices(torch.tensor(keep))
                self.batch.merge(cache, len(keep), length)
                self.rows.extend(rows[i] for i in keep)
        except Exception:  # noqa: BLE001 - out of memory while merging: this job fails
            self._drop_rows(state)
            self._fail_job(state)
            return
        if state.running == 0:
            self._end_job(state, None)

    def _prefill_groups(self, state: JobState, p_index: int) -> list[tuple[list[int], list[int]]]:
        """The prefills prompt `p_index` needs: (generated tokens to append, choice indices
        that share them). A new job: one, shared by its n choices. A resumed one: a prefill
        per distinct continuation; finished choices only count toward usage."""
        n, resume = state.job.params.n, state.job.resume
        indices = [p_index * n + c for c in range(n)]
        if resume is None:
            return [([], indices)]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in indices:
            if i in resume.done:
                reason, _, reasoning = resume.done[i]
                state.reasons[i] = reason
                state.reasoning_tokens += reasoning
            else:
                groups.setdefault(tuple(resume.tokens.get(i, ())), []).append(i)
        return [(list(tokens), group) for tokens, group in groups.items()]

    def _prefill(self, inputs: dict[str, torch.Tensor], tokens: list[int] = ()
                 ) -> tuple[DynamicCache, torch.Tensor, int, int]:
        """One prompt's forward pass, batch 1, with `tokens` already generated appended.
        Returns (its cache, last logits (vocab,), its M-RoPE delta, its length)."""
        model = self.handle.model
        if self.mrope:
            model.model.rope_deltas = None  # the last prefill's, not this one's
        if tokens:
            ids = inputs["input_ids"]
            # Per-token inputs grow with the text: ids by the tokens, the mask by ones, any
            # other (1, length) tensor (Qwen-VL's mm_token_type_ids) by zeros: plain text.
            grown = dict(inputs)
            for key, value in inputs.items():
                if key == "input_ids":
                    tail = torch.tensor([tokens], dtype=ids.dtype)
                elif value.dim() == 2 and value.shape == ids.shape:
                    fill = 1 if key == "attention_mask" else 0
                    tail = torch.full((1, len(tokens)), fill, dtype=value.dtype)
                else:
                    continue
                grown[key] = torch.cat([value, tail], dim=-1)
            inputs = grown
        kwargs = {k: v.to(model.device) for k, v in inputs.items()}
        kwargs[self.cache_arg] = DynamicCache()
        if self.keep_arg:
            kwargs[self.keep_arg] = 1
        out = model(**kwargs, use_cache=True)
        cache = kwargs[self.cache_arg]  # filled in place
        if not BatchCache.batchable(cache):
            raise RuntimeError("this model's cache (sliding-window layers) cannot be batched")
        delta = 0
        if self.mrope and model.model.rope_deltas is not None:
            delta = int(model.model.rope_deltas.reshape(-1)[0])
        return cache, out.logits[0, -1].float(), delta, int(inputs["input_ids"].shape[-1])

    def _new_row(self, state: JobState, index: int, inputs: dict[str, torch.Tensor],
                 delta: int, length: int) -> Row:
        job, p = state.job, state.job.params
        prompt = inputs["input_ids"][0].tolist()
        state.running += 1
        resume = job.resume
        seed = (resume.seeds[index] if resume and index in resume.seeds
                else row_seed(p.seed, index % p.n if p.n else 0))
        sampler = RowSampler(p, prompt, self.handle.eos_token_ids, seed, self._token_text)
        sampler.grammar_on = not job.starts_in_reasoning  # constrain the answer, not the thought
        return Row(job=state, index=index, prompt_len=length, length=length, rope_delta=delta,
                   sampler=sampler,
                   text=TextPipeline(self.handle.tokenizer, p.stop, job.starts_in_reasoning,
                                     ToolCallParser(*job.tools) if job.tools else None))

    def _replay(self, row: Row, tokens: list[int]) -> None:
        """Bring a resumed row to where it stood after `tokens`: the sampler's penalties and
        grammar, the text pipeline's decoder and parsers. Their text was delivered already."""
        for token in tokens:
            row.sampler.accept(token)
            row.text.push(token)
            if not row.sampler.grammar_on and row.text.answering:
                row.sampler.grammar_on = True
        if tokens:
            row.last_token = tokens[-1]
        row.completion_tokens = len(tokens)  # counted for the job in _admit already
        row.job.reasoning_tokens += row.text.reasoning_tokens

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        piece = self.token_text.get(token)
        if piece is None:
            piece = self.token_text[token] = token_piece(self.handle.tokenizer, token)
        return piece

    # --- one decode step for every running row -----------------------------------------------

    def _step(self) -> None:
        """One forward pass for all rows, then sampling and retiring per row."""
        self._retire_cancelled()
        if not self.rows:
            return
        rows = self.rows
        ids = torch.tensor([[r.last_token] for r in rows])
        positions = torch.tensor([[r.length + r.rope_delta] for r in rows])
        if self.mrope:
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        try:
            logits = self.batch.step(ids, positions)
        except Exception as e:  # noqa: BLE001 - isolate the failure, keep the engine
            self._step_failed(e)
            return
        plain = [i for i, r in enumerate(rows) if r.sampler.plain]
        picked = torch.argmax(logits[plain], dim=-1).tolist() if plain else []
        chosen = dict(zip(plain, picked))
        broken: list[JobState] = []
        for i, row in enumerate(rows):
            row.length += 1
            if row.job in broken:
                continue
            try:
                if i in chosen:
                    row.sampler.accept(chosen[i])
                    self._accept(row, (chosen[i], None))
                else:
                    self._accept(row, row.sampler(logits[i]))
            except Exception:  # noqa: BLE001 - e.g. NaN logits: this row's job fails alone
                log.exception("sampling failed in job %s", row.job.job.id)
                broken.append(row.job)
        for state in broken:
            self._drop_rows(state)
            self._fail_job(state, log_it=False)
        self._retire()

    def _step_failed(self, error: Exception) -> None:
        """A decode step raised. Out of memory: the newest job leaves (its rows grew the batch
        last) and the rest retry next step. Anything else cannot be pinned on one row: every
        running job fails."""
        oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.batch is self.static and not oom:
            # A compiled step that fails would fail every later batch too: decode eagerly.
            log.error("compiled decode step failed; decoding eagerly from now on")
            self.static = None
        jobs = list(dict.fromkeys(r.job for r in self.rows))
        victims = jobs[-1:] if oom and len(jobs) > 1 else jobs
        log.error("decode step failed (%s); failing %d of %d jobs", type(error).__name__,
                  len(victims), len(jobs), exc_info=error)
        for state in victims:
            self._drop_rows(state)
            self._fail_job(state, log_it=False)

    # --- per-row output and retirement -------------------------------------------------------

    def _accept(self, row: Row, choice: tuple[int, dict[str, Any] | None]) -> None:
        token, entry = choice
        state, now = row.job, time.monotonic()
        if not state.first_token_seen:
            state.first_token_seen = True
            TIME_TO_FIRST_TOKEN.observe(now - state.job.submitted_at)
        elif row.last_at:
            INTER_TOKEN_LATENCY.observe(now - row.last_at)
        row.last_at = now
        row.last_token = token
        row.completion_tokens += 1
        state.completion_tokens += 1
        COMPLETION_TOKENS.inc()
        if entry is not None and token not in self.handle.eos_token_ids:
            row.pending.append(entry)  # the end token is not part of the text: no entry
        row.unsent.append(token)
        before = row.text.reasoning_tokens
        parts = row.text.push(token)
        state.reasoning_tokens += row.text.reasoning_tokens - before
        if not row.sampler.grammar_on and row.text.answering:
            row.sampler.grammar_on = True
        reason = self._finish_reason(row, token)
        sink = state.job.sink
        # Logprob entries ride on the first part after their tokens (entries of tokens whose
        # text never shows, cut by a stop string, are dropped with it); token ids wait for
        # text, so a crash never leaves delivered text without the tokens behind it.
        if reason is not None:
            state.reasons[row.index] = reason
            state.running -= 1
            parts += row.text.flush()
            sink.choice_finished(row.index, reason, parts, row.completion_tokens,
                                 row.text.reasoning_tokens, row.pending or None, row.unsent)
        elif parts:
            sink.delta(row.index, parts, row.completion_tokens, row.pending or None,
                       row.unsent, row.sampler.seed)
        else:
            return
        row.pending, row.unsent = [], []

    def _finish_reason(self, row: Row, token: int) -> str | None:
        p = row.job.job.params
        if row.text.stopped or token in self.handle.eos_token_ids:  # EOS: after min_tokens
            # A turn that called tools ends for them (OpenAI's finish_reason "tool_calls").
            return "tool_calls" if row.text.tools and row.text.tools.calls else "stop"
        if row.completion_tokens >= p.max_new_tokens:
            return "length"
        return None

    def _finished(self, row: Row) -> bool:
        return row.index in row.job.reasons

    def _retire(self) -> None:
        """Drop finished rows from the batch; end jobs whose rows are all done."""
        done = [r for r in self.rows if self._finished(r)]
        if not done:
            return
        keep = [i for i, r in enumerate(self.rows) if not self._finished(r)]
        self.batch.keep(keep)
        self.rows = [self.rows[i] for i in keep]
        for state in dict.fromkeys(r.job for r in done):
            if state.running == 0:
                self._end_job(state, None)

    def _retire_cancelled(self) -> None:
        for state in dict.fromkeys(r.job for r in self.rows):
            if state.job.cancel.is_set():
                self._drop_rows(state)
                self._end_job(state, "cancelled")

    def _drop_rows(self, state: JobState) -> None:
        keep = [i for i, r in enumerate(self.rows) if r.job is not state]
        if len(keep) != len(self.rows):
            self.batch.keep(keep)
            self.rows = [self.rows[i] for i in keep]
        state.running = 0

    def _end_job(self, state: JobState, reason: str | None) -> None:
        """All rows ended (reason None: each its own) or the job was cut (`reason`)."""
        job = state.job
        if reason is None:
            reason = job_finish_reason(state.reasons.values())
        job.sink.finished(reason, job.prompt_tokens, state.completion_tokens,
                          state.reasoning_tokens)

    def _fail_job(self, state: JobState, log_it: bool = True) -> None:
        job = state.job
        if log_it:
            log.exception("generation failed in job %s", job.id)
        # The exception text stays in the log: it can name files and internals.
        job.sink.failed(f"generation failed in session {job.id}; the server log has the details")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
