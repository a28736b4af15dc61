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
generator, so a seed gives the same tokens whatever the batch). Before either, OpenAI's
presence / frequency penalties (over the tokens generated so far) and a logit bias; on
request, each token's log-probability and the top alternatives under the model's own
distribution (before penalties and temperature, as vLLM reports them).

Faults stay local: a prefill or decode forward that raises is retried row by row (the
batch's cache is first cut back to its length before the step), so only the requests that
fail alone end with finish_reason "error"; sampling and detokenising are guarded per request
too. A request past its deadline ends with "timeout".
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
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0) + frequency * count
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: off; k: the sampled token's logprob + the top k
    timeout: float | None = None  # seconds from submission; then finish_reason "timeout"

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
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**63 - 2**16):
            # torch generators take 64-bit seeds; choice i of n uses seed + i
            raise ValueError(f"seed must be an integer in [0, 2**63 - 2**16), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 16:
            raise ValueError("stop must be a non-empty string or a list of at most 16 of them")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of token ids")
        for k in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, k)
            if not is_num(v) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{k} must be a number in [-2, 2], got {v!r}")
        if not isinstance(self.logit_bias, dict) or not all(
            is_int(t) and t >= 0 and is_num(b) and -100 <= b <= 100
            for t, b in self.logit_bias.items()
        ):
            raise ValueError("logit_bias must map token ids to numbers in [-100, 100]")
        if self.logprobs is not None and (
            not is_int(self.logprobs) or not 0 <= self.logprobs <= 20
        ):
            raise ValueError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.timeout is not None and (not is_num(self.timeout) or self.timeout <= 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout!r}")
        return self

    @property
    def shapes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


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
    # engine state
    uid: int = BASE_UID
    n_cached: int = 0  # tokens of this request in the KV cache (= next position)
    _pinned: bool = False
    _gen: torch.Generator | None = None
    _prefix: int = 0  # incremental detokenisation offsets
    _read: int = 0
    _emitted: int = 0  # characters of `text` already streamed
    _lp_sent: int = 0  # logprobs entries already streamed
    _lp: tuple | None = None  # the last sampled token's (logprob, top k)
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
        self.on_step: Callable[[int], None] | None = None  # after each decode: running rows
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
        if params.timeout is not None:
            req.deadline = req.t_submit + params.timeout
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
            # Python locks are not fair: without a pause here this thread takes multi.lock
            # back at once, and a load/unload waiting for it (a request for an adapter that
            # is not resident) could wait until the whole batch has drained.
            time.sleep(0)

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
        now = time.perf_counter()

        def late(r):
            return r.deadline is not None and now > r.deadline

        with self._cv:
            for r in [r for r in self.waiting if r._cancel or late(r)]:
                self.waiting.remove(r)
                if r._cancel:
                    self._finish(r, "cancelled")
                else:
                    self._timeout(r)
        resident = {i.uid for i in self.multi.adapters.values()} | {BASE_UID}
        keep = []
        for r in self.rows:
            if r._cancel:
                self._finish(r, "cancelled")
            elif late(r):
                self._timeout(r)
            elif r.uid not in resident:
                self._finish(r, "error", error=f"adapter {r.adapter!r} was removed")
            else:
                keep.append(r)
        self._keep_rows(keep)

    def _timeout(self, r: Request) -> None:
        self._finish(r, "timeout", error=f"the request exceeded its {r.params.timeout:g} s limit")

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
        try:
            cache, mask, logits = self._prefill_forward(joiners)
        except Exception as e:  # retry each alone: only the requests that fail alone fail
            if len(joiners) > 1:
                for r in joiners:
                    self._prefill([r])
            else:
                self._fail(joiners[0], e)
            return
        self.stats["prefills"] += 1
        self.stats["prompt_tokens"] += sum(len(r.prompt_ids) for r in joiners)
        for r in joiners:
            r.n_cached = len(r.prompt_ids)
        toks = self._sample(joiners, logits)
        alive = [
            i for i, (r, t) in enumerate(zip(joiners, toks, strict=True)) if not self._push(r, t)
        ]
        if alive:
            self._merge(cache, mask, [joiners[i] for i in alive], alive)

    def _prefill_forward(self, joiners: list[Request]):
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
        return cache, mask.to(self.device), out.logits[:, -1]

    def _decode(self) -> None:
        B, L = len(self.rows), self.mask.shape[1]
        ids = torch.tensor([[r.output_ids[-1]] for r in self.rows], device=self.device)  # (B, 1)
        pos = torch.tensor([[r.n_cached] for r in self.rows], device=self.device)  # (B, 1)
        mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)  # (B, L+1)
        try:
            logits = self._forward_rows(ids, pos, mask, self.cache, self.rows)  # (B, V)
            self.mask = mask
        except Exception as e:
            if B == 1:
                raise
            logits = self._decode_alone(ids, pos, mask, L, e)
        self.stats["steps"] += 1
        if self.on_step is not None:  # before any request of this step can finish
            self.on_step(B)
        for r in self.rows:
            r.n_cached += 1
        toks = self._sample(self.rows, logits)
        self._keep_rows([r for r, t in zip(self.rows, toks, strict=True) if not self._push(r, t)])

    def _forward_rows(self, ids, pos, mask, cache, rows) -> torch.Tensor:
        out = self.multi(
            ids,
            row_uids=[r.uid for r in rows],
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _decode_alone(self, ids, pos, mask, L: int, err: Exception) -> torch.Tensor:
        """The batched decode raised: cut the cache back to L columns (layers before the
        failure already appended one), run each row alone, fail the rows that raise alone
        and rebuild the cache from the others. Returns the survivors' logits."""
        for layer in self._layers(self.cache):
            layer.keys, layer.values = layer.keys[:, :, :L], layer.values[:, :, :L]
        keep, logits, subs = [], [], []
        for i, r in enumerate(self.rows):
            sub = DynamicCache()
            for li, layer in enumerate(self._layers(self.cache)):
                sub.update(layer.keys[i : i + 1], layer.values[i : i + 1], li)
            try:
                logits.append(
                    self._forward_rows(ids[i : i + 1], pos[i : i + 1], mask[i : i + 1], sub, [r])
                )
            except Exception as e:
                self._fail(r, e)
                continue
            keep.append(i)
            subs.append(sub)
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            raise err
        for li, layer in enumerate(self._layers(self.cache)):
            layer.keys = torch.cat([s.layers[li].keys for s in subs])
            layer.values = torch.cat([s.layers[li].values for s in subs])
        self.rows, self.mask = [self.rows[i] for i in keep], mask[keep]
        return torch.cat(logits)

    def _fail(self, r: Request, e: Exception) -> None:
        traceback.print_exception(e)
        self._finish(r, "error", error=f"{type(e).__name__}: {e}")

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

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int | None]:
        """logits (n, V) -> one token per request (argmax, or a draw from its generator);
        None for a request that failed here (it is finished with the error)."""
        toks: list[int | None] = logits.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            p = r.params
            if not (p.temperature > 0 or p.shapes_logits or p.logprobs is not None):
                continue
            try:
                z = self._shape(r, logits[i].float())
                toks[i] = _draw(z, p, r._gen) if p.temperature > 0 else int(z.argmax())
                if p.logprobs is not None:
                    lp = torch.log_softmax(logits[i].float(), -1)  # the model's distribution
                    top = torch.topk(lp, p.logprobs) if p.logprobs else None
                    alts = (
                        list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                        if top
                        else []
                    )
                    r._lp = (float(lp[toks[i]]), alts)
            except Exception as e:
                self._fail(r, e)
                toks[i] = None
        return toks

    def _shape(self, r: Request, z: torch.Tensor) -> torch.Tensor:
        """Penalties over the tokens generated so far, then the logit bias (OpenAI's rules)."""
        p = r.params
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            ids = torch.tensor(r.output_ids, device=z.device)
            counts = torch.bincount(ids, minlength=z.numel())[: z.numel()].to(z.dtype)  # (V,)
            z = z - counts * p.frequency_penalty - (counts > 0).to(z.dtype) * p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < z.numel()], dtype=torch.long)
            bias = torch.tensor([p.logit_bias[int(t)] for t in ids], dtype=z.dtype)
            z = z.index_add(0, ids.to(z.device), bias.to(z.device))
        return z

    def _push(self, r: Request, tok: int | None) -> bool:
        """Append a sampled token, stream the new text; True when the request is finished."""
        if tok is None or r.finished:
            return True
        try:
            return self._push_token(r, tok)
        except Exception as e:  # e.g. detokenising: this request fails, the batch goes on
            self._fail(r, e)
            return True

    def _push_token(self, r: Request, tok: int) -> bool:
        now = time.perf_counter()
        if r.t_first is None:
            r.t_first = now
        r.token_times.append(now)
        self.stats["generated_tokens"] += 1
        p = r.params
        stop_tok = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        if not stop_tok:  # a stop token is not part of the output
            r.output_ids.append(tok)
            if r._lp is not None:
                r.logprobs.append((tok, *r._lp))
        r._lp = None
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
        if delta.text or finish:
            delta.logprobs, r._lp_sent = r.logprobs[r._lp_sent :], len(r.logprobs)
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
