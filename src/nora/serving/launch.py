"""Building and running a server: model + store + engine + app, uvicorn, drain on SIGTERM.

    serve(ServeConfig(base="smollm2-135m", adapters_dir="adapters/", port=8000))

`nora serve` calls `serve`; tests, benchmarks and notebooks use `build` / `load_server` and
`ServerThread` (uvicorn on a background thread).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

from nora.serving.config import ServeConfig
from nora.serving.engine import Engine
from nora.serving.multi import MultiAdapterModel
from nora.serving.openai.app import API, create_app
from nora.serving.store import AdapterStore
from nora.serving.tenants import Keys, exposure_warning, load_keys

log = logging.getLogger("nora.serve")


def build(
    model, tokenizer, cfg: ServeConfig, base_name: str | None = None, keys: Keys | None = None
) -> tuple[Starlette, Engine]:
    """Engine + app over a loaded base model and `cfg.adapters_dir` (engine not started)."""
    cfg.validate()
    store = AdapterStore(MultiAdapterModel(model), cfg.adapters_dir, max_resident=cfg.max_resident)
    for name in cfg.preload:
        store.load(name)
    engine = Engine(
        store.multi,
        tokenizer,
        store,
        max_batch=cfg.max_batch,
        max_prefill_tokens=cfg.max_prefill_tokens,
        max_model_len=cfg.max_model_len,
        max_waiting=cfg.max_waiting,
    )
    return create_app(engine, base_name or cfg.served_name(), cfg, keys=keys), engine


def load_server(cfg: ServeConfig, keys: Keys | None = None) -> tuple[Starlette, Engine]:
    """`build` over `load_base_model(cfg.base)`; served as `cfg.served_name()`."""
    from nora.models import load_base_model

    cfg.validate()  # before minutes of model loading
    model, tok = load_base_model(cfg.base, dtype=cfg.dtype, device=cfg.device)
    return build(model, tok, cfg, keys=keys)


def run(
    app: Starlette,
    engine: Engine,
    cfg: ServeConfig | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Start the engine, serve `app` on cfg.host:cfg.port (or `sock`) until SIGTERM / SIGINT,
    drain, stop the engine.

    On SIGTERM the server stops accepting, in-flight requests (streams included) get up to
    `cfg.grace` seconds to finish, what is left is cancelled, and this returns normally.
    Idle connections are kept `cfg.keep_alive` seconds, longer than the longest Retry-After
    (60 s): a client that waits as told does not come back to a connection being closed.
    """
    cfg = (cfg or ServeConfig()).validate()
    engine.start()
    ucfg = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, lifespan="off",
        timeout_graceful_shutdown=cfg.grace, timeout_keep_alive=cfg.keep_alive,
    )  # fmt: skip
    try:
        DrainingServer(ucfg, app.state.api).run(sockets=[sock] if sock is not None else None)
    finally:
        engine.stop()


def serve(cfg: ServeConfig | None = None) -> None:
    """Load `cfg.base`, serve the adapters of `cfg.adapters_dir` until SIGTERM.

    cfg.api_keys: a JSON key file (tenants.py); without it, keys come from $NORA_API_KEYS /
    $NORA_API_KEY, and with no keys at all every caller may do everything -- fine on
    loopback, warned about on any other address. The CLI's `nora serve` calls this.
    """
    cfg = (cfg or ServeConfig()).validate()
    keys = load_keys(cfg.api_keys)
    warning = exposure_warning(keys, cfg.host)
    if warning:
        log.warning(warning)
    app, engine = load_server(cfg, keys=keys)
    run(app, engine, cfg)


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
