"""From sampled tokens to what a caller sees (vLLM's output processor): each token is
appended, detokenized (detokenize.py) and checked against the request's ends -- EOS or a
stop token (not part of the output), a stop string (cut), max_tokens, the context length --
then streamed as a Delta; the end is recorded, the adapter unpinned and waiters woken."""

from __future__ import annotations

import time
import traceback

from nora.serving.sequence import Delta, Request, SequenceState
from nora.serving.store import AdapterStore, FixedStore


class OutputProcessor:
    """Pushes tokens into requests and ends them; counts into the engine's stats."""

    def __init__(self, store: AdapterStore | FixedStore, stats, eos_ids: set[int],
                 max_model_len: int):  # fmt: skip
        self.store, self.stats = store, stats
        self.eos_ids, self.max_model_len = eos_ids, max_model_len

    def push(self, s: SequenceState, tok: int | None) -> bool:
        """Append a sampled token, stream the new text; True when the request is finished."""
        if tok is None or s.req.finished:
            return True
        try:
            return self._push(s, tok)
        except Exception as e:  # e.g. detokenising: this request fails, the batch goes on
            self.fail(s, e)
            return True

    def _push(self, s: SequenceState, tok: int) -> bool:
        r, p, now = s.req, s.req.params, time.perf_counter()
        if r.t_first is None:
            r.t_first = now
        r.token_times.append(now)
        self.stats.generated_tokens += 1
        stop_tok = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        if not stop_tok:  # a stop token is not part of the output
            r.output_ids.append(tok)
            if s.lp is not None:
                r.logprobs.append((tok, *s.lp))
        s.lp = None
        length = not stop_tok and (
            len(r.output_ids) >= p.max_tokens or s.n_cached >= self.max_model_len
        )
        text, stop_str = s.detok.step(r.output_ids, final=stop_tok or length)
        r.text = s.detok.text
        finish = "stop" if stop_tok or stop_str else "length" if length else None
        delta = Delta(text, [tok], finish)
        if delta.text or finish:
            delta.logprobs, s.lp_sent = r.logprobs[s.lp_sent :], len(r.logprobs)
        if finish:
            self.finish(s, finish, delta=delta)
        elif delta.text:
            self.emit(r, delta)
        return finish is not None

    def emit(self, r: Request, d: Delta) -> None:
        if r.on_delta is not None:
            try:
                r.on_delta(d)
            except Exception:  # a broken consumer must not stop the batch
                r.cancelled = True

    def fail(self, s: SequenceState, e: Exception) -> None:
        traceback.print_exception(e)
        self.finish(s, "error", error=f"{type(e).__name__}: {e}")

    def finish(
        self, s: SequenceState, reason: str, error: str | None = None, delta: Delta | None = None
    ) -> None:
        """Record the end, unpin the adapter, send the last Delta, then wake waiters."""
        r = s.req
        if r.finished:
            return
        r.finish_reason, r.error, r.t_done = reason, error, time.perf_counter()
        if s.pinned:
            self.store.release(r.adapter)
            s.pinned = False
        self.stats.finished += 1
        self.emit(r, delta or Delta("", [], reason))
        r.done.set()
