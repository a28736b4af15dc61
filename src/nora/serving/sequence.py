"""A request and its state in the engine (vLLM's sequence.py).

A `Request` is the caller's handle: what was asked and, written by the engine, the answer
so far; `cancel()` and `wait()` are all a caller does with it. The engine's own per-request
state (cache length, adapter pin, generator, detokenizer) is a `SequenceState`, which never
leaves the engine's modules. A `Delta` is one streaming event.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nora.serving.detokenize import IncrementalDetokenizer
from nora.serving.plan import BASE_UID
from nora.serving.sampling import SamplingParams, TokenLogprobs


@dataclass
class Delta:
    """One streaming event: new text (possibly empty), the tokens behind it, and the end."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | "timeout"
    logprobs: list[tuple] = field(default_factory=list)  # Request.logprobs entries since the last


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One submitted request: what was asked, and the answer so far (written by the engine)."""

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_delta: Callable[[Delta], None] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None  # first token sampled
    t_done: float | None = None
    token_times: list[float] = field(default_factory=list)
    # (token id, logprob, [(id, logprob) of the top k]) per output token, when asked for
    logprobs: list[tuple] = field(default_factory=list)
    deadline: float | None = None
    cancelled: bool = False  # asked to stop (cancel()); the engine ends it next step
    done: threading.Event = field(default_factory=threading.Event, repr=False)  # set at the end

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the engine frees the row next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Request:
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.id} did not finish within {timeout} s")
        return self

    def late(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass(eq=False)
class SequenceState:
    """The engine's state of one request, from submission to its end."""

    req: Request
    gen: torch.Generator  # the request's sampling generator (seeded: reproducible)
    detok: IncrementalDetokenizer
    uid: int = BASE_UID  # the adapter's uid in MultiAdapterModel
    n_cached: int = 0  # tokens of this request in the KV cache (= next position)
    pinned: bool = False  # holds a pin on its adapter in the store
    lp: TokenLogprobs | None = None  # the last sampled token's logprobs, until pushed
    lp_sent: int = 0  # Request.logprobs entries already streamed
