"""An OpenAI-compatible HTTP server over the engine (Starlette + uvicorn).

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "stream", ...}
    POST /v1/chat/completions   {"model", "messages", ...}            (stream: server-sent events)
    GET  /v1/models             the base model and every adapter ("loaded": resident or not)
    GET  /health
    POST /v1/adapters/load      {"name"}   make an adapter of the directory resident (validated)
    POST /v1/adapters/unload    {"name"}   drop it (409 while requests use it)

`model` is an adapter name (a folder of the adapter directory) or the base model's name.
Concurrent requests are batched together by the engine whatever their adapters. Errors are
OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON,
bad or unsupported fields, invalid adapter names, oversize prompts or max_tokens, or an
adapter that does not fit the base (the mismatch named); 404 for an unknown model (with the
known names); 409 for unloading an adapter in use; 413 for an oversize body. A client that
disconnects cancels its request, which frees its batch row.
"""

from __future__ import annotations

import asyncio
import json
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
from nora.serving.multi import UnknownAdapterError
from nora.serving.store import AdapterBusyError, AdapterNameError, StoreFullError, check_name

# Fields accepted with any value, and fields accepted only with their no-op value.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}
_COMMON |= {"stream_options", "user", "ignore_eos", "stop_token_ids", "n", "presence_penalty"}
_COMMON |= {"frequency_penalty", "logit_bias", "logprobs"}
_FIELDS = {
    "completion": _COMMON | {"prompt", "echo", "best_of", "suffix"},
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
}
_NOOP = {
    "n": (1, None),
    "best_of": (1, None),
    "echo": (False, None),
    "suffix": (None, ""),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        body = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.status,
        }
        return JSONResponse({"error": body}, status_code=self.status)


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
    ):
        self.engine, self.store, self.base_name = engine, engine.store, base_name
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.max_prompt_tokens = max_prompt_tokens or engine.max_model_len - 1
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

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

    def known(self) -> list[str]:
        names = self.store.available() if self.store else sorted(self.engine.multi.adapters)
        return [self.base_name, *names]

    async def _adapter(self, model: Any) -> str | None:
        """The adapter a `model` field names (None: the base); loads it, validated."""
        if not isinstance(model, str) or not model:
            raise APIError(
                400, "'model' is required: an adapter name or the base model", param="model"
            )
        if model == self.base_name:
            return None
        try:
            check_name(model)
        except AdapterNameError as e:
            raise APIError(400, str(e), param="model") from None
        if self.store is None:
            if model not in self.engine.multi.adapters:
                raise APIError(404, _unknown(model, self.known()), "not_found_error", "model")
            return model
        if not self.store.is_resident(model):
            await self._store_load(model, param="model")
        return model

    async def _store_load(self, name: str, param: str):
        """Load `name` into the store off the event loop; store errors become API errors."""
        try:
            return await run_in_threadpool(self.store.load, name)
        except UnknownAdapterError:
            raise APIError(404, _unknown(name, self.known()), "not_found_error", param) from None
        except (AdapterNameError, CheckpointError) as e:
            raise APIError(400, str(e), param=param) from None
        except StoreFullError as e:
            raise APIError(503, str(e), "overloaded_error") from None

    def _check_fields(self, body: dict[str, Any], kind: str) -> None:
        unknown = sorted(set(body) - _FIELDS[kind])
        if unknown:
            raise APIError(400, f"unsupported fields: {', '.join(unknown)}", param=unknown[0])
        for k, ok in _NOOP.items():
            if k in body and body[k] not in ok:
                raise APIError(400, f"{k}={body[k]!r} is not supported (only {ok[0]!r})", param=k)
        if body.get("stream") not in (None, True, False):
            raise APIError(400, "'stream' must be a boolean", param="stream")

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
        )
        try:
            return params.check()
        except ValueError as e:
            raise APIError(400, str(e)) from None

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
                    400, "'prompt' must be a string or a list of token ids (one prompt)", "prompt"
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
                    400, f"messages[{i}] needs a role of system, user or assistant", "messages"
                )
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(
                        400, f"messages[{i}]: only text content is supported", "messages"
                    )
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string", "messages")
            clean.append({"role": m["role"], "content": content})
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "the base model has no chat template; use /v1/completions")
        return tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------ endpoints

    async def generate(self, request: HTTPRequest, kind: str) -> Response:
        body = await self._body(request)
        adapter = await self._adapter(body.get("model"))
        self._check_fields(body, kind)
        ids = self._prompt_ids(body, kind)
        params = self._params(body, kind, len(ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        stream, done = bool(body.get("stream")), asyncio.Event()

        def on_delta(d: Delta) -> None:  # engine thread -> event loop
            if stream:
                loop.call_soon_threadsafe(queue.put_nowait, d)
            elif d.finish_reason is not None:  # a full answer only needs the end
                loop.call_soon_threadsafe(done.set)

        try:
            req = self.engine.submit(ids, adapter, params, on_delta)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except OverloadedError as e:
            raise APIError(503, str(e), "overloaded_error") from None
        meta = _Meta(kind, body["model"], body.get("stream_options"))
        if stream:
            return _Stream(req, self._sse(req, queue, meta))
        while True:  # wait for the end, watching for a client that leaves
            try:
                await asyncio.wait_for(done.wait(), timeout=0.25)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                    return Response(status_code=499)
        if req.finish_reason == "error":
            raise APIError(500, req.error or "generation failed", "server_error")
        if req.finish_reason == "cancelled":
            raise APIError(503, req.error or "the request was cancelled", "server_error")
        return JSONResponse(meta.full(req))

    async def _sse(self, req: Request, queue: asyncio.Queue, meta: _Meta):
        try:
            if meta.kind == "chat":
                yield _event(meta.chunk({"role": "assistant", "content": ""}, None))
            while True:
                d = await queue.get()
                if d.finish_reason in ("error", "cancelled"):
                    err = {"message": req.error or d.finish_reason, "type": "server_error"}
                    yield _event({"error": err})
                    break
                if d.text or d.finish_reason:
                    piece = {"content": d.text} if meta.kind == "chat" else d.text
                    yield _event(meta.chunk(piece if d.text else _empty(meta), d.finish_reason))
                if d.finish_reason:
                    if meta.include_usage:
                        yield _event(
                            {**meta.chunk(None, None), "choices": [], "usage": _usage(req)}
                        )
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # no-op once finished; frees the row if the client went away

    async def completions(self, request: HTTPRequest) -> Response:
        return await self.generate(request, "completion")

    async def chat(self, request: HTTPRequest) -> Response:
        return await self.generate(request, "chat")

    async def models(self, request: HTTPRequest) -> Response:
        data = [_model(self.base_name, self.created, None, True)]
        for name in self.known()[1:]:
            info = self.engine.multi.adapters.get(name)
            entry = _model(name, self.created, self.base_name, info is not None)
            if info is not None:
                entry.update(info.to_dict())
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: HTTPRequest) -> Response:
        alive = self.engine._thread is not None and self.engine._thread.is_alive()
        body = {
            "status": "ok" if alive else "engine stopped",
            "running": self.engine.running,
            "waiting": len(self.engine.waiting),
            "resident": self.store.resident() if self.store else sorted(self.engine.multi.adapters),
            "stats": dict(self.engine.stats),
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    async def _name(self, request: HTTPRequest) -> str:
        if self.store is None:
            raise APIError(400, "this server has no adapter directory")
        name = (await self._body(request)).get("name")
        try:
            return check_name(name)
        except AdapterNameError as e:
            raise APIError(400, str(e), param="name") from None

    async def load(self, request: HTTPRequest) -> Response:
        name = await self._name(request)
        info = await self._store_load(name, param="name")
        return JSONResponse({"loaded": True, **info.to_dict()})

    async def unload(self, request: HTTPRequest) -> Response:
        name = await self._name(request)
        try:
            await run_in_threadpool(self.store.unload, name)
        except UnknownAdapterError as e:
            raise APIError(
                404, f"adapter {name!r} is not loaded; loaded: {e.known}", "not_found_error", "name"
            ) from None
        except AdapterBusyError as e:
            raise APIError(409, str(e), "conflict_error", "name") from None
        return JSONResponse({"name": name, "loaded": False})


def create_app(engine: Engine, base_name: str = "base", **limits) -> Starlette:
    """The Starlette app serving `engine`; `limits` go to `API` (max_tokens_limit, ...)."""
    api = API(engine, base_name, **limits)

    def route(path, fn, methods):
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                return await fn(request)
            except APIError as e:
                return e.response()

        return Route(path, endpoint, methods=methods)

    app = Starlette(
        routes=[
            route("/v1/completions", api.completions, ["POST"]),
            route("/v1/chat/completions", api.chat, ["POST"]),
            route("/v1/models", api.models, ["GET"]),
            route("/health", api.health, ["GET"]),
            route("/v1/adapters/load", api.load, ["POST"]),
            route("/v1/adapters/unload", api.unload, ["POST"]),
        ]
    )
    app.state.api = api
    return app


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
        self.server = uvicorn.Server(cfg)
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
    """SSE response that cancels its request however the response ends (e.g. the client left).

    Cancelling from here, not only from the generator's `finally`, does not depend on when
    a generator suspended at a `yield` gets finalised.
    """

    def __init__(self, req: Request, content):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.req = req

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.req.cancel()


class _Meta:
    def __init__(self, kind: str, model: str, stream_options: Any):
        self.kind, self.model = kind, model
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, piece: Any, finish: str | None) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "delta": piece or {}, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def full(self, req: Request) -> dict:
        if self.kind == "chat":
            msg = {"role": "assistant", "content": req.text}
            choice = {
                "index": 0,
                "message": msg,
                "logprobs": None,
                "finish_reason": req.finish_reason,
            }
            head = self._head("chat.completion")
        else:
            choice = {
                "index": 0,
                "text": req.text,
                "logprobs": None,
                "finish_reason": req.finish_reason,
            }
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": _usage(req)}


def _empty(meta: _Meta) -> Any:
    return {} if meta.kind == "chat" else ""


def _usage(req: Request) -> dict:
    p, c = len(req.prompt_ids), len(req.output_ids)
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


def serve(
    base: str = "smollm2-135m",
    adapters_dir: str = "adapters",
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **opts,
) -> None:
    """Load `base`, serve the adapters of `adapters_dir` on host:port until interrupted.

    opts: max_resident, max_batch, max_prefill_tokens, max_model_len, max_waiting, preload
    (names), max_tokens_limit, default_max_tokens, max_prompt_tokens, max_body_bytes, dtype,
    device. The CLI's `nora serve` calls this.
    """
    app, engine = load_server(base, adapters_dir, **opts)
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="off")
    finally:
        engine.stop()
