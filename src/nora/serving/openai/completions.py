"""POST /v1/completions and /v1/chat/completions: from a parsed body to engine requests
(n choices, each its own row and seed), and back to a whole answer or an event stream.

OpenAI fields: n (up to `max_n` choices, batched together), seed (choice i draws from seed
+ i), logprobs / top_logprobs, presence / frequency penalty, logit_bias, stop (a string or
up to 16); echo, suffix and best_of != n are refused with a 400 naming the field.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from nora.serving.config import ServeConfig
from nora.serving.engine import Delta, OverloadedError, Request
from nora.serving.openai.errors import APIError
from nora.serving.openai.protocol import ChatCompletionRequest, CompletionRequest, parse
from nora.serving.openai.responses import EventStream, Shaper, cancel, event, usage
from nora.serving.sampling import ParamError, SamplingParams

if TYPE_CHECKING:
    from nora.serving.openai.app import API

_STATUS = {"error": 500, "timeout": 504, "cancelled": 503}  # a failed request's HTTP status


def _error_type(reason: str) -> str:
    return {"timeout": "timeout_error"}.get(reason, "server_error")


class Completions:
    """The two generation endpoints of one API (its engine, keys and limits)."""

    def __init__(self, api: API, cfg: ServeConfig):
        self.api, self.engine = api, api.engine
        self.max_tokens_limit, self.default_max_tokens = (
            cfg.max_tokens_limit,
            cfg.default_max_tokens,
        )
        self.max_prompt_tokens = cfg.max_prompt_tokens or self.engine.max_model_len - 1
        self.request_timeout, self.max_n = cfg.request_timeout, cfg.max_n

    async def completions(self, request: HTTPRequest) -> Response:
        return await self.generate(request, "completion")

    async def chat(self, request: HTTPRequest) -> Response:
        return await self.generate(request, "chat")

    # ------------------------------------------------------------------ body -> requests

    def n(self, body: CompletionRequest | ChatCompletionRequest) -> int:
        n = 1 if body.n is None else body.n
        if not 1 <= n <= self.max_n:
            raise APIError(400, f"n must be an integer in [1, {self.max_n}], got {n!r}", param="n")
        best_of = getattr(body, "best_of", None)
        if best_of is not None and best_of != n:
            raise APIError(400, f"best_of={best_of!r} is not supported (only best_of = n)",
                           param="best_of")  # fmt: skip
        return n

    def prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(body, CompletionRequest):
            prompt, param = body.prompt, "prompt"
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = self.engine.encode(prompt)
            elif prompt and all(isinstance(t, int) for t in prompt):
                ids = prompt
            else:
                raise APIError(400, "'prompt' must be a string or a list of token ids (one "
                               "prompt)", param="prompt")  # fmt: skip
        else:
            ids, param = self.engine.encode(self.chat_text(body)), "messages"
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at "
                           f"most {self.max_prompt_tokens}", param=param)  # fmt: skip
        return ids

    def chat_text(self, body: ChatCompletionRequest) -> str:
        tok = self.engine.tok
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "the base model has no chat template; use /v1/completions")
        clean = [{"role": m.role, "content": m.text()} for m in body.messages]
        return tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)

    def params(self, body: CompletionRequest | ChatCompletionRequest, n_prompt: int):
        chat = isinstance(body, ChatCompletionRequest)
        max_tokens, mt = body.max_tokens, "max_tokens"
        if chat and max_tokens is None and body.max_completion_tokens is not None:
            max_tokens, mt = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:  # OpenAI: 16 for completions; chat: what the context leaves
            room = self.engine.max_model_len - n_prompt
            max_tokens = min(self.default_max_tokens if chat else 16, room)
        elif max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens ({max_tokens}) exceeds this server's limit "
                           f"({self.max_tokens_limit})", param=mt)  # fmt: skip
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=[] if body.stop is None else body.stop,
            stop_token_ids=body.stop_token_ids or [],
            ignore_eos=bool(body.ignore_eos),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=self.bias(body.logit_bias or {}),
            logprobs=self.logprobs(body),
            timeout=self.request_timeout,
        )
        try:
            return params.check()
        except ParamError as e:
            raise APIError(400, e.msg, param=self._param(body, e.param)) from None

    def _param(self, body, param: str | None) -> str | None:
        """The body's name for a SamplingParams / Engine.submit field."""
        if param == "max_tokens" and getattr(body, "max_completion_tokens", None) is not None:
            return "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        if param == "prompt" and isinstance(body, ChatCompletionRequest):
            return "messages"
        return param

    def bias(self, bias: dict[str, float]) -> dict[int, float]:
        out = {}
        for k, v in bias.items():
            if not (k.isascii() and k.isdecimal()) or int(k) >= self.engine.vocab_size:
                raise APIError(400, f"logit_bias: {k!r} is not a token id of this model",
                               param="logit_bias")  # fmt: skip
            out[int(k)] = v
        return out

    def logprobs(self, body: CompletionRequest | ChatCompletionRequest) -> int | None:
        """Completions: logprobs = k (top k); chat: logprobs = true, top_logprobs = k."""
        if isinstance(body, CompletionRequest):
            return None if body.logprobs is None or body.logprobs is False else body.logprobs
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None

    # ------------------------------------------------------------------ the request

    async def generate(self, request: HTTPRequest, kind: str) -> Response:
        api = self.api
        tenant = api.tenant(request)
        raw = await api.body(request)
        api.admit(tenant)
        adapter = await api.adapter(raw.get("model"), tenant)
        request.state.adapter = adapter or api.base_name
        try:
            body = parse(ChatCompletionRequest if kind == "chat" else CompletionRequest, raw)
        except ParamError as e:
            raise APIError.bad(e) from None
        n = self.n(body)
        ids = self.prompt_ids(body)
        params = self.params(body, len(ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        stream, done, ended = bool(body.stream), asyncio.Event(), [0]
        reqs: list[Request] = []

        def one_ended() -> None:  # on the event loop
            ended[0] += 1
            if ended[0] == n:
                done.set()

        def on_delta(i: int, d: Delta) -> None:  # engine thread -> event loop
            if stream:
                loop.call_soon_threadsafe(queue.put_nowait, (i, d))
            elif d.finish_reason is not None:  # a full answer only needs the ends
                loop.call_soon_threadsafe(one_ended)

        try:
            for i in range(n):  # choice i: its own row, its own seed (seed + i)
                p = params if i == 0 else _with_seed(params, i)
                reqs.append(self.engine.submit(ids, adapter, p, _bind(on_delta, i)))
        except ParamError as e:  # the prompt's length against max_tokens, its token ids
            cancel(reqs)
            param = self._param(body, e.param)
            raise APIError(400, e.msg, param=param) from None
        except OverloadedError as e:
            cancel(reqs)
            raise APIError(503, str(e), "overloaded_error", retry_after=api.backoff()) from None
        request.state.reqs = reqs
        usage_ = bool(body.stream_options and body.stream_options.include_usage)
        shaper = Shaper(kind, body.model, usage_, self.engine.tok)
        if stream:
            return EventStream(reqs, self._sse(reqs, queue, shaper, request.state))
        while True:  # wait for the end, watching for a client that leaves
            try:
                await asyncio.wait_for(done.wait(), timeout=0.25)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel(reqs)
                    return Response(status_code=499)
        failed = next((r for r in reqs if r.finish_reason in _STATUS), None)
        if failed is not None:
            reason = failed.finish_reason
            raise APIError(
                _STATUS[reason], failed.error or f"the request {reason}", _error_type(reason)
            )
        return JSONResponse(shaper.full(reqs))

    async def _sse(self, reqs: list[Request], queue: asyncio.Queue, shaper: Shaper, state):
        state.status = 499  # until the stream ends: the client went away
        try:
            if shaper.kind == "chat":
                for i in range(len(reqs)):
                    yield event(shaper.chunk(i, {"role": "assistant", "content": ""}, None))
            left = len(reqs)
            while left:
                i, d = await queue.get()
                if d.finish_reason in _STATUS:
                    state.status = _STATUS[d.finish_reason]
                    err = {
                        "message": reqs[i].error or d.finish_reason,
                        "type": _error_type(d.finish_reason),
                        "code": state.status,
                    }
                    yield event({"error": err})
                    cancel(reqs)
                    break
                if d.text or d.finish_reason:
                    lp = None
                    if reqs[i].params.logprobs is not None:
                        lp = shaper.logprobs(d.logprobs, i)
                    piece = shaper.piece(d.text) if d.text else shaper.empty()
                    yield event(shaper.chunk(i, piece, d.finish_reason, lp))
                left -= d.finish_reason is not None
            else:
                state.status = 200
                if shaper.include_usage:
                    yield event({**shaper.head(), "choices": [], "usage": usage(reqs)})
            yield "data: [DONE]\n\n"
        finally:
            cancel(reqs)  # no-op once finished; frees the rows if the client went away


def _bind(fn, i):
    return lambda d: fn(i, d)


def _with_seed(params: SamplingParams, i: int) -> SamplingParams:
    return replace(params, seed=None if params.seed is None else params.seed + i)
