"""The generation engine: continuous batching of requests with different adapters.

    engine = Engine(multi, tokenizer, store)        # store: loads adapters on demand (LRU)
    engine.start()                                  # a background thread runs `step()`
    req = engine.submit("Hi", adapter="math", params=SamplingParams(max_tokens=32),
                        on_delta=print)             # streaming: one Delta per new text
    req.wait(); req.text, req.finish_reason

One running batch shares one KV cache (kv_rows.py: right-aligned rows, a 2-D attention mask,
per-row positions). Each `step()`:
1. drops cancelled and late requests (their cache rows go, their adapter is unpinned);
2. admits waiting requests (scheduler.py), prefills them together in one forward (only the
   last position's logits are computed), samples their first token and merges their cache
   into the batch;
3. runs one decode forward for every running row (each with its own adapter, through
   MultiAdapterModel), samples (sampling.py), and hands each token to the output processor
   (output.py: detokenize, stop checks, stream, finish); finished rows leave the batch.

Without a store, the engine serves the adapters already added to `multi` (a FixedStore).
Faults stay local: a prefill or decode forward that raises is retried row by row (the
batch's cache is first cut back to its length before the step), so only the requests that
fail alone end with finish_reason "error"; sampling and detokenising are guarded per request
too. A request past its deadline ends with "timeout".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from nora.serving.detokenize import IncrementalDetokenizer
from nora.serving.kv_rows import KVRows
from nora.serving.multi import MultiAdapterModel
from nora.serving.output import OutputProcessor
from nora.serving.plan import BASE_UID
from nora.serving.sampling import ParamError, Sampler, SamplingParams
from nora.serving.scheduler import OverloadedError, Scheduler
from nora.serving.sequence import Delta, Request, SequenceState
from nora.serving.store import AdapterStore, FixedStore

__all__ = ["Delta", "Engine", "EngineStats", "OverloadedError", "Request", "SamplingParams"]


@dataclass
class EngineStats:
    """The engine's counters (GET /health shows them to admin keys, as `to_dict()`)."""

    steps: int = 0  # decode steps
    prefills: int = 0  # prefill forwards
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0  # requests ended, for any reason
    max_running: int = 0  # most rows the batch held after a step

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Engine:
    """Continuous batching over a MultiAdapterModel; see the module docstring."""

    def __init__(
        self,
        multi: MultiAdapterModel,
        tokenizer,
        store: AdapterStore | FixedStore | None = None,
        max_batch: int = 16,
        max_prefill_tokens: int = 4096,
        max_model_len: int | None = None,
        max_waiting: int = 1024,
        trim_every: int = 128,
    ):
        self.multi, self.tok = multi, tokenizer
        self.store = store if store is not None else FixedStore(multi)
        self.max_batch, self.trim_every = max_batch, trim_every  # trim: steps between heap trims
        cfg = multi.model.config.get_text_config()
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        self.vocab_size = cfg.vocab_size
        gen_cfg = getattr(multi.model, "generation_config", None)
        eos = {tokenizer.eos_token_id, *_as_list(getattr(gen_cfg, "eos_token_id", None))}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_id = int(pad)
        self.device = next(multi.model.parameters()).device
        self.stats = EngineStats()
        self.output = OutputProcessor(
            self.store, self.stats, {int(t) for t in eos if t is not None}, self.max_model_len
        )
        self.scheduler = Scheduler(
            self.store, self.output.finish, max_batch, max_prefill_tokens, max_waiting
        )
        self.batch: KVRows[SequenceState] = KVRows(self.device)  # the running rows
        self.sampler = Sampler()
        self.on_step: Callable[[int], None] | None = None  # after each decode: running rows
        self.worker: Worker | None = None

    # ------------------------------------------------------------------ state

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def rows(self) -> list[Request]:
        """The running requests; row i of `cache`."""
        return [s.req for s in self.batch.seqs]

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def cache(self) -> DynamicCache | None:
        return self.batch.cache

    @property
    def mask(self) -> torch.Tensor | None:
        return self.batch.mask

    @property
    def alive(self) -> bool:
        """A background thread is running `step()`."""
        return self.worker is not None and self.worker.is_alive()

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.batch.seqs)

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
        """Queue a request; raises ParamError (a ValueError naming the field: `prompt`,
        `max_tokens` or a sampling parameter) for a bad request, OverloadedError when the
        queue is full."""
        params = (params or SamplingParams()).check()
        ids = self.encode(prompt)
        _check_prompt(ids, params, self.vocab_size, self.max_model_len)
        req = Request(ids, adapter, params, on_delta, t_submit=time.perf_counter())
        if params.timeout is not None:
            req.deadline = req.t_submit + params.timeout
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.scheduler.add(SequenceState(req, gen, IncrementalDetokenizer(self.tok, params.stop)))
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
        if self.worker is None:
            self.run_until_idle()
        return [r.wait() for r in reqs]

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def start(self) -> Engine:
        """Run `step()` on a background thread until `stop()`."""
        if self.worker is None:
            self.worker = Worker(self)
            self.worker.start()
        return self

    def stop(self) -> None:
        """Stop the thread; unfinished requests end with finish_reason 'cancelled'."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        with self.multi.lock:
            for s in [*self.batch.seqs, *self.scheduler.drain()]:
                self.output.finish(s, "cancelled", error="the server is shutting down")
            self.batch.clear()

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """One round: reap, admit + prefill, one decode; returns whether work remains."""
        with self.multi.lock, torch.inference_mode():
            resident = {i.uid for i in self.multi.adapters.values()} | {BASE_UID}
            now = time.perf_counter()
            self.batch.keep(self.scheduler.reap(self.batch.seqs, resident, now))
            joiners = self.scheduler.admit(len(self.batch))
            try:
                if joiners:
                    self._prefill(joiners)
                if self.batch.seqs:
                    self._decode()
            except Exception as e:  # fail what this step touched; the engine stays usable
                for s in [*joiners, *self.batch.seqs]:
                    self.output.finish(s, "error", error=f"{type(e).__name__}: {e}")
                self.batch.clear()
                raise
            self.stats.max_running = max(self.stats.max_running, len(self.batch))
            if self.trim_every and self.stats.steps % self.trim_every == 0:
                _trim_heap()
            return self.has_work()

    def _prefill(self, joiners: list[SequenceState]) -> None:
        try:
            cache, mask, logits = self._prefill_forward(joiners)
        except Exception as e:  # retry each alone: only the requests that fail alone fail
            if len(joiners) > 1:
                for s in joiners:
                    self._prefill([s])
            else:
                self.output.fail(joiners[0], e)
            return
        self.stats.prefills += 1
        self.stats.prompt_tokens += sum(len(s.req.prompt_ids) for s in joiners)
        for s in joiners:
            s.n_cached = len(s.req.prompt_ids)
        toks = self.sampler.next_tokens(joiners, logits, self.output.fail)
        push = self.output.push
        alive = [i for i, (s, t) in enumerate(zip(joiners, toks, strict=True)) if not push(s, t)]
        if alive:
            self.batch.merge(cache, mask, [joiners[i] for i in alive], alive)

    def _prefill_forward(self, joiners: list[SequenceState]):
        n, P = len(joiners), max(len(s.req.prompt_ids) for s in joiners)
        ids = torch.full((n, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, P), dtype=torch.long)
        for i, s in enumerate(joiners):
            ids[i, P - len(s.req.prompt_ids) :] = torch.tensor(s.req.prompt_ids)
            mask[i, P - len(s.req.prompt_ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, P) per-row positions
        cache = DynamicCache()
        out = self.multi(
            ids.to(self.device),
            row_uids=[s.uid for s in joiners],
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, mask.to(self.device), out.logits[:, -1]

    def _decode(self) -> None:
        seqs, B, L = self.batch.seqs, len(self.batch), self.batch.mask.shape[1]
        ids = torch.tensor([[s.req.output_ids[-1]] for s in seqs], device=self.device)  # (B, 1)
        pos = torch.tensor([[s.n_cached] for s in seqs], device=self.device)  # (B, 1)
        mask = torch.cat([self.batch.mask, self.batch.mask.new_ones(B, 1)], dim=1)  # (B, L+1)
        try:
            logits = self._forward_rows(ids, pos, mask, self.batch.cache, seqs)  # (B, V)
            self.batch.mask = mask
        except Exception as e:
            if B == 1:
                raise
            logits = self._decode_alone(ids, pos, mask, L, e)
        self.stats.steps += 1
        if self.on_step is not None:  # before any request of this step can finish
            self.on_step(B)
        seqs = self.batch.seqs
        for s in seqs:
            s.n_cached += 1
        toks = self.sampler.next_tokens(seqs, logits, self.output.fail)
        push = self.output.push
        self.batch.keep([s for s, t in zip(seqs, toks, strict=True) if not push(s, t)])

    def _forward_rows(self, ids, pos, mask, cache, seqs) -> torch.Tensor:
        out = self.multi(ids, row_uids=[s.uid for s in seqs], attention_mask=mask,
                         position_ids=pos, cache=cache, use_cache=True)  # fmt: skip
        return out.logits[:, -1]

    def _decode_alone(self, ids, pos, mask, L: int, err: Exception) -> torch.Tensor:
        """The batched decode raised: cut the cache back to L columns, run each row alone,
        fail the rows that raise alone and rebuild the cache from the others. Returns the
        survivors' logits."""
        self.batch.cut(L)
        keep, logits, subs = [], [], []
        for i, s in enumerate(self.batch.seqs):
            sub, one = self.batch.row(i), slice(i, i + 1)
            try:
                logits.append(self._forward_rows(ids[one], pos[one], mask[one], sub, [s]))
            except Exception as e:
                self.output.fail(s, e)
                continue
            keep.append(i)
            subs.append(sub)
        if not keep:
            self.batch.clear()
            raise err
        self.batch.rebuild(keep, subs, mask)
        return torch.cat(logits)


class Worker(threading.Thread):
    """The engine's background thread: `step()` while there is work, until `stop()`."""

    def __init__(self, engine: Engine):
        super().__init__(name="nora-engine", daemon=True)
        self.engine, self.stopping = engine, False

    def run(self) -> None:
        e, cv = self.engine, self.engine.scheduler.cv
        while True:
            with cv:
                while not self.stopping and not e.has_work():
                    cv.wait(0.5)
                if self.stopping:
                    return
            try:
                e.step()
            except Exception:  # step() failed its requests already; keep serving
                traceback.print_exc()
            # Python locks are not fair: without a pause here this thread takes multi.lock
            # back at once, and a load/unload waiting for it (a request for an adapter that
            # is not resident) could wait until the whole batch has drained.
            time.sleep(0)

    def stop(self) -> None:
        with self.engine.scheduler.cv:
            self.stopping = True
            self.engine.scheduler.cv.notify_all()
        self.join(timeout=60)  # a step always ends; this only bounds a hang


_LIBC = ctypes.util.find_library("c")
_malloc_trim = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


def _trim_heap() -> None:
    """glibc keeps freed heap pages (the KV cache is reallocated every step, in ever new
    sizes), so RSS creeps up under churn; malloc_trim returns them. No-op elsewhere."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _check_prompt(ids: list[int], params: SamplingParams, vocab: int, max_len: int) -> None:
    """A ParamError naming `prompt` or `max_tokens` for a request the model cannot run."""
    if not ids:
        raise ParamError("prompt", "the prompt is empty")
    if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
        raise ParamError("prompt", f"prompt token ids must be integers in [0, {vocab})")
    if len(ids) + params.max_tokens > max_len:
        raise ParamError("max_tokens", f"prompt ({len(ids)} tokens) + max_tokens "
                         f"({params.max_tokens}) exceeds the context length ({max_len})")  # fmt: skip


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple, set)) else [v]
