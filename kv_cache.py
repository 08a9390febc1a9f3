"""The KV cache of the engine's running batch, and the decode forward over it.

Two implementations of one surface (`merge`, `keep`, `step`, `fits`, `columns`, `rows`,
`tokens`, `clear`): `BatchCache`, one `DynamicCache` whose rows are left-padded to a common
length with a mask that tells real entries from padding (eager, any length); and
`StaticBatchCache`, preallocated tensors of fixed shapes for a compiled decode step (CUDA
graphs on a GPU). The engine (engine.py) merges each prefilled job's cache in, runs one step
for every row, and keeps the rows still running; nothing else touches the cache tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

log = logging.getLogger("resumable.kv_cache")


class BatchCache:
    """The running rows' KV cache: one `DynamicCache`, rows left-padded to a common length.

    `mask` (rows, columns) marks real cache entries with 1. A prefilled job's cache (its rows,
    its own length) is merged by padding whichever side is shorter on the left; retired rows are
    dropped by index and leading columns that are padding in every row are trimmed.
    """

    def __init__(self, forward: Callable[..., torch.Tensor]):
        # forward(input_ids, attention_mask, position_ids, cache) -> logits (rows, 1, vocab)
        self.forward = forward
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    @property
    def columns(self) -> int:
        mask = self.mask  # read once: /metrics reads this while the engine thread works
        return 0 if mask is None else int(mask.shape[1])

    @staticmethod
    def _layers(cache: DynamicCache) -> list[DynamicLayer]:
        return list(cache.layers)

    @staticmethod
    def batchable(cache: DynamicCache) -> bool:
        """Only plain full-attention layers can be padded and merged (sliding windows cannot)."""
        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def merge(self, cache: DynamicCache, rows: int, length: int) -> None:
        """Append `rows` rows whose cache (batch `rows`, `length` columns) is `cache`."""
        new_mask = torch.ones(rows, length, dtype=torch.long, device=self._device(cache))
        if self.cache is None:
            self.cache, self.mask = cache, new_mask
            return
        width = max(self.columns, length)
        # All new tensors first, then swap in: a failure (out of memory) leaves the batch as it was.
        merged = [(torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)]),
                   torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)]))
                  for old, new in zip(self._layers(self.cache), self._layers(cache))]
        mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(new_mask, width, 1)])
        for layer, (keys, values) in zip(self._layers(self.cache), merged):
            layer.keys, layer.values = keys, values
        self.mask = mask

    @property
    def rows(self) -> int:
        mask = self.mask
        return 0 if mask is None else int(mask.shape[0])

    def fits(self, rows: int, width: int, remaining: int) -> bool:
        """Always: the engine's MAX_BATCH_TOKENS budget is the only limit of a growing cache."""
        return True

    def clear(self) -> None:
        self.cache, self.mask = None, None

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One decode forward for every row: `input_ids` (rows, 1), `position_ids` (rows, 1)
        or (3, rows, 1) for M-RoPE. Returns the logits (rows, vocab) as float32. A failed step
        is rolled back (a forward may have appended to some layers) and re-raised."""
        device, columns = self.mask.device, self.columns
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long, device=device)],
                         dim=1)
        try:
            logits = self.forward(input_ids.to(device), mask, position_ids.to(device),
                                  self.cache)
        except Exception:
            self.truncate(columns)
            raise
        self.mask = mask
        return logits[:, -1].float()

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at `indices` (in that order); free the rest."""
        if not indices:
            self.cache, self.mask = None, None
            return
        idx = torch.tensor(indices, device=self.mask.device)
        self.mask = self.mask[idx]
        live = torch.nonzero(self.mask.sum(0)).flatten()
        start = int(live[0]) if len(live) else 0
        self.mask = self.mask[:, start:]
        for layer in self._layers(self.cache):
            layer.keys = layer.keys[idx.to(layer.keys.device), :, start:]
            layer.values = layer.values[idx.to(layer.values.device), :, start:]

    def truncate(self, columns: int) -> None:
        """Undo a partial step: cut every layer back to `columns` (a failed forward may have
        appended to some layers)."""
        for layer in self._layers(self.cache):
            if layer.is_initialized and layer.keys.shape[2] > columns:
                layer.keys = layer.keys[:, :, :columns]
                layer.values = layer.values[:, :, :columns]

    def tokens(self) -> int:
        """Cache entries in use, padding included (what memory holds)."""
        mask = self.mask  # read once: the engine thread may drop it meanwhile
        return 0 if mask is None else int(mask.numel())

    @staticmethod
    def _device(cache: DynamicCache) -> torch.device:
        for layer in cache.layers:
            if layer.is_initialized:
                return layer.keys.device
        return torch.device("cpu")


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


# ---------------------------------------------------------------------------------------------
# The static cache of the compiled decode step
# ---------------------------------------------------------------------------------------------


@dataclass
class CompiledDecode:
    """The compiled decode step's configuration (settings COMPILE_*, MAX_CACHE_LEN):
    `max_cache_len` columns per row of the static cache, the `batch_sizes` compiled, and
    `options` for `torch.compile` (None: the static cache runs eagerly, for tests)."""

    max_cache_len: int = 4096
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    options: dict[str, Any] | None = None
    cuda_only: bool = False  # COMPILE_DECODE=auto: eager on a CPU


def static_cache_for(model: Any, forward: Callable[..., torch.Tensor],
                     compiled: CompiledDecode | None, max_num_seqs: int,
                     context_length: int | None) -> StaticBatchCache | None:
    """The compiled decode's cache for `model` (not yet compiled: `warm_up` does it), or
    None: not asked for, or this model cannot have one (the reason is logged)."""
    if compiled is None or (compiled.cuda_only and model.device.type != "cuda"):
        return None
    if not StaticBatchCache.supports(model.config):
        log.warning("compiled decode off: %s has layers a static cache cannot hold",
                    type(model).__name__)
        return None
    if len({p.device for p in model.parameters()}) > 1:
        log.warning("compiled decode off: the model is split over devices")
        return None
    length = min(compiled.max_cache_len, context_length or compiled.max_cache_len)
    sizes = [s for s in compiled.batch_sizes if s <= max_num_seqs] or [1]
    options = compiled.options
    if options and model.device.type != "cuda" and options.get("mode") == "reduce-overhead":
        options = {**options, "mode": None}  # CUDA graphs need CUDA
    return StaticBatchCache(forward, model.config, length, sizes, model.dtype, model.device,
                            options)



class StaticBatchCache:
    """The running rows' KV cache in preallocated tensors, for a compiled decode step.

    Storage per layer: keys and values of shape (slots, kv_heads, max_cache_len, head_dim),
    allocated once. Rows live in slots 0..rows-1 in the engine's row order and share one write
    column, `pos`, as in `BatchCache`: row i holds real entries in columns [starts[i], pos)
    (left of that: padding, masked). A decode step runs the batch in the smallest size of
    `batch_sizes` that holds it (the slots past the rows are idle: token 0, attending to one
    column); each size is a `StaticCache` whose layers are views of the first `size` slots,
    so every size has its own fixed shapes and fixed addresses: one compiled graph (one CUDA
    graph under `mode="reduce-overhead"`) per size. Sources: transformers' StaticCache, and
    gpt-fast's `decode_one_token` (a compiled step over a preallocated cache, a mask over all
    columns).

    `forward(input_ids, attention_mask, position_ids, cache) -> logits (rows, 1, vocab)` is
    the model call; it is compiled here with `torch.compile(**compile_options)` (None: it
    runs eagerly, which is how the bookkeeping is tested without a compiler).
    """

    def __init__(self, forward: Callable[..., torch.Tensor], config: Any, max_cache_len: int,
                 batch_sizes: list[int], dtype: torch.dtype, device: torch.device | str,
                 compile_options: dict[str, Any] | None = None):
        self.compiled = forward
        if compile_options is not None:
            # One compile per batch size; past dynamo's limit (8) a size would run uncompiled.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, len(set(batch_sizes)) + 2)
            self.compiled = torch.compile(forward, **compile_options)
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.max_cache_len = max_cache_len
        self.batch_sizes = sorted(set(batch_sizes))
        self.slots = self.batch_sizes[-1]
        self.pos = 0
        self.starts: list[int] = []
        self.caches: dict[int, StaticCache] = {}
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # One write column per layer (transformers' StaticLayer advances its own by one in
        # each forward); all set together before each step.
        self.write_columns = torch.zeros(0, dtype=torch.long)
        self.column_ids = torch.arange(max_cache_len, device=self.device)  # for the mask

    @staticmethod
    def supports(config: Any) -> bool:
        """Whether every layer of this model has a plain full-attention static layer (sliding
        windows and linear-attention states have other shapes), one that writes at its own
        `cumulative_length` (older transformers took the column from the model instead)."""
        try:
            cache = StaticCache(config=config, max_cache_len=8)
        except Exception:  # noqa: BLE001 - configs the cache classes do not know
            return False
        return all(type(layer) is StaticLayer and hasattr(layer, "cumulative_length")
                   for layer in cache.layers)

    # --- the surface BatchCache shares -------------------------------------------------------

    @property
    def columns(self) -> int:
        """Width of the live rows (the oldest row's length): what a joining row pads to."""
        starts = self.starts  # read once: /metrics reads this while the engine thread works
        return self.pos - min(starts) if starts else 0

    @property
    def rows(self) -> int:
        return len(self.starts)

    def fits(self, rows: int, width: int, remaining: int) -> bool:
        """Whether `rows` rows in all, `width` columns wide now and growing by at most
        `remaining` more, fit the slots and columns."""
        return rows <= self.slots and max(width, self.columns) + remaining <= self.max_cache_len

    def tokens(self) -> int:
        """Cache entries the live rows span, padding included."""
        starts, pos = self.starts, self.pos
        return len(starts) * (pos - min(starts)) if starts else 0

    def clear(self) -> None:
        """Drop every row (the storage stays allocated)."""
        self.pos, self.starts = 0, []

    def merge(self, cache: DynamicCache, rows: int, length: int) -> None:
        """Copy `rows` prefilled rows (`cache`: batch `rows`, `length` columns) into the next
        slots, right-aligned at the write column; if they are longer than that column, the
        live rows move right first. Raises RuntimeError past the slots or columns."""
        layers = list(cache.layers)
        if not self.keys:
            self.allocate_like(cache)
        if len(layers) != len(self.keys) or any(
                layer.keys.shape[1::2] != store.shape[1::2]
                for layer, store in zip(layers, self.keys)):
            raise RuntimeError("a prefilled cache of another shape than the static cache")
        first = self.rows
        if first + rows > self.slots or length >= self.max_cache_len:
            raise RuntimeError("the static cache has no room for these rows")
        if length > self.pos:
            self._shift(length - self.pos)
        start = self.pos - length
        for i, layer in enumerate(layers):
            self.keys[i][first:first + rows, :, start:self.pos] = layer.keys
            self.values[i][first:first + rows, :, start:self.pos] = layer.values
        self.starts.extend([start] * rows)

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at `indices` (in that order), moved to the first slots."""
        if not indices:
            self.clear()
            return
        if indices != list(range(len(indices))):
            lead = min(self.starts[i] for i in indices)
            idx = torch.tensor(indices, device=self.device)
            for store in (*self.keys, *self.values):
                store[:len(indices), :, lead:self.pos] = store[idx, :, lead:self.pos]
        self.starts = [self.starts[i] for i in indices]

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One decode forward for every row: `input_ids` (rows, 1), `position_ids` (rows, 1)
        or (3, rows, 1) for M-RoPE. Returns the logits (rows, vocab) as float32, a copy (a
        CUDA graph's output is overwritten by its next replay). A failed step leaves the rows
        as they were (its write column is written again next time). Raises RuntimeError
        when every column is taken (admission keeps that from happening)."""
        rows = self.rows
        if self.pos >= self.max_cache_len:
            self._compact()
        size = next(s for s in self.batch_sizes if s >= rows)
        if size > rows:  # idle slots: token 0 at position 0, attending to the new column only
            input_ids = torch.cat([input_ids, input_ids.new_zeros(size - rows, 1)])
            position_ids = torch.cat(
                [position_ids, position_ids.new_zeros(*position_ids.shape[:-2], size - rows, 1)],
                dim=-2)
        starts = torch.tensor(self.starts + [self.pos] * (size - rows), device=self.device)
        logits = self._call(size, input_ids.to(self.device), position_ids.to(self.device),
                            starts)
        self.pos += 1
        return logits[:rows, -1].to(torch.float32, copy=True)

    def warm_up(self, mrope: bool = False,
                stopping: Callable[[], bool] = lambda: False) -> float:
        """Compile (and on a GPU capture) every batch size now, with idle rows; nothing is
        kept. `mrope`: the model takes (3, rows, 1) positions; `stopping`: asked between
        sizes, True ends the warm-up early (the server is shutting down). Needs the storage
        (`allocate_like`). Returns the seconds taken."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            _cudagraph_thread_state()
        for size in self.batch_sizes:
            if stopping():
                break
            ids = torch.zeros(size, 1, dtype=torch.long, device=self.device)
            positions = torch.zeros(size, 1, dtype=torch.long, device=self.device)
            if mrope:
                positions = positions.unsqueeze(0).expand(3, -1, -1)
            for _ in range(2):  # the first call compiles, the second records the CUDA graph
                self._call(size, ids, positions, torch.zeros(size, dtype=torch.long,
                                                             device=self.device))
        self.clear()
        return time.perf_counter() - started

    def allocate_like(self, cache: DynamicCache) -> None:
        """Allocate the storage in the shapes of a prefilled cache (layers, KV heads, head
        sizes: what the model really writes, whatever its config says)."""
        layers = list(cache.layers)
        first = layers[0]
        self._allocate(first.keys.shape[1], first.keys.shape[3], first.values.shape[3],
                       len(layers))

    # --- internals ---------------------------------------------------------------------------

    def _allocate(self, kv_heads: int, k_dim: int, v_dim: int, layers: int) -> None:
        shape = (self.slots, kv_heads, self.max_cache_len)
        self.keys = [torch.zeros(*shape, k_dim, dtype=self.dtype, device=self.device)
                     for _ in range(layers)]
        self.values = [torch.zeros(*shape, v_dim, dtype=self.dtype, device=self.device)
                       for _ in range(layers)]
        self.write_columns = torch.zeros(layers, dtype=torch.long, device=self.device)
        for size in self.batch_sizes:
            cache = StaticCache(config=self.config, max_cache_len=self.max_cache_len)
            for i, layer in enumerate(cache.layers):
                layer.keys, layer.values = self.keys[i][:size], self.values[i][:size]
                layer.cumulative_length = self.write_columns[i]
                layer.device, layer.batch_size, layer.num_heads = self.device, size, kv_heads
                layer.k_head_dim, layer.v_head_dim = k_dim, v_dim
                layer.is_initialized = True
                # Fixed addresses: no copy into the graph's inputs, no re-capture.
                for t in (layer.keys, layer.values, layer.cumulative_length):
                    torch._dynamo.mark_static_address(t)
            self.caches[size] = cache

    def _call(self, size: int, input_ids: torch.Tensor, position_ids: torch.Tensor,
              starts: torch.Tensor) -> torch.Tensor:
        columns = self.column_ids
        visible = (columns >= starts[:, None]) & (columns <= self.pos)
        # Additive float mask (eager and SDPA attention both take it): 0 or the dtype's min.
        mask = torch.zeros(size, 1, 1, self.max_cache_len, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible[:, None, None, :], torch.finfo(self.dtype).min)
        self.write_columns.fill_(self.pos)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # Contiguous: dynamo guards on strides, and warm-up's expanded M-RoPE positions
        # would otherwise differ from a step's and compile every size a second time.
        return self.compiled(input_ids.contiguous(), mask, position_ids.contiguous(),
                             self.caches[size])

    def _shift(self, by: int) -> None:
        """Move the live rows `by` columns right (a longer row joins)."""
        if self.pos + by > self.max_cache_len:
            raise RuntimeError("the static cache has no room for these rows")
        self._move(by)

    def _compact(self) -> None:
        """Move the live rows left to column 0 (the write column reached the end)."""
        lead = min(self.starts)
        if lead == 0:
            raise RuntimeError("the static cache is full")
        self._move(-lead)

    def _move(self, by: int) -> None:
        """Move the live rows' columns, and the write column, `by` columns (right if > 0)."""
        if self.starts:
            lead, rows = min(self.starts), self.rows
            for store in (*self.keys, *self.values):
                store[:rows, :, lead + by:self.pos + by] = store[:rows, :, lead:self.pos].clone()
            self.starts = [s + by for s in self.starts]
        self.pos += by


def _cudagraph_thread_state() -> None:
    """Give this thread the state CUDA graph trees keep per thread. torch before the fix of
    pytorch/pytorch#123177 (PR #184357, 2026) sets it on the importing thread only and
    asserts in any other; the engine records and replays its graphs on its own thread."""
    from collections import defaultdict
    import threading

    from torch._inductor import cudagraph_trees as trees
    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls(
            "tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)
