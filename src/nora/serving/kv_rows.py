"""The running batch's KV cache, one row per sequence (transformers' DynamicCache).

Rows are right-aligned: each row's tokens end at the last column and a 2-D attention mask
(1 = a real token) marks the left padding. Joining requests are merged in (left-padding the
shorter side), finished ones are dropped, and leading columns that are padding in every
remaining row are trimmed, so the cache never outgrows the longest live sequence.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

S = TypeVar("S")  # what a row holds (the engine's Sequence)


def layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers; only full-attention layers can be merged row by row."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise RuntimeError(
                f"continuous batching supports full-attention caches only, not {type(layer).__name__}"
            )
    return cache.layers


class KVRows(Generic[S]):
    """`seqs[i]` owns row i of `cache` and `mask` (None while the batch is empty)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seqs: list[S] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token

    def __len__(self) -> int:
        return len(self.seqs)

    def clear(self) -> None:
        self.seqs, self.cache, self.mask = [], None, None

    def merge(self, cache: DynamicCache, mask: torch.Tensor, seqs: list[S], idx: list[int]):
        """Add rows `idx` of a prefill's (cache, mask) as `seqs`."""
        if len(idx) != mask.shape[0]:
            sel = torch.tensor(idx, device=self.device)
            for layer in layers(cache):
                layer.keys, layer.values = layer.keys[sel], layer.values[sel]
            mask = mask[sel]
        if not self.seqs:
            self.seqs, self.cache, self.mask = list(seqs), cache, mask
            self.trim()
            return
        L, P = self.mask.shape[1], mask.shape[1]
        T = max(L, P)
        for old, new in zip(layers(self.cache), layers(cache), strict=True):
            old.keys = torch.cat([_lpad(old.keys, T - L), _lpad(new.keys, T - P)])
            old.values = torch.cat([_lpad(old.values, T - L), _lpad(new.values, T - P)])
        self.mask = torch.cat([F.pad(self.mask, (T - L, 0)), F.pad(mask, (T - P, 0))])
        self.seqs += seqs
        self.trim()

    def keep(self, keep: list[S]) -> None:
        """Keep only the rows of `keep` (a subsequence of `seqs`), in that order."""
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.clear()
            return
        pos = {id(s): i for i, s in enumerate(self.seqs)}
        sel = torch.tensor([pos[id(s)] for s in keep], device=self.device)
        for layer in layers(self.cache):
            layer.keys, layer.values = layer.keys[sel], layer.values[sel]
        self.seqs, self.mask = keep, self.mask[sel]
        self.trim()

    def trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        start = int(self.mask.any(0).long().argmax())
        if start > 0:
            for layer in layers(self.cache):
                layer.keys = layer.keys[:, :, start:].contiguous()
                layer.values = layer.values[:, :, start:].contiguous()
            self.mask = self.mask[:, start:]

    def cut(self, L: int) -> None:
        """Back to L columns (a decode that raised half-way already appended one to some layers)."""
        for layer in layers(self.cache):
            layer.keys, layer.values = layer.keys[:, :, :L], layer.values[:, :, :L]

    def row(self, i: int) -> DynamicCache:
        """Row i as a cache of its own (for running it alone)."""
        sub = DynamicCache()
        for li, layer in enumerate(layers(self.cache)):
            sub.update(layer.keys[i : i + 1], layer.values[i : i + 1], li)
        return sub

    def rebuild(self, keep: list[int], subs: list[DynamicCache], mask: torch.Tensor) -> None:
        """The batch again from the row caches `subs` of rows `keep`, with `mask` (all rows)."""
        for li, layer in enumerate(layers(self.cache)):
            layer.keys = torch.cat([s.layers[li].keys for s in subs])
            layer.values = torch.cat([s.layers[li].values for s in subs])
        self.seqs, self.mask = [self.seqs[i] for i in keep], mask[keep]


def _lpad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pad a (B, H, T, D) cache tensor with n zero positions."""
    return F.pad(t, (0, 0, n, 0)) if n else t
