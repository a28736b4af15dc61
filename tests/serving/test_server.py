"""The OpenAI-compatible server, started in-process on a loopback port (self-stopping)."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
from conftest import tiny_llama

from nora.serving import (
    AdapterStore,
    Engine,
    MultiAdapterModel,
    ServeConfig,
    ServerThread,
    create_app,
    load_server,
)
from serving.common import SPECS, Client, greedy, hf_generate, make_dir, save_random

BASE = "tiny-base"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_dir(tmp_path_factory.mktemp("adapters"), SPECS)
    save_random(root / "wide", base=lambda: tiny_llama(hidden=48), method="nora", r=2)
    return root


@pytest.fixture(scope="module")
def server(root, tok):
    store = AdapterStore(MultiAdapterModel(tiny_llama()), root, max_resident=4)
    engine = Engine(store.multi, tok, store, max_batch=8, max_model_len=256).start()
    cfg = ServeConfig(max_tokens_limit=300, max_prompt_tokens=100, max_body_bytes=20_000)
    app = create_app(engine, BASE, cfg)
    with ServerThread(app) as srv:
        srv.engine = engine
        yield srv
    engine.stop()


TIMEOUT = 60  # seconds: only a hang reaches it; every wait below is on an event


class StepGate:
    """Holds the engine's background steps until the test lets them run, and tells the test
    when requests arrive and when they are cancelled: tests wait on these events instead of
    sleeping, so a busy machine cannot reorder what they check.

    The gate sits outside `Engine.step`, so a held engine holds no lock (the HTTP side can
    still load/unload adapters).
    """

    def __init__(self, engine):
        self.engine, self.cv = engine, threading.Condition()
        self.permits, self.done, self.open = 0, 0, False
        self.submitted: list = []
        self.cancelled = threading.Event()

    def __enter__(self) -> StepGate:
        real_step, real_submit = self.engine.step, self.engine.submit

        def step():
            with self.cv:
                assert self.cv.wait_for(lambda: self.open or self.permits > 0, TIMEOUT)
                self.permits -= not self.open
            try:
                return real_step()
            finally:
                with self.cv:
                    self.done += 1
                    self.cv.notify_all()

        def submit(*args, **kw):
            req = real_submit(*args, **kw)
            real_cancel = req.cancel

            def cancel():
                real_cancel()
                self.cancelled.set()

            req.cancel = cancel
            with self.cv:
                self.submitted.append(req)
                self.cv.notify_all()
            return req

        self.engine.step, self.engine.submit = step, submit
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.step, self.engine.submit  # back to the class's methods
        with self.cv:
            self.open = True
            self.cv.notify_all()

    def wait_submitted(self, n: int) -> list:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.submitted) >= n, TIMEOUT)
            return self.submitted[:n]

    def run(self, n: int = 1) -> None:
        """Let n more steps run and wait until they have (the engine must have work)."""
        with self.cv:
            target = self.done + n
            self.permits += n
            self.cv.notify_all()
            assert self.cv.wait_for(lambda: self.done >= target, TIMEOUT)

    def release(self) -> None:
        with self.cv:
            self.open = True
            self.cv.notify_all()


def call(srv, method, path, body=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, text = resp.status, resp.read()
    conn.close()
    return status, json.loads(text) if text else None


def test_health_and_models(server):
    status, body = call(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["running"] == 0
    status, body = call(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == [BASE, "aurora", "lora", "loran", "nolora", "nora", "wide"]
    assert body["data"][0]["loaded"] and body["data"][1]["parent"] == BASE


def test_completions_match_transformers_generate(server, root, tok):
    for prompt, adapter in [("hello", "nora"), ("the fox", "loran"), ("abc", None)]:
        model = adapter or BASE
        status, body = call(
            server, "POST", "/v1/completions", greedy(model=model, prompt=prompt, max_tokens=10)
        )
        assert status == 200, body
        ref = hf_generate(root, tok, prompt, adapter, 10, do_sample=False)
        assert body["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)
        assert body["choices"][0]["finish_reason"] == "length" and body["model"] == model
        assert body["usage"] == {
            "prompt_tokens": len(prompt),
            "completion_tokens": 10,
            "total_tokens": len(prompt) + 10,
        }


def test_streams_add_up_to_the_non_streamed_answer(server):
    chat = greedy(model="aurora", messages=[{"role": "user", "content": "hi"}], max_tokens=12)
    status, full = call(server, "POST", "/v1/chat/completions", chat)
    assert status == 200 and full["object"] == "chat.completion"
    events = Client(server).sse(
        "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}}
    )
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["usage"]["completion_tokens"] == 12 and events[-2]["choices"] == []
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == full["choices"][0]["message"]["content"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    comp = greedy(model="nolora", prompt="stream me", max_tokens=9)
    _, full = call(server, "POST", "/v1/completions", comp)
    events = Client(server).sse("/v1/completions", comp)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full["choices"][0]["text"]


def test_stop_strings_over_http(server):
    _, full = call(
        server, "POST", "/v1/completions", greedy(model="lora", prompt="ab", max_tokens=12)
    )
    text = full["choices"][0]["text"]
    stop = text[4:6]
    body = greedy(model="lora", prompt="ab", max_tokens=12, stop=stop)
    _, cut = call(server, "POST", "/v1/completions", body)
    assert cut["choices"][0] == {
        **cut["choices"][0],
        "text": text[: text.index(stop)],
        "finish_reason": "stop",
    }


def test_unknown_model_is_404_with_the_known_names(server):
    status, body = call(server, "POST", "/v1/completions", {"model": "nope", "prompt": "a"})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    for name in (BASE, "nora", "lora", "wide"):
        assert name in body["error"]["message"]


@pytest.mark.parametrize("name", ["../nora", "a/b", "/etc/passwd", "..", "nora\\x", "..nora"])
def test_names_with_path_parts_are_refused(server, name):
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {"model": name, "prompt": "a", "messages": [{"role": "user", "content": "a"}]}
        status, resp = call(server, "POST", path, body)
        assert status == 400 and "invalid adapter name" in resp["error"]["message"]
    status, resp = call(server, "POST", "/v1/adapters/load", {"name": name})
    assert status == 400


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be an object"),
        ({"prompt": "a"}, 400, "'model' is required"),
        ({"model": BASE, "prompt": "a" * 101}, 400, "at most 100"),
        ({"model": BASE, "prompt": "a", "max_tokens": 301}, 400, "exceeds this server's limit"),
        ({"model": BASE, "prompt": "a", "max_tokens": "9"}, 400, "max_tokens"),
        ({"model": BASE, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": BASE, "prompt": "a" * 100, "max_tokens": 300}, 400, "context length"),
        ({"model": BASE, "prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"model": BASE, "prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"model": BASE, "prompt": "a", "n": 99}, 400, "n must be an integer in [1, 16]"),
        ({"model": BASE, "prompt": "a", "frobnicate": 1}, 400, "unsupported fields: frobnicate"),
        ({"model": BASE, "prompt": 5}, 400, "'prompt' must be"),
        ({"model": BASE, "prompt": ""}, 400, "empty"),
        ({"model": BASE, "prompt": [1, 99999]}, 400, "token ids"),
        ({"model": BASE, "prompt": "a", "stream": "yes"}, 400, "'stream' must be a boolean"),
        ({"model": BASE, "prompt": "a", "stop": [""]}, 400, "stop"),
        (b'{"model": "x", "prompt": "' + b"a" * 30_000 + b'"}', 413, "exceeds 20000 bytes"),
    ],
)
def test_bad_input_is_refused_with_a_reason(server, body, status, fragment):
    raw = body if isinstance(body, bytes) else None
    got, resp = call(server, "POST", "/v1/completions", None if raw else body, raw=raw)
    assert got == status and fragment in resp["error"]["message"], resp


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "non-empty list"),
        ([{"role": "wizard", "content": "a"}], "role"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
    ],
)
def test_bad_chat_messages(server, messages, fragment):
    status, resp = call(
        server, "POST", "/v1/chat/completions", {"model": BASE, "messages": messages}
    )
    assert status == 400 and fragment in resp["error"]["message"]


def test_load_and_unload_endpoints(server):
    status, body = call(server, "POST", "/v1/adapters/load", {"name": "loran"})
    assert status == 200 and body["loaded"] and body["method"] == "loran"
    _, models = call(server, "GET", "/v1/models")
    assert {m["id"]: m["loaded"] for m in models["data"]}["loran"] is True
    status, body = call(server, "POST", "/v1/adapters/load", {"name": "wide"})
    assert status == 400
    assert "model expects shape (2, 32), file has (2, 48)" in body["error"]["message"]
    status, body = call(server, "POST", "/v1/completions", {"model": "wide", "prompt": "a"})
    assert status == 400 and "refused" in body["error"]["message"]
    status, body = call(server, "POST", "/v1/adapters/unload", {"name": "loran"})
    assert status == 200 and body == {"name": "loran", "loaded": False}
    status, body = call(server, "POST", "/v1/adapters/unload", {"name": "loran"})
    assert status == 404
    status, body = call(server, "POST", "/v1/adapters/load", {"name": "ghost"})
    assert status == 404 and "nora" in body["error"]["message"]


def test_concurrent_clients_are_batched_across_adapters(server, root, tok):
    server.engine.stats.max_running = 0
    prefills = server.engine.stats.prefills
    jobs = [("hello", "nora"), ("abc", "lora"), ("xyz", None), ("fox", "aurora"), ("q", "nolora")]
    results: dict[int, dict] = {}
    barrier = threading.Barrier(len(jobs))

    def client(i, prompt, adapter):
        barrier.wait()
        body = greedy(model=adapter or BASE, prompt=prompt, max_tokens=10)
        results[i] = call(server, "POST", "/v1/completions", body)

    with StepGate(server.engine) as gate:
        threads = [threading.Thread(target=client, args=(i, *j)) for i, j in enumerate(jobs)]
        for t in threads:
            t.start()
        gate.wait_submitted(len(jobs))  # all queued before the first step: one batch
        gate.release()
        for t in threads:
            t.join(TIMEOUT)
    assert server.engine.stats.max_running == len(jobs)
    assert server.engine.stats.prefills == prefills + 1  # all five in one batch
    for i, (prompt, adapter) in enumerate(jobs):
        status, body = results[i]
        ref = hf_generate(root, tok, prompt, adapter, 10, do_sample=False)
        assert status == 200 and body["choices"][0]["text"] == tok.decode(
            ref, skip_special_tokens=True
        )


def test_client_disconnect_mid_stream_frees_its_slot(server):
    engine, store = server.engine, server.engine.store
    with StepGate(engine) as gate:
        sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
        body = json.dumps(greedy(model="nora", prompt="go", max_tokens=250, stream=True)).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        (req,) = gate.wait_submitted(1)
        while not req.text:  # step until some text has been streamed
            gate.run(1)
        got = b""
        while b"data: " not in got:  # the client has it
            got += sock.recv(4096)
        assert engine.running == 1 and store.pins("nora") == 1 and engine.rows == [req]
        status, resp = call(server, "POST", "/v1/adapters/unload", {"name": "nora"})
        assert status == 409 and "in use" in resp["error"]["message"]
        sock.close()
        assert gate.cancelled.wait(TIMEOUT)  # the server saw the client leave
        gate.run(1)  # the next step frees the row
        assert engine.running == 0 and store.pins("nora") == 0
    assert req.finish_reason == "cancelled" and len(req.output_ids) < 250
    status, _ = call(server, "GET", "/health")
    assert status == 200


def test_client_disconnect_while_waiting_for_a_full_answer(server):
    engine = server.engine
    with StepGate(engine) as gate:
        sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
        body = json.dumps(greedy(model="lora", prompt="go", max_tokens=250)).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        (req,) = gate.wait_submitted(1)
        gate.run(1)  # admitted and prefilled: it holds a row
        assert engine.running == 1 and engine.rows == [req]
        sock.close()
        assert gate.cancelled.wait(TIMEOUT)  # the server saw the client leave
        gate.run(1)
        assert engine.running == 0 and engine.store.pins("lora") == 0
    assert req.finish_reason == "cancelled" and len(req.output_ids) < 250


def test_chat_without_max_tokens_gets_what_the_context_leaves(server):
    chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    status, body = call(server, "POST", "/v1/chat/completions", {**chat, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 256  # the engine's max_model_len


def test_load_server_from_a_model_folder(root, tok, tmp_path):
    """What `nora serve --base FOLDER --adapters DIR` runs, short of uvicorn.run."""
    folder = tmp_path / "my-base"
    tiny_llama().save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = ServeConfig(base=str(folder), adapters_dir=str(root), preload=["lora"], max_resident=2)
    app, engine = load_server(cfg)
    assert engine.store.resident() == ["lora"] and engine.store.max_resident == 2
    engine.start()
    try:
        with ServerThread(app) as srv:
            _, models = call(srv, "GET", "/v1/models")
            assert models["data"][0]["id"] == "my-base"
            body = greedy(model="lora", prompt="hey", max_tokens=5)
            status, out = call(srv, "POST", "/v1/completions", body)
            assert status == 200 and out["usage"]["completion_tokens"] == 5
    finally:
        engine.stop()


def test_bad_server_options_are_refused_before_serving():
    def check_options(**opts):
        ServeConfig(**opts).validate()

    check_options(max_n=1, request_timeout=0.5, max_tokens_limit=8, default_max_tokens=8)
    for bad, msg in [
        ({"max_n": 0}, "max_n must be an integer >= 1"),
        ({"max_n": 2.5}, "max_n must be an integer"),
        ({"request_timeout": 0}, "request_timeout must be a number of seconds > 0"),
        ({"retry_after": float("nan")}, "retry_after must be"),
        ({"max_waiting": -1}, "max_waiting must be >= 0"),
        ({"max_tokens_limit": 8, "default_max_tokens": 9}, "default_max_tokens .9. is above"),
        ({"max_tokens_limit": 100}, r"default_max_tokens \(256\) is above"),  # the default
        ({"retry_after": float("inf")}, "retry_after must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_options(**bad)


def test_answers_are_what_the_protocol_models_describe(server):
    from nora.serving.openai import protocol as P

    msgs = [{"role": "user", "content": "hi"}]
    for path, body, model in [
        ("/v1/completions", greedy(model="nora", prompt="hi", max_tokens=4, logprobs=2, n=2),
         P.CompletionResponse),
        ("/v1/chat/completions", greedy(model="lora", messages=msgs, max_tokens=4, logprobs=True,
                                        top_logprobs=1), P.ChatCompletionResponse),
    ]:  # fmt: skip
        status, out = call(server, "POST", path, body)
        assert status == 200
        assert model.model_validate(out).model_dump(exclude_unset=True) == out
    events = Client(server).sse(
        "/v1/chat/completions", greedy(model="lora", messages=msgs, max_tokens=3)
    )
    for e in events[:-1]:
        P.ChatCompletionChunk.model_validate(e)
    status, out = call(server, "GET", "/v1/models")
    P.ModelList.model_validate(out)
    status, out = call(server, "POST", "/v1/completions", {"model": BASE, "prompt": "a", "n": 0})
    assert status == 400 and P.ErrorResponse.model_validate(out).error.param == "n"
