"""The generation engine: continuous batching of requests with different adapters.

    engine = Engine(multi, tokenizer, store)        # store: loads adapters on demand (LRU)
    engine.start()                                  # a background thread runs `step()`
    req = engine.submit("Hi", adapter="math", params=SamplingParams(max_tokens=32),
                        on_delta=print)             # streaming: one Delta per new text
    req.wait(); req.text, req.finish_reason

One running batch shares one KV cache (transformers' DynamicCache). Its rows are
right-aligned: each row's tokens end at the last column and a 2-D attention mask marks the
left padding; positions are per row. Each `step()`:
1. drops cancelled requests (their cache rows go, their adapter is unpinned);
2. admits waiting requests while there are free rows (FIFO, up to `max_prefill_tokens`
   padded prompt tokens), prefills them together in one forward (only the last position's
   logits are computed), samples their first token and merges their cache into the batch
   (left-padding the shorter side);
3. runs one decode forward for every running row (each with its own adapter, through
   MultiAdapterModel), samples, streams, and removes the rows that finished (EOS, a stop
   token, a stop string, max_tokens or the context length); leading columns that are padding
   in every remaining row are trimmed, so the cache never outgrows the longest live request.
Greedy (temperature 0) or sampled (temperature, top-k, top-p; a per-request seeded
generator, so a seed gives the same tokens whatever the batch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from nora.serving.multi import MultiAdapterModel
from nora.serving.plan import BASE_UID
from nora.serving.store import AdapterStore, StoreFullError


class OverloadedError(RuntimeError):
    """The waiting queue is full; try again later."""


@dataclass
class SamplingParams:
    """How one request decodes; `check()` raises ValueError with the reason."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def check(self) -> SamplingParams:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_num(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 16:
            raise ValueError("stop must be a non-empty string or a list of at most 16 of them")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of token ids")
        return self


@dataclass
class Delta:
    """One streaming event: new text (possibly empty), the tokens behind it, and the end."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"


_ids = itertools.count()


@dataclass(eq=False)
class Request:
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
    # engine state
    uid: int = BASE_UID
    n_cached: int = 0  # tokens of this request in the KV cache (= next position)
    _pinned: bool = False
    _gen: torch.Generator | None = None
    _prefix: int = 0  # incremental detokenisation offsets
    _read: int = 0
    _emitted: int = 0  # characters of `text` already streamed
    _cancel: bool = False
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the engine frees the row next step."""
        self._cancel = True

    def wait(self, timeout: float | None = None) -> Request:
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.id} did not finish within {timeout} s")
        return self


class Engine:
    """Continuous batching over a MultiAdapterModel; see the module docstring."""

    def __init__(
        self,
        multi: MultiAdapterModel,
        tokenizer,
        store: AdapterStore | None = None,
        max_batch: int = 16,
        max_prefill_tokens: int = 4096,
        max_model_len: int | None = None,
        max_waiting: int = 1024,
        trim_every: int = 128,
    ):
        self.multi, self.tok, self.store = multi, tokenizer, store
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.max_waiting = max_waiting
        self.trim_every = trim_every  # steps between handing freed heap pages back to the OS
        cfg = multi.model.config.get_text_config()
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        self.vocab_size = cfg.vocab_size
        gen_cfg = getattr(multi.model, "generation_config", None)
        eos = {tokenizer.eos_token_id, *_as_list(getattr(gen_cfg, "eos_token_id", None))}
        self.eos_ids = {int(t) for t in eos if t is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_id = int(pad)
        self.device = next(multi.model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # the running batch, row i of the cache
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token
        self.stats = {
            "steps": 0,
            "prefills": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "finished": 0,
            "max_running": 0,
        }
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------ public API

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tok(prompt, add_special_tokens=False)["input_ids"])
        return list(prompt)

    def submit(
        self,
        prompt: str | Sequence[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        on_delta: Callable[[Delta], None] | None = None,
    ) -> Request:
        """Queue a request; raises ValueError (with the reason) for a bad prompt or params."""
        params = (params or SamplingParams()).check()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length ({self.max_model_len})"
            )
        req = Request(ids, adapter, params, on_delta, t_submit=time.perf_counter())
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        req._gen = torch.Generator(device=self.device).manual_seed(seed)
        with self._cv:
            if len(self.waiting) >= self.max_waiting:
                raise OverloadedError(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(req)
            self._cv.notify_all()
        return req

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        adapters: Sequence[str | None] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Request]:
        """Submit all, run to completion (on the caller's thread unless started), return."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        ps = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        reqs = [self.submit(p, a, c) for p, a, c in zip(prompts, adapters, ps, strict=True)]
        if self._thread is None:
            self.run_until_idle()
        return [r.wait() for r in reqs]

    def run_until_idle(self) -> None:
        while self.step():
            pass

    @property
    def running(self) -> int:
        return len(self.rows)

    def start(self) -> Engine:
        """Run `step()` on a background thread until `stop()`."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="nora-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; unfinished requests end with finish_reason 'cancelled'."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)  # a step always ends; this only bounds a hang
            self._thread = None
        with self.multi.lock:
            for r in [*self.rows, *self.waiting]:
                self._finish(r, "cancelled", error="the server is shutting down")
            self.rows, self.cache, self.mask = [], None, None
            self.waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.rows:
                    self._cv.wait(0.5)
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # step() failed its requests already; keep serving
                traceback.print_exc()

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """One round: reap, admit + prefill, one decode; returns whether work remains."""
        with self.multi.lock, torch.inference_mode():
            self._reap()
            joiners = self._admit()
            try:
                if joiners:
                    self._prefill(joiners)
                if self.rows:
                    self._decode()
            except Exception as e:  # fail what this step touched; the engine stays usable
                for r in [*joiners, *self.rows]:
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                self.rows, self.cache, self.mask = [], None, None
                raise
            self.stats["max_running"] = max(self.stats["max_running"], len(self.rows))
            if self.trim_every and self.stats["steps"] % self.trim_every == 0:
                _trim_heap()
            return bool(self.rows or self.waiting)

    def _reap(self) -> None:
        with self._cv:
            for r in [r for r in self.waiting if r._cancel]:
                self.waiting.remove(r)
                self._finish(r, "cancelled")
        resident = {i.uid for i in self.multi.adapters.values()} | {BASE_UID}
        keep = []
        for r in self.rows:
            if r._cancel:
                self._finish(r, "cancelled")
            elif r.uid not in resident:
                self._finish(r, "error", error=f"adapter {r.adapter!r} was removed")
            else:
                keep.append(r)
        self._keep_rows(keep)

    def _admit(self) -> list[Request]:
        joiners: list[Request] = []
        longest = 0
        while self.waiting and len(self.rows) + len(joiners) < self.max_batch:
            req = self.waiting[0]
            longest2 = max(longest, len(req.prompt_ids))
            if joiners and longest2 * (len(joiners) + 1) > self.max_prefill_tokens:
                break
            if req.adapter is not None:
                try:
                    if self.store is not None:
                        req.uid, req._pinned = self.store.acquire(req.adapter), True
                    else:
                        req.uid = self.multi.uid(req.adapter)
                except StoreFullError:
                    break  # wait for a running request to release its adapter
                except Exception as e:  # unknown or invalid adapter: fail this one only
                    with self._cv:
                        self.waiting.popleft()
                    self._finish(req, "error", error=str(e))
                    continue
            with self._cv:
                self.waiting.popleft()
            joiners.append(req)
            longest = longest2
        return joiners

    def _prefill(self, joiners: list[Request]) -> None:
        n, P = len(joiners), max(len(r.prompt_ids) for r in joiners)
        ids = torch.full((n, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, P), dtype=torch.long)
        for i, r in enumerate(joiners):
            ids[i, P - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, P - len(r.prompt_ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, P) per-row positions
        cache = DynamicCache()
        out = self.multi(
            ids.to(self.device),
            row_uids=[r.uid for r in joiners],
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.stats["prefills"] += 1
        self.stats["prompt_tokens"] += sum(len(r.prompt_ids) for r in joiners)
        for r in joiners:
            r.n_cached = len(r.prompt_ids)
        toks = self._sample(joiners, out.logits[:, -1])
        alive = [
            i for i, (r, t) in enumerate(zip(joiners, toks, strict=True)) if not self._push(r, t)
        ]
        if alive:
            self._merge(cache, mask.to(self.device), [joiners[i] for i in alive], alive)

    def _decode(self) -> None:
        B = len(self.rows)
        ids = torch.tensor([[r.output_ids[-1]] for r in self.rows], device=self.device)  # (B, 1)
        pos = torch.tensor([[r.n_cached] for r in self.rows], device=self.device)  # (B, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)  # (B, L+1)
        out = self.multi(
            ids,
            row_uids=[r.uid for r in self.rows],
            attention_mask=self.mask,
            position_ids=pos,
            cache=self.cache,
            use_cache=True,
        )
        self.stats["steps"] += 1
        for r in self.rows:
            r.n_cached += 1
        toks = self._sample(self.rows, out.logits[:, -1])
        self._keep_rows([r for r, t in zip(self.rows, toks, strict=True) if not self._push(r, t)])

    # ------------------------------------------------------------------ the batch's cache

    def _layers(self, cache: DynamicCache) -> list[DynamicLayer]:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise RuntimeError(
                    f"continuous batching supports full-attention caches only, not {type(layer).__name__}"
                )
        return cache.layers

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, reqs: list[Request], idx) -> None:
        if len(idx) != mask.shape[0]:
            sel = torch.tensor(idx, device=self.device)
            for layer in self._layers(cache):
                layer.keys, layer.values = layer.keys[sel], layer.values[sel]
            mask = mask[sel]
        if not self.rows:
            self.rows, self.cache, self.mask = list(reqs), cache, mask
            self._trim()
            return
        L, P = self.mask.shape[1], mask.shape[1]
        T = max(L, P)
        for old, new in zip(self._layers(self.cache), self._layers(cache), strict=True):
            old.keys = torch.cat([_lpad(old.keys, T - L), _lpad(new.keys, T - P)])
            old.values = torch.cat([_lpad(old.values, T - L), _lpad(new.values, T - P)])
        self.mask = torch.cat([F.pad(self.mask, (T - L, 0)), F.pad(mask, (T - P, 0))])
        self.rows += reqs
        self._trim()

    def _keep_rows(self, keep: list[Request]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        pos = {id(r): i for i, r in enumerate(self.rows)}
        sel = torch.tensor([pos[id(r)] for r in keep], device=self.device)
        for layer in self._layers(self.cache):
            layer.keys, layer.values = layer.keys[sel], layer.values[sel]
        self.rows, self.mask = keep, self.mask[sel]
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        start = int(self.mask.any(0).long().argmax())
        if start > 0:
            for layer in self._layers(self.cache):
                layer.keys = layer.keys[:, :, start:].contiguous()
                layer.values = layer.values[:, :, start:].contiguous()
            self.mask = self.mask[:, start:]

    # ------------------------------------------------------------------ tokens

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """logits (n, V) -> one token per request (argmax, or a draw from its generator)."""
        toks = logits.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            if r.params.temperature > 0:
                toks[i] = _draw(logits[i], r.params, r._gen)
        return toks

    def _push(self, r: Request, tok: int) -> bool:
        """Append a sampled token, stream the new text; True when the request is finished."""
        now = time.perf_counter()
        if r.t_first is None:
            r.t_first = now
        r.token_times.append(now)
        self.stats["generated_tokens"] += 1
        p = r.params
        stop_tok = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        if not stop_tok:  # a stop token is not part of the output
            r.output_ids.append(tok)
        length = not stop_tok and (
            len(r.output_ids) >= p.max_tokens or r.n_cached >= self.max_model_len
        )
        before = len(r.text)
        self._detokenize(r, final=stop_tok or length)
        finish = "stop" if stop_tok else "length" if length else None
        hits = [i for s in p.stop if (i := r.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:  # cut at the earliest stop string; it is never part of the text
            r.text, finish = r.text[: min(hits)], "stop"
        hold = 0 if finish else max((len(s) - 1 for s in p.stop), default=0)
        safe = max(len(r.text) - hold, r._emitted)  # a stop string may still be forming
        delta = Delta(r.text[r._emitted : safe], [tok], finish)
        r._emitted = safe
        if finish:
            self._finish(r, finish, delta=delta)
        elif delta.text:
            self._emit(r, delta)
        return finish is not None

    def _detokenize(self, r: Request, final: bool = False) -> None:
        """Incremental decoding (prefix/read offsets), holding back incomplete characters."""
        ids = r.output_ids
        prefix = self.tok.decode(ids[r._prefix : r._read], skip_special_tokens=True)
        new = self.tok.decode(ids[r._prefix :], skip_special_tokens=True)
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            r.text += new[len(prefix) :]
            r._prefix, r._read = r._read, len(ids)

    def _emit(self, r: Request, d: Delta) -> None:
        if r.on_delta is not None:
            try:
                r.on_delta(d)
            except Exception:  # a broken consumer must not stop the batch
                r._cancel = True

    def _finish(
        self, r: Request, reason: str, error: str | None = None, delta: Delta | None = None
    ) -> None:
        """Record the end, unpin the adapter, send the last Delta, then wake waiters."""
        if r.finished:
            return
        r.finish_reason, r.error, r.t_done = reason, error, time.perf_counter()
        if r._pinned and self.store is not None:
            self.store.release(r.adapter)
            r._pinned = False
        self.stats["finished"] += 1
        self._emit(r, delta or Delta("", [], reason))
        r._done.set()


def _draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One token from softmax(logits / T), restricted to the top-k, then to the top-p nucleus.

    The draw is one uniform number through the inverse CDF (multinomial over 49k entries
    costs ~20x more on CPU). The nucleus is looked for among the 1024 most likely tokens and
    only falls back to a full sort when those hold less than top_p of the mass.
    """
    z = logits.float() / p.temperature  # (V,)
    idx = None
    if 0 < p.top_k < z.numel():
        z, idx = torch.topk(z, p.top_k)  # sorted, descending
    probs = torch.softmax(z, -1)
    if p.top_p < 1.0:
        if idx is None:
            probs, idx = torch.topk(probs, min(1024, probs.numel()))
            if float(probs.sum()) < p.top_p and probs.numel() < z.numel():
                probs, idx = torch.sort(torch.softmax(z, -1), descending=True)
        probs = probs * (probs.cumsum(-1) - probs < p.top_p)  # keep the smallest prefix >= p
    cdf = probs.double().cumsum(-1)
    u = torch.rand(1, generator=gen, dtype=torch.float64, device=cdf.device) * cdf[-1]
    j = int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.numel() - 1))
    return int(idx[j]) if idx is not None else j


_LIBC = ctypes.util.find_library("c")
_malloc_trim = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


def _trim_heap() -> None:
    """glibc keeps freed heap pages (the KV cache is reallocated every step, in ever new
    sizes), so RSS creeps up under churn; malloc_trim returns them. No-op elsewhere."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _lpad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pad a (B, H, T, D) cache tensor with n zero positions."""
    return F.pad(t, (0, 0, n, 0)) if n else t


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple, set)) else [v]
