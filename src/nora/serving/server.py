"""An OpenAI-compatible HTTP server over the engine (Starlette + uvicorn).

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "stream", ...}
    POST /v1/chat/completions   {"model", "messages", ...}            (stream: server-sent events)
    GET  /v1/models             the base model and every adapter ("loaded": resident or not)
    GET  /health                status (resident adapters and counters: admin keys only)
    GET  /metrics               Prometheus text format (admin keys only, when keys are set)
    POST /v1/adapters/load      {"name"}   make an adapter of the directory resident (validated)
    POST /v1/adapters/unload    {"name"}   drop it (409 while requests use it)

`model` is an adapter name (a folder of the adapter directory) or the base model's name.
Concurrent requests are batched together by the engine whatever their adapters. Errors are
OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON,
bad or unsupported fields, invalid adapter names, oversize prompts or max_tokens, or an
adapter that does not fit the base (the mismatch named); 401 for a missing or unknown API
key; 403 for loading / unloading without the right; 404 for an unknown model (with the
names this key may use) -- and for another tenant's adapter, word for word; 409 for
unloading an adapter in use; 413 for an oversize body; 429 past a key's rate limit and 503
when the waiting queue is full, no adapter slot is free or the server is draining (both
with `Retry-After`; for a full queue, the time the queue ahead takes to drain at the recent
completion rate); 500 for a generation that failed (that request only); 504 past the
per-request time limit. A client that disconnects cancels its request, which frees its row.

With keys (tenants.py), every endpoint but /health needs `Authorization: Bearer <key>`.
OpenAI fields: n (up to `max_n` choices, batched together), seed (choice i draws from seed
+ i), logprobs / top_logprobs, presence / frequency penalty, logit_bias, stop (a string or
up to 16); echo, suffix and best_of != n are refused with a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from nora.checkpoint import CheckpointError
from nora.serving.engine import Delta, Engine, OverloadedError, Request, SamplingParams
from nora.serving.metrics import CONTENT_TYPE, Metrics
from nora.serving.multi import UnknownAdapterError
from nora.serving.store import AdapterBusyError, AdapterNameError, StoreFullError, check_name
from nora.serving.tenants import OPEN, Keys, Tenant, bearer, exposure_warning, load_keys

log = logging.getLogger("nora.serve")

# Fields accepted with any value, and fields accepted only with their no-op value.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}
_COMMON |= {"stream_options", "user", "ignore_eos", "stop_token_ids", "n", "presence_penalty"}
_COMMON |= {"frequency_penalty", "logit_bias", "logprobs"}
_FIELDS = {
    "completion": _COMMON | {"prompt", "echo", "best_of", "suffix"},
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
}
_NOOP = {
    "echo": (False, None),
    "suffix": (None, ""),
}
_STATUS = {"error": 500, "timeout": 504, "cancelled": 503}  # a failed request's HTTP status


def _error_type(reason: str) -> str:
    return {"timeout": "timeout_error"}.get(reason, "server_error")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param=None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        body = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.status,
        }
        headers = None
        if self.retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))}
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def _unauthorized() -> APIError:
    return APIError(
        401, "a valid API key is required (Authorization: Bearer <key>)", "authentication_error"
    )


class API:
    """The request handlers, bound to one engine (and its store)."""

    def __init__(
        self,
        engine: Engine,
        base_name: str,
        max_tokens_limit: int = 1024,
        default_max_tokens: int = 256,
        max_prompt_tokens: int | None = None,
        max_body_bytes: int = 1 << 20,
        keys: Keys | None = None,
        request_timeout: float | None = None,
        max_n: int = 16,
        retry_after: float = 1.0,
    ):
        self.engine, self.store, self.base_name = engine, engine.store, base_name
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.max_prompt_tokens = max_prompt_tokens or engine.max_model_len - 1
        self.max_body_bytes = max_body_bytes
        self.keys, self.request_timeout, self.max_n = keys, request_timeout, max_n
        self.retry_after = retry_after
        self.draining = False  # set on SIGTERM: new requests get 503
        self.metrics = Metrics(engine)
        self.created = int(time.time())

    # ------------------------------------------------------------------ who is asking

    def tenant(self, request: HTTPRequest) -> Tenant:
        """The caller's tenant (OPEN without keys); 401 for a missing or unknown key."""
        if self.keys is None:
            return OPEN
        tenant = self.keys.lookup(bearer(request.headers))
        if tenant is None:
            host = request.client.host if request.client else "?"
            log.warning("refused a request to %s from %s: missing or unknown API key",
                        request.url.path, host)  # fmt: skip
            raise _unauthorized()
        return tenant

    def backoff(self) -> float:
        """Retry-After for a full queue: the requests ahead over the recent completion rate
        (at least `retry_after`, at most 60 s), so that clients back off as much as needed."""
        rate = self.metrics.finished_per_second()
        if rate <= 0:
            return self.retry_after
        return min(60.0, max(self.retry_after, (len(self.engine.waiting) + 1) / rate))

    def admit(self, tenant: Tenant, n: int = 1) -> None:
        """Draining and per-key rate limits, before any work is done for a request."""
        if self.draining:
            raise APIError(503, "the server is shutting down", "overloaded_error",
                           retry_after=self.retry_after)  # fmt: skip
        wait = tenant.take(n)
        if wait > 0:
            raise APIError(429, f"rate limit of {tenant.rate:g} requests/s exceeded for this "
                           "key", "rate_limit_error", retry_after=wait)  # fmt: skip

    # ------------------------------------------------------------------ helpers

    async def _body(self, request: HTTPRequest) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise APIError(413, f"request body exceeds {self.max_body_bytes} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise APIError(413, f"request body exceeds {self.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object")
        return body

    def known(self, tenant: Tenant = OPEN) -> list[str]:
        """The model names `tenant` may use: the base (if allowed), then its adapters."""
        names = self.store.available() if self.store else sorted(self.engine.multi.adapters)
        base = [self.base_name] if tenant.base or tenant.admin else []
        return base + [n for n in names if tenant.may_use(n)]

    def _missing(self, name: str, tenant: Tenant, param: str) -> APIError:
        """The 404 for a model that does not exist -- or that this key may not see."""
        return APIError(404, _unknown(name, self.known(tenant)), "not_found_error", param)

    async def _adapter(self, model: Any, tenant: Tenant = OPEN) -> str | None:
        """The adapter a `model` field names (None: the base); loads it, validated."""
        if not isinstance(model, str) or not model:
            raise APIError(
                400, "'model' is required: an adapter name or the base model", param="model"
            )
        if model == self.base_name:
            if not (tenant.base or tenant.admin):
                raise self._missing(model, tenant, "model")
            return None
        try:
            check_name(model)
        except AdapterNameError as e:
            raise APIError(400, str(e), param="model") from None
        if not tenant.may_use(model):  # answered exactly like a missing adapter
            raise self._missing(model, tenant, "model")
        if self.store is None:
            if model not in self.engine.multi.adapters:
                raise self._missing(model, tenant, "model")
            return model
        if not self.store.is_resident(model):
            await self._store_load(model, tenant, param="model")
        return model

    async def _store_load(self, name: str, tenant: Tenant, param: str):
        """Load `name` into the store off the event loop; store errors become API errors."""
        try:
            return await run_in_threadpool(self.store.load, name)
        except UnknownAdapterError:
            raise self._missing(name, tenant, param) from None
        except (AdapterNameError, CheckpointError) as e:
            if not (self.store.root / name).exists():  # deleted while it was being read
                raise self._missing(name, tenant, param) from None
            raise APIError(400, str(e), param=param) from None
        except StoreFullError as e:
            raise APIError(503, str(e), "overloaded_error", retry_after=self.retry_after) from None
        except OSError as e:  # the disk failed under the read (full, gone, I/O error)
            log.error("loading adapter %r failed: %s", name, e)
            raise APIError(
                503, f"adapter {name!r} could not be read: {e.strerror or e}", "server_error",
                retry_after=self.retry_after,
            ) from None  # fmt: skip

    def _check_fields(self, body: dict[str, Any], kind: str) -> None:
        unknown = sorted(set(body) - _FIELDS[kind])
        if unknown:
            raise APIError(400, f"unsupported fields: {', '.join(unknown)}", param=unknown[0])
        for k, ok in _NOOP.items():
            if k in body and body[k] not in ok:
                raise APIError(400, f"{k}={body[k]!r} is not supported (only {ok[0]!r})", param=k)
        if body.get("stream") not in (None, True, False):
            raise APIError(400, "'stream' must be a boolean", param="stream")

    def _n(self, body: dict[str, Any]) -> int:
        n = body.get("n")
        n = 1 if n is None else n
        if type(n) is not int or not 1 <= n <= self.max_n:
            raise APIError(400, f"n must be an integer in [1, {self.max_n}], got {n!r}", param="n")
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise APIError(400, f"best_of={best_of!r} is not supported (only best_of = n)",
                           param="best_of")  # fmt: skip
        return n

    def _logprobs(self, body: dict[str, Any], kind: str) -> int | None:
        """Completions: logprobs = k (top k); chat: logprobs = true, top_logprobs = k."""
        lp, top = body.get("logprobs"), body.get("top_logprobs")
        if kind == "completion":
            if lp is None or lp is False:
                return None
            if type(lp) is not int or not 0 <= lp <= 20:
                raise APIError(400, f"logprobs must be an integer in [0, 20], got {lp!r}",
                               param="logprobs")  # fmt: skip
            return lp
        if lp not in (None, True, False):
            raise APIError(400, f"logprobs must be a boolean, got {lp!r}", param="logprobs")
        if top is not None and (type(top) is not int or not 0 <= top <= 20):
            raise APIError(400, f"top_logprobs must be an integer in [0, 20], got {top!r}",
                           param="top_logprobs")  # fmt: skip
        if top and not lp:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return (top or 0) if lp else None

    def _bias(self, body: dict[str, Any]) -> dict[int, float]:
        bias = body.get("logit_bias") or {}
        if not isinstance(bias, dict):
            raise APIError(400, "logit_bias must map token ids to numbers", param="logit_bias")
        out = {}
        for k, v in bias.items():
            if (
                not (isinstance(k, str) and k.isascii() and k.isdecimal())
                or int(k) >= self.engine.vocab_size
            ):
                raise APIError(400, f"logit_bias: {k!r} is not a token id of this model",
                               param="logit_bias")  # fmt: skip
            out[int(k)] = v
        return out

    def _params(self, body: dict[str, Any], kind: str, n_prompt: int) -> SamplingParams:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None:  # OpenAI: 16 for completions; chat: what the context leaves
            room = self.engine.max_model_len - n_prompt
            max_tokens = min(16 if kind == "completion" else self.default_max_tokens, room)
        elif isinstance(max_tokens, int) and max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens ({max_tokens}) exceeds this server's limit ({self.max_tokens_limit})",
                param="max_tokens",
            )
        stop, temperature, top_p = body.get("stop"), body.get("temperature"), body.get("top_p")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,  # OpenAI's default
            top_p=1.0 if top_p is None else top_p,
            top_k=body.get("top_k") or 0,
            seed=body.get("seed"),
            stop=[] if stop is None else stop,
            stop_token_ids=body.get("stop_token_ids") or [],
            ignore_eos=bool(body.get("ignore_eos", False)),
            presence_penalty=body.get("presence_penalty") or 0.0,
            frequency_penalty=body.get("frequency_penalty") or 0.0,
            logit_bias=self._bias(body),
            logprobs=self._logprobs(body, kind),
            timeout=self.request_timeout,
        )
        try:
            return params.check()
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ")[0]) from None

    def _prompt_ids(self, body: dict[str, Any], kind: str) -> list[int]:
        if kind == "completion":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
                ids = prompt
            elif isinstance(prompt, str):
                ids = self.engine.encode(prompt)
            else:
                raise APIError(
                    400,
                    "'prompt' must be a string or a list of token ids (one prompt)",
                    param="prompt",
                )
        else:
            ids = self.engine.encode(self._chat_text(body.get("messages")))
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at most "
                f"{self.max_prompt_tokens}",
                param="prompt" if kind == "completion" else "messages",
            )
        return ids

    def _chat_text(self, messages: Any) -> str:
        tok = self.engine.tok
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise APIError(
                    400,
                    f"messages[{i}] needs a role of system, user or assistant",
                    param="messages",
                )
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(
                        400, f"messages[{i}]: only text content is supported", param="messages"
                    )
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string", param="messages")
            clean.append({"role": m["role"], "content": content})
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "the base model has no chat template; use /v1/completions")
        return tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------ endpoints

    async def generate(self, request: HTTPRequest, kind: str) -> Response:
        tenant = self.tenant(request)
        body = await self._body(request)
        self.admit(tenant)
        adapter = await self._adapter(body.get("model"), tenant)
        request.state.adapter = adapter or self.base_name
        self._check_fields(body, kind)
        n = self._n(body)
        ids = self._prompt_ids(body, kind)
        params = self._params(body, kind, len(ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        stream, done, ended = bool(body.get("stream")), asyncio.Event(), [0]
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
        except ValueError as e:
            _cancel(reqs)
            raise APIError(400, str(e)) from None
        except OverloadedError as e:
            _cancel(reqs)
            raise APIError(503, str(e), "overloaded_error", retry_after=self.backoff()) from None
        request.state.reqs = reqs
        meta = _Meta(kind, body["model"], body.get("stream_options"), self.engine.tok)
        if stream:
            return _Stream(reqs, self._sse(reqs, queue, meta, request.state))
        while True:  # wait for the end, watching for a client that leaves
            try:
                await asyncio.wait_for(done.wait(), timeout=0.25)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    _cancel(reqs)
                    return Response(status_code=499)
        failed = next((r for r in reqs if r.finish_reason in _STATUS), None)
        if failed is not None:
            reason = failed.finish_reason
            raise APIError(
                _STATUS[reason], failed.error or f"the request {reason}", _error_type(reason)
            )
        return JSONResponse(meta.full(reqs))

    async def _sse(self, reqs: list[Request], queue: asyncio.Queue, meta: _Meta, state):
        state.status = 499  # until the stream ends: the client went away
        try:
            if meta.kind == "chat":
                for i in range(len(reqs)):
                    yield _event(meta.chunk(i, {"role": "assistant", "content": ""}, None))
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
                    yield _event({"error": err})
                    _cancel(reqs)
                    break
                if d.text or d.finish_reason:
                    piece = {"content": d.text} if meta.kind == "chat" else d.text
                    lp = None
                    if reqs[i].params.logprobs is not None:
                        lp = meta.logprobs(d.logprobs, i)
                    chunk = meta.chunk(i, piece if d.text else _empty(meta), d.finish_reason, lp)
                    yield _event(chunk)
                left -= d.finish_reason is not None
            else:
                state.status = 200
                if meta.include_usage:
                    yield _event({**meta.head(), "choices": [], "usage": _usage(reqs)})
            yield "data: [DONE]\n\n"
        finally:
            _cancel(reqs)  # no-op once finished; frees the rows if the client went away

    async def completions(self, request: HTTPRequest) -> Response:
        return await self.generate(request, "completion")

    async def chat(self, request: HTTPRequest) -> Response:
        return await self.generate(request, "chat")

    async def models(self, request: HTTPRequest) -> Response:
        tenant = self.tenant(request)
        data = []
        for name in self.known(tenant):
            if name == self.base_name:
                data.append(_model(self.base_name, self.created, None, True))
                continue
            info = self.engine.multi.adapters.get(name)
            entry = _model(name, self.created, self.base_name, info is not None)
            if info is not None:
                entry.update(info.to_dict())
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: HTTPRequest) -> Response:
        """Liveness for anyone; resident adapters and counters only for an admin key."""
        alive = self.engine._thread is not None and self.engine._thread.is_alive()
        status = "draining" if self.draining else "ok" if alive else "engine stopped"
        body = {
            "status": status,
            "running": self.engine.running,
            "waiting": len(self.engine.waiting),
        }
        tenant = self.keys.lookup(bearer(request.headers)) if self.keys else OPEN
        if tenant is not None and tenant.admin:
            store, multi = self.store, self.engine.multi
            body["resident"] = store.resident() if store else sorted(multi.adapters)
            body["stats"] = dict(self.engine.stats)
        return JSONResponse(body, status_code=200 if alive and not self.draining else 503)

    async def prometheus(self, request: HTTPRequest) -> Response:
        if not self.tenant(request).admin:
            raise APIError(403, "/metrics needs an admin key", "permission_error")
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def _name(self, request: HTTPRequest, tenant: Tenant) -> str:
        if self.store is None:
            raise APIError(400, "this server has no adapter directory")
        name = (await self._body(request)).get("name")
        try:
            check_name(name)
        except AdapterNameError as e:
            raise APIError(400, str(e), param="name") from None
        if not tenant.may_use(name):  # another tenant's adapter: as if it did not exist
            raise self._missing(name, tenant, "name")
        if not tenant.may_load(name):
            raise APIError(403, "this key may not load or unload adapters", "permission_error")
        return name

    async def load(self, request: HTTPRequest) -> Response:
        tenant = self.tenant(request)
        name = await self._name(request, tenant)
        info = await self._store_load(name, tenant, param="name")
        return JSONResponse({"loaded": True, **info.to_dict()})

    async def unload(self, request: HTTPRequest) -> Response:
        tenant = self.tenant(request)
        name = await self._name(request, tenant)
        try:
            await run_in_threadpool(self.store.unload, name)
        except UnknownAdapterError as e:
            loaded = [n for n in e.known if tenant.may_use(n)]
            raise APIError(
                404, f"adapter {name!r} is not loaded; loaded: {loaded}", "not_found_error", "name"
            ) from None
        except AdapterBusyError as e:
            raise APIError(409, str(e), "conflict_error", "name") from None
        return JSONResponse({"name": name, "loaded": False})


def create_app(engine: Engine, base_name: str = "base", **limits) -> Starlette:
    """The Starlette app serving `engine`; `limits` go to `API` (max_tokens_limit, ...)."""
    api = API(engine, base_name, **limits)

    def route(path, fn, methods, counted=False):
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                resp = await fn(request)
            except APIError as e:
                resp = e.response()
            except Exception:  # a bug must not leak a traceback to the client
                log.exception("unexpected error on %s", path)
                resp = APIError(500, "internal server error", "server_error").response()
            if counted:
                _count(api, request, resp)
            return resp

        return Route(path, endpoint, methods=methods)

    app = Starlette(
        routes=[
            route("/v1/completions", api.completions, ["POST"], counted=True),
            route("/v1/chat/completions", api.chat, ["POST"], counted=True),
            route("/v1/models", api.models, ["GET"]),
            route("/health", api.health, ["GET"]),
            route("/metrics", api.prometheus, ["GET"]),
            route("/v1/adapters/load", api.load, ["POST"]),
            route("/v1/adapters/unload", api.unload, ["POST"]),
        ]
    )
    app.state.api = api
    return app


def _count(api: API, request: HTTPRequest, resp: Response) -> None:
    """Metrics of one generation request; a stream is counted when it ends."""
    adapter = getattr(request.state, "adapter", "-")  # "-": refused before a known model
    reqs = getattr(request.state, "reqs", [])
    if isinstance(resp, _Stream):
        resp.on_end = lambda: api.metrics.request(
            getattr(request.state, "status", 200), adapter, reqs
        )
    else:
        api.metrics.request(resp.status_code, adapter, reqs)


def _bind(fn, i):
    return lambda d: fn(i, d)


def _cancel(reqs: list[Request]) -> None:
    for r in reqs:
        r.cancel()


def _with_seed(params: SamplingParams, i: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=None if params.seed is None else params.seed + i)


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM: the app answers new requests 503 (uvicorn also stops
    accepting connections), in-flight requests finish within `timeout_graceful_shutdown`,
    and the process then ends with status 0 (plain uvicorn re-raises SIGTERM at the end)."""

    def __init__(self, config: uvicorn.Config, api: API):
        super().__init__(config)
        self.api = api

    def handle_exit(self, sig: int, frame) -> None:
        self.api.draining = True
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()  # a drain asked for by SIGTERM is a clean exit


class ServerThread:
    """Run an app with uvicorn on a background thread (tests, benchmarks, notebooks).

    port=0 picks a free port; `url` tells which. Use as a context manager or start()/stop().
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        cfg = uvicorn.Config(
            app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=5
        )
        self.server = DrainingServer(cfg, app.state.api)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def drain(self) -> None:
        """What SIGTERM does: refuse new requests, let in-flight ones finish, then stop."""
        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------- response shapes


class _Stream(StreamingResponse):
    """SSE response that cancels its requests however the response ends (e.g. the client left).

    Cancelling from here, not only from the generator's `finally`, does not depend on when
    a generator suspended at a `yield` gets finalised.
    """

    def __init__(self, reqs: list[Request], content):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.reqs, self.on_end = reqs, None

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel(self.reqs)
            if self.on_end is not None:
                self.on_end()


class _Meta:
    def __init__(self, kind: str, model: str, stream_options: Any, tok=None):
        self.kind, self.model, self.tok = kind, model, tok
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        self.offset = {}  # completions' text_offset per choice, across stream chunks

    def head(self) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, i: int, piece: Any, finish: str | None, logprobs: Any = None) -> dict:
        if self.kind == "chat":
            choice = {
                "index": i,
                "delta": piece or {},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        else:
            choice = {
                "index": i,
                "text": piece or "",
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {**self.head(), "choices": [choice]}

    def logprobs(self, entries: list[tuple], i: int = 0) -> dict:
        """OpenAI's shapes for (token id, logprob, [(id, logprob)] top k) entries."""
        text = [self.tok.decode([t]) for t, _, _ in entries]
        if self.kind == "chat":

            def one(s, lp):
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            content = [
                {**one(s, lp), "top_logprobs": [one(self.tok.decode([a]), b) for a, b in top]}
                for s, (_, lp, top) in zip(text, entries, strict=True)
            ]
            return {"content": content}
        offsets, at = [], self.offset.get(i, 0)
        for s in text:
            offsets.append(at)
            at += len(s)
        self.offset[i] = at
        return {
            "tokens": text,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{self.tok.decode([a]): b for a, b in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    def full(self, reqs: list[Request]) -> dict:
        choices = []
        for i, r in enumerate(reqs):
            lp = self.logprobs(r.logprobs, i) if r.params.logprobs is not None else None
            if self.kind == "chat":
                msg = {"role": "assistant", "content": r.text}
                choices.append({"index": i, "message": msg, "logprobs": lp,
                                "finish_reason": r.finish_reason})  # fmt: skip
            else:
                choices.append({"index": i, "text": r.text, "logprobs": lp,
                                "finish_reason": r.finish_reason})  # fmt: skip
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        head = {**self.head(), "object": obj}
        return {**head, "choices": choices, "usage": _usage(reqs)}


def _empty(meta: _Meta) -> Any:
    return {} if meta.kind == "chat" else ""


def _usage(reqs: list[Request]) -> dict:
    p, c = len(reqs[0].prompt_ids), sum(len(r.output_ids) for r in reqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _model(name: str, created: int, parent: str | None, loaded: bool) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "nora",
        "root": name,
        "parent": parent,
        "loaded": loaded,
    }


def _unknown(name: str, known: list[str]) -> str:
    return f"the model {name!r} does not exist; known models: {', '.join(known)}"


# Server options that must be positive integers / numbers (None: the option's default rule).
_POSITIVE_INTS = ("max_resident", "max_batch", "max_prefill_tokens", "max_model_len",
                  "max_tokens_limit", "default_max_tokens", "max_prompt_tokens",
                  "max_body_bytes", "max_n")  # fmt: skip
_POSITIVE_NUMBERS = ("request_timeout", "retry_after")


def check_options(**opts) -> None:
    """Refuse bad server options at start-up (ValueError naming the option), not per request."""
    for k in _POSITIVE_INTS:
        v = opts.get(k)
        if v is not None and (type(v) is not int or v < 1):
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
    for k in _POSITIVE_NUMBERS:
        v = opts.get(k)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf
        ):
            raise ValueError(f"{k} must be a number of seconds > 0, got {v!r}")
    for k in ("max_waiting", "grace"):
        v = opts.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
            raise ValueError(f"{k} must be >= 0, got {v!r}")
    limit, default = opts.get("max_tokens_limit") or 1024, opts.get("default_max_tokens") or 256
    if default > limit:  # (API's defaults when not given)
        raise ValueError(f"default_max_tokens ({default}) is above max_tokens_limit ({limit})")


def build(
    model,
    tokenizer,
    adapters_dir: str,
    base_name: str,
    max_resident: int = 16,
    max_batch: int = 16,
    max_prefill_tokens: int = 4096,
    max_model_len: int | None = None,
    max_waiting: int = 1024,
    preload: list[str] | tuple[str, ...] = (),
    **limits,
) -> tuple[Starlette, Engine]:
    """Engine + app over a loaded base model and an adapter directory (engine not started)."""
    from nora.serving.multi import MultiAdapterModel

    check_options(
        max_resident=max_resident, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens,
        max_model_len=max_model_len, max_waiting=max_waiting, **limits,
    )  # fmt: skip
    from nora.serving.store import AdapterStore

    store = AdapterStore(MultiAdapterModel(model), adapters_dir, max_resident=max_resident)
    for name in preload:
        store.load(name)
    engine = Engine(
        store.multi,
        tokenizer,
        store,
        max_batch=max_batch,
        max_prefill_tokens=max_prefill_tokens,
        max_model_len=max_model_len,
        max_waiting=max_waiting,
    )
    return create_app(engine, base_name, **limits), engine


def load_server(
    base: str, adapters_dir: str, dtype=None, device=None, **opts
) -> tuple[Starlette, Engine]:
    """`build` over `load_base_model(base)`; the served base name is `base` (or its folder name)."""
    from nora.models import load_base_model

    model, tok = load_base_model(base, dtype=dtype, device=device)
    name = Path(base).name if "/" in base or "\\" in base else base
    return build(model, tok, adapters_dir, name, **opts)


def run(
    app: Starlette,
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    grace: float = 30.0,
    sock: socket.socket | None = None,
    keep_alive: float = 75.0,
) -> None:
    """Start the engine, serve `app` until SIGTERM / SIGINT, drain, stop the engine.

    On SIGTERM the server stops accepting, in-flight requests (streams included) get up to
    `grace` seconds to finish, what is left is cancelled, and this returns normally.
    Idle connections are kept `keep_alive` seconds, longer than the longest Retry-After
    (60 s): a client that waits as told does not come back to a connection being closed.
    """
    engine.start()
    cfg = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="off",
        timeout_graceful_shutdown=grace, timeout_keep_alive=keep_alive,
    )  # fmt: skip
    try:
        DrainingServer(cfg, app.state.api).run(sockets=[sock] if sock is not None else None)
    finally:
        engine.stop()


def serve(
    base: str = "smollm2-135m",
    adapters_dir: str = "adapters",
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    api_keys: str | None = None,
    grace: float = 30.0,
    **opts,
) -> None:
    """Load `base`, serve the adapters of `adapters_dir` on host:port until SIGTERM.

    api_keys: a JSON key file (tenants.py); without it, keys come from $NORA_API_KEYS /
    $NORA_API_KEY, and with no keys at all every caller may do everything -- fine on
    loopback, warned about on any other address. opts: max_resident, max_batch,
    max_prefill_tokens, max_model_len, max_waiting, preload (names), max_tokens_limit,
    default_max_tokens, max_prompt_tokens, max_body_bytes, request_timeout, max_n,
    retry_after, dtype, device. The CLI's `nora serve` calls this.
    """
    check_options(grace=grace, **opts)  # before minutes of model loading
    keys = load_keys(api_keys)
    warning = exposure_warning(keys, host)
    if warning:
        log.warning(warning)
    app, engine = load_server(base, adapters_dir, keys=keys, **opts)
    run(app, engine, host, port, log_level, grace)
