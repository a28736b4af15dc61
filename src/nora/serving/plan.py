"""Per-step batch metadata for the multi-adapter forward, built once and read by every layer.

Every token of a step carries an adapter uid (0 = the base model, no adapter). Tokens are
stable-sorted by uid; `unique_consecutive` + `cumsum` turn the sorted uids into segments
(one per adapter); segments are grouped by their adapter's *kind* (the latent non-linearity:
adapters of one kind share one batched shrink → activation → expand). For each group the plan
holds the index tensors a layer needs:

    rows     (M,)     token indices of the group, segment-major (sorted by uid)
    gather   (n·L,)   token index for each slot of the padded (n, L) layout (None: = rows)
    valid    (M,)     positions of the real slots in that layout (None: no padding)

where n = number of segments, L = the longest segment. Layers never sort or count anything.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

BASE_UID = 0  # the uid of "no adapter"


@dataclass
class Segments:
    """The segments of one kind at one step; see the module docstring for the tensors."""

    uids: tuple[int, ...]  # adapter uid of each segment
    counts: tuple[int, ...]  # tokens per segment
    rows: torch.Tensor  # (M,) long
    n_tokens: int  # N: tokens in the whole step
    all_rows: bool = False  # one segment holding every token in natural order: no gather/scatter
    L: int = 0
    gather: torch.Tensor | None = None  # (n·L,)
    valid: torch.Tensor | None = None  # (M,)
    loop: bool = False  # padding would waste too much: run segment by segment
    starts: tuple[int, ...] = ()  # offsets of each segment within `rows`
    _subsets: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, uids: list[int], counts: list[int], rows: torch.Tensor, n_tokens: int
    ) -> Segments:
        n, M, L = len(uids), int(rows.numel()), max(counts)
        starts, s = [], 0
        for c in counts:
            starts.append(s)
            s += c
        seg = cls(tuple(uids), tuple(counts), rows, n_tokens, L=L, starts=tuple(starts))
        if n == 1:
            seg.all_rows = M == n_tokens  # a stable sort of one uid keeps the natural order
            return seg
        if n * L > 2 * M + 64:  # e.g. one long prompt and many one-token rows
            seg.loop = True
            return seg
        if any(c != L for c in counts):
            pos = torch.cat([torch.arange(c) + i * L for i, c in enumerate(counts)])  # (M,)
            gather = torch.zeros(n * L, dtype=torch.long, device=rows.device)
            pos = pos.to(rows.device)
            gather[pos] = rows
            seg.gather, seg.valid = gather, pos
        return seg

    def subset(self, keep: tuple[bool, ...]) -> Segments | None:
        """The segments whose flag is set (adapters that target a given layer); memoised."""
        if all(keep):
            return self
        if keep not in self._subsets:
            idx = [i for i, k in enumerate(keep) if k]
            if not idx:
                self._subsets[keep] = None
            else:
                rows = torch.cat(
                    [self.rows[self.starts[i] : self.starts[i] + self.counts[i]] for i in idx]
                )
                self._subsets[keep] = Segments.build(
                    [self.uids[i] for i in idx], [self.counts[i] for i in idx], rows, self.n_tokens
                )
        return self._subsets[keep]


@dataclass
class BatchPlan:
    """kind -> Segments for one forward step."""

    groups: dict[Hashable, Segments]
    n_tokens: int

    @classmethod
    def build(cls, token_uids: torch.Tensor, kind_of: dict[int, Hashable]) -> BatchPlan:
        """token_uids: (N,) adapter uid of every token (flattened batch × time)."""
        token_uids = token_uids.reshape(-1)
        N = int(token_uids.numel())
        order = torch.argsort(token_uids, stable=True)  # (N,)
        uniq, counts = torch.unique_consecutive(token_uids[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        by_kind: dict[Hashable, list[tuple[int, int, int]]] = {}
        for u, s, c in zip(uniq.tolist(), starts.tolist(), counts.tolist(), strict=True):
            if u != BASE_UID:
                by_kind.setdefault(kind_of[u], []).append((u, s, c))
        groups = {}
        for kind, segs in by_kind.items():
            rows = torch.cat([order[s : s + c] for _, s, c in segs]) if len(segs) > 1 else None
            if rows is None:
                _, s, c = segs[0]
                rows = order[s : s + c]
            groups[kind] = Segments.build([u for u, _, _ in segs], [c for _, _, c in segs], rows, N)
        return cls(groups, N)
