"""The waiting queue and admission (vLLM's scheduler, reduced to what one batch needs).

Requests wait in FIFO order; each step admits the head of the queue while the batch has
free rows and the joiners' padded prompt tokens stay within `max_prefill_tokens`. A
request's adapter is pinned in the store when it is admitted (loaded first if needed); when
no slot is free (StoreFullError) admission waits for a running request to release one.
Cancelled and late requests leave the queue (and the batch) at the start of a step.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from nora.serving.sequence import SequenceState
from nora.serving.store import AdapterStore, FixedStore, StoreFullError

Finish = Callable[..., None]  # Engine.finish(seq, reason, error=...)


class OverloadedError(RuntimeError):
    """The waiting queue is full; try again later."""


class Scheduler:
    """What waits and what joins the batch next; `cv` guards `waiting` and wakes the worker."""

    def __init__(self, store: AdapterStore | FixedStore, finish: Finish, max_batch: int,
                 max_prefill_tokens: int, max_waiting: int):  # fmt: skip
        self.store, self.finish = store, finish
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[SequenceState] = deque()
        self.cv = threading.Condition()

    def add(self, s: SequenceState) -> None:
        with self.cv:
            if len(self.waiting) >= self.max_waiting:
                raise OverloadedError(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(s)
            self.cv.notify_all()

    def reap(self, running: list[SequenceState], resident: set[int], now: float):
        """End cancelled and late requests (waiting or running) and running ones whose
        adapter was removed; returns the running ones that go on."""
        with self.cv:
            for s in [s for s in self.waiting if s.req.cancelled or s.req.late(now)]:
                self.waiting.remove(s)
                self._end_early(s)
        keep = []
        for s in running:
            if s.req.cancelled or s.req.late(now):
                self._end_early(s)
            elif s.uid not in resident:
                self.finish(s, "error", error=f"adapter {s.req.adapter!r} was removed")
            else:
                keep.append(s)
        return keep

    def _end_early(self, s: SequenceState) -> None:
        if s.req.cancelled:
            self.finish(s, "cancelled")
        else:
            limit = s.req.params.timeout
            self.finish(s, "timeout", error=f"the request exceeded its {limit:g} s limit")

    def admit(self, n_running: int) -> list[SequenceState]:
        """Take the requests that join the batch now, their adapters pinned."""
        joiners: list[SequenceState] = []
        longest = 0
        while self.waiting and n_running + len(joiners) < self.max_batch:
            s = self.waiting[0]
            longest2 = max(longest, len(s.req.prompt_ids))
            if joiners and longest2 * (len(joiners) + 1) > self.max_prefill_tokens:
                break
            if s.req.adapter is not None:
                try:
                    s.uid, s.pinned = self.store.acquire(s.req.adapter), True
                except StoreFullError:
                    break  # wait for a running request to release its adapter
                except Exception as e:  # unknown or invalid adapter: fail this one only
                    with self.cv:
                        self.waiting.popleft()
                    self.finish(s, "error", error=str(e))
                    continue
            with self.cv:
                self.waiting.popleft()
            joiners.append(s)
            longest = longest2
        return joiners

    def drain(self) -> list[SequenceState]:
        """Empty the queue; returns what was waiting."""
        with self.cv:
            out = list(self.waiting)
            self.waiting.clear()
            return out
