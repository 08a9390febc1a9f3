"""The KV cache of the engine's running batch: one `DynamicCache` whose rows are left-padded
to a common length, with the mask that tells real entries from padding.

The engine (engine.py) merges each prefilled job's cache in, keeps the rows still running
after a step, and rolls a failed step back; nothing else touches the cache tensors. A static
cache for a compiled decode step would be a second implementation of this same surface.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BatchCache:
    """The running rows' KV cache: one `DynamicCache`, rows left-padded to a common length.

    `mask` (rows, columns) marks real cache entries with 1. A prefilled job's cache (its rows,
    its own length) is merged by padding whichever side is shorter on the left; retired rows are
    dropped by index and leading columns that are padding in every row are trimmed.
    """

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

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
