"""An OpenAI-compatible HTTP server over the engine (Starlette + uvicorn).

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "stream", ...}
    POST /v1/chat/completions   {"model", "messages", ...}            (stream: server-sent events)
    GET  /v1/models             the base model and every adapter ("loaded": resident or not)
    GET  /health                status (resident adapters and counters: admin keys only)
    GET  /metrics               Prometheus text format (admin keys only, when keys are set)
    POST /v1/adapters/load      {"name"}   make an adapter of the directory resident (validated)
    POST /v1/adapters/unload    {"name"}   drop it (409 while requests use it)
    GET  /openapi.json          the schema of these bodies (protocol.py)

`model` is an adapter name (a folder of the adapter directory) or the base model's name.
Concurrent requests are batched together by the engine whatever their adapters. Errors are
OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON,
bad or unsupported fields (the field in `param`), invalid adapter names, oversize prompts or
max_tokens, or an adapter that does not fit the base (the mismatch named); 401 for a missing
or unknown API key; 403 for loading / unloading without the right; 404 for an unknown model
(with the names this key may use) -- and for another tenant's adapter, word for word; 409
for unloading an adapter in use; 413 for an oversize body; 429 past a key's rate limit and
503 when the waiting queue is full, no adapter slot is free or the server is draining (both
with `Retry-After`; for a full queue, the time the queue ahead takes to drain at the recent
completion rate); 500 for a generation that failed (that request only); 504 past the
per-request time limit. A client that disconnects cancels its request, which frees its row.

With keys (tenants.py), every endpoint but /health and /openapi.json needs
`Authorization: Bearer <key>`. Generation itself: completions.py.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nora.checkpoint import CheckpointError
from nora.serving.config import ServeConfig
from nora.serving.engine import Engine
from nora.serving.metrics import CONTENT_TYPE, Metrics
from nora.serving.multi import UnknownAdapterError
from nora.serving.openai.completions import Completions
from nora.serving.openai.errors import APIError
from nora.serving.openai.protocol import AdapterRequest, openapi, parse
from nora.serving.openai.responses import EventStream, model_card
from nora.serving.sampling import ParamError
from nora.serving.store import AdapterBusyError, AdapterNameError, StoreFullError, check_name
from nora.serving.tenants import OPEN, Keys, Tenant, bearer

log = logging.getLogger("nora.serve")


class API:
    """The request handlers, bound to one engine (and its store)."""

    def __init__(
        self,
        engine: Engine,
        base_name: str,
        cfg: ServeConfig | None = None,
        keys: Keys | None = None,
    ):
        cfg = cfg or ServeConfig()
        self.engine, self.store, self.base_name, self.keys = engine, engine.store, base_name, keys
        self.max_body_bytes, self.retry_after = cfg.max_body_bytes, cfg.retry_after
        self.draining = False  # set on SIGTERM: new requests get 503
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.completions = Completions(self, cfg)

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
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                           "authentication_error")  # fmt: skip
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

    async def body(self, request: HTTPRequest) -> Any:
        """The parsed JSON body (413 past max_body_bytes, 400 for malformed JSON)."""
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

    # ------------------------------------------------------------------ models and adapters

    def known(self, tenant: Tenant = OPEN) -> list[str]:
        """The model names `tenant` may use: the base (if allowed), then its adapters."""
        base = [self.base_name] if tenant.base or tenant.admin else []
        return base + [n for n in self.store.available() if tenant.may_use(n)]

    def missing(self, name: str, tenant: Tenant, param: str) -> APIError:
        """The 404 for a model that does not exist -- or that this key may not see."""
        known = ", ".join(self.known(tenant))
        return APIError(404, f"the model {name!r} does not exist; known models: {known}",
                        "not_found_error", param)  # fmt: skip

    async def adapter(self, model: Any, tenant: Tenant = OPEN) -> str | None:
        """The adapter a `model` field names (None: the base); loads it, validated. The
        model is resolved before the other fields: a 404 does not depend on them."""
        if not isinstance(model, str) or not model:
            raise APIError(
                400, "'model' is required: an adapter name or the base model", param="model"
            )
        if model == self.base_name:
            if not (tenant.base or tenant.admin):
                raise self.missing(model, tenant, "model")
            return None
        try:
            check_name(model)
        except AdapterNameError as e:
            raise APIError(400, str(e), param="model") from None
        if not tenant.may_use(model):  # answered exactly like a missing adapter
            raise self.missing(model, tenant, "model")
        if not self.store.is_resident(model):
            await self.store_load(model, tenant, param="model")
        return model

    async def store_load(self, name: str, tenant: Tenant, param: str):
        """Load `name` into the store off the event loop; store errors become API errors."""
        try:
            return await run_in_threadpool(self.store.load, name)
        except UnknownAdapterError:
            raise self.missing(name, tenant, param) from None
        except (AdapterNameError, CheckpointError) as e:
            if not (self.store.root / name).exists():  # deleted while it was being read
                raise self.missing(name, tenant, param) from None
            raise APIError(400, str(e), param=param) from None
        except StoreFullError as e:
            raise APIError(503, str(e), "overloaded_error", retry_after=self.retry_after) from None
        except OSError as e:  # the disk failed under the read (full, gone, I/O error)
            log.error("loading adapter %r failed: %s", name, e)
            raise APIError(
                503, f"adapter {name!r} could not be read: {e.strerror or e}", "server_error",
                retry_after=self.retry_after,
            ) from None  # fmt: skip

    # ------------------------------------------------------------------ endpoints

    async def models(self, request: HTTPRequest) -> Response:
        tenant = self.tenant(request)
        data = []
        for name in self.known(tenant):
            if name == self.base_name:
                data.append(model_card(self.base_name, self.created, None, True))
                continue
            info = self.store.info(name)
            entry = model_card(name, self.created, self.base_name, info is not None)
            if info is not None:
                entry.update(info.to_dict())
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: HTTPRequest) -> Response:
        """Liveness for anyone; resident adapters and counters only for an admin key."""
        alive = self.engine.alive
        status = "draining" if self.draining else "ok" if alive else "engine stopped"
        body = {
            "status": status,
            "running": self.engine.running,
            "waiting": len(self.engine.waiting),
        }
        tenant = self.keys.lookup(bearer(request.headers)) if self.keys else OPEN
        if tenant is not None and tenant.admin:
            body["resident"] = self.store.resident()
            body["stats"] = self.engine.stats.to_dict()
        return JSONResponse(body, status_code=200 if alive and not self.draining else 503)

    async def prometheus(self, request: HTTPRequest) -> Response:
        if not self.tenant(request).admin:
            raise APIError(403, "/metrics needs an admin key", "permission_error")
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def schema(self, request: HTTPRequest) -> Response:
        return JSONResponse(openapi())

    async def _name(self, request: HTTPRequest, tenant: Tenant) -> str:
        if not self.store.mutable:
            raise APIError(400, "this server has no adapter directory")
        body = await self.body(request)
        try:
            check_name(body.get("name"))
            name = parse(AdapterRequest, body).name
        except AdapterNameError as e:
            raise APIError(400, str(e), param="name") from None
        except ParamError as e:
            raise APIError.bad(e) from None
        if not tenant.may_use(name):  # another tenant's adapter: as if it did not exist
            raise self.missing(name, tenant, "name")
        if not tenant.may_load(name):
            raise APIError(403, "this key may not load or unload adapters", "permission_error")
        return name

    async def load(self, request: HTTPRequest) -> Response:
        tenant = self.tenant(request)
        name = await self._name(request, tenant)
        info = await self.store_load(name, tenant, param="name")
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


def create_app(
    engine: Engine,
    base_name: str = "base",
    cfg: ServeConfig | None = None,
    keys: Keys | None = None,
) -> Starlette:
    """The Starlette app serving `engine` as `base_name`, with cfg's HTTP limits and `keys`."""
    api = API(engine, base_name, cfg, keys)
    gen = api.completions

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
            route("/v1/completions", gen.completions, ["POST"], counted=True),
            route("/v1/chat/completions", gen.chat, ["POST"], counted=True),
            route("/v1/models", api.models, ["GET"]),
            route("/health", api.health, ["GET"]),
            route("/metrics", api.prometheus, ["GET"]),
            route("/v1/adapters/load", api.load, ["POST"]),
            route("/v1/adapters/unload", api.unload, ["POST"]),
            route("/openapi.json", api.schema, ["GET"]),
        ]
    )
    app.state.api = api
    return app


def _count(api: API, request: HTTPRequest, resp: Response) -> None:
    """Metrics of one generation request; a stream is counted when it ends."""
    adapter = getattr(request.state, "adapter", "-")  # "-": refused before a known model
    reqs = getattr(request.state, "reqs", [])
    if isinstance(resp, EventStream):
        resp.on_end = lambda: api.metrics.request(
            getattr(request.state, "status", 200), adapter, reqs
        )
    else:
        api.metrics.request(resp.status_code, adapter, reqs)
