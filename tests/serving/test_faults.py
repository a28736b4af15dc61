"""Faults stay local: none takes the server down or changes another request's output.

Adapter folders deleted or corrupted while resident and while loading, a full disk while
loading, a client that leaves mid-stream, a generation that raises (in a shared prefill, in
a shared decode step, streamed), SIGTERM during a stream (a real process, exit status 0).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from nora.checkpoint import WEIGHTS_NAME
from nora.serving import SamplingParams
from serving.common import (
    BASE,
    SPECS,
    Client,
    greedy,
    hf_generate,
    make_dir,
    paced,
    serving,
    wait_for,
)

SRC = Path(__file__).parents[2] / "src"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("adapters"), SPECS)


@pytest.fixture
def root(adapters, tmp_path):
    """A fresh copy per test: these tests delete and damage adapter folders."""
    return shutil.copytree(adapters, tmp_path / "adapters")


def ref(adapters, tok, prompt, adapter, n):
    ids = hf_generate(adapters, tok, prompt, adapter, n, do_sample=False)
    return tok.decode(ids, skip_special_tokens=True)


def text(resp):
    status, _, out = resp
    assert status == 200, out
    return out["choices"][0]["text"]


def complete(c, adapter, prompt="hello", n=10):
    return c.post("/v1/completions", greedy(model=adapter, prompt=prompt, max_tokens=n))


# ---------------------------------------------------------------------- adapter folders


def test_folder_deleted_or_corrupted_while_resident(root, adapters, tok):
    with serving(root, tok) as srv:
        c = Client(srv)
        before = {a: text(complete(c, a)) for a in ("nora", "lora")}
        shutil.rmtree(root / "nora")  # deleted...
        (root / "lora" / WEIGHTS_NAME).write_bytes(b"\x00garbage")  # ...and corrupted
        for a in ("nora", "lora"):  # resident weights are in memory: served as before
            assert text(complete(c, a)) == before[a] == ref(adapters, tok, "hello", a, 10)
        assert text(complete(c, "aurora")) == ref(adapters, tok, "hello", "aurora", 10)
        for a in ("nora", "lora"):
            assert c.post("/v1/adapters/unload", {"name": a})[0] == 200
        status, _, out = complete(c, "nora")  # gone from disk and memory: a missing model
        assert status == 404 and "'nora' does not exist" in out["error"]["message"]
        status, _, out = complete(c, "lora")
        assert status == 400 and "truncated or corrupted" in out["error"]["message"]
        assert "lora" not in srv.engine.store.resident()
        assert text(complete(c, "loran")) == ref(adapters, tok, "hello", "loran", 10)


@pytest.mark.parametrize(
    "fault, status, fragment",
    [
        (lambda p: shutil.rmtree(p), 404, "'aurora' does not exist"),  # deleted while loading
        (
            lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:100]),
            400,
            "truncated or corrupted",
        ),  # fmt: skip
        ("enospc", 503, "No space left on device"),  # a full disk under the read
    ],
)
def test_folder_failing_while_loading_leaves_the_resident_set_alone(
    root, adapters, tok, fault, status, fragment
):
    with serving(root, tok, max_resident=2) as srv:
        c, store = Client(srv), srv.engine.store
        for a in ("nora", "lora"):
            assert c.post("/v1/adapters/load", {"name": a})[0] == 200
        prepare = store.multi.prepare

        def failing_prepare(name, path):  # the fault strikes between the checks and the read
            if name == "aurora":
                if fault == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                fault(Path(path))
            return prepare(name, path)

        store.multi.prepare = failing_prepare
        for path, body in [("/v1/completions", greedy(model="aurora", prompt="a")),
                           ("/v1/adapters/load", {"name": "aurora"})]:  # fmt: skip
            got, headers, out = c.post(path, body)
            assert got == status and fragment in out["error"]["message"], out
            assert ("retry-after" in headers) == (status == 503)
            assert store.resident() == ["nora", "lora"] and store.evictions == 0
        for a in ("nora", "lora"):  # nothing was evicted for the failed load; all still right
            assert text(complete(c, a)) == ref(adapters, tok, "hello", a, 10)
        store.multi.prepare = prepare
        if fault == "enospc":  # the disk recovers: the same adapter loads
            assert text(complete(c, "aurora")) == ref(adapters, tok, "hello", "aurora", 10)
        assert Client(srv).call("GET", "/health")[0] == 200


# ---------------------------------------------------------------------- clients and generation


def test_a_client_leaving_mid_stream_does_not_touch_other_requests(adapters, tok):
    with serving(adapters, tok) as srv, paced(srv.engine):
        sock = socket.create_connection((srv.host, srv.port), timeout=10)
        body = json.dumps(greedy(model="nora", prompt="go", max_tokens=250, stream=True)).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + body)
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(4096)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=complete(Client(srv), "lora", n=30)))
        t.start()
        wait_for(lambda: srv.engine.running == 2, what="both requests in the batch")
        sock.close()  # leaves while the other request decodes in the same batch
        t.join(60)
        wait_for(lambda: srv.engine.running == 0 and srv.engine.store.pins("nora") == 0)
    assert text(result["r"]) == ref(adapters, tok, "hello", "lora", 30)


def poison(engine, adapter, when="always"):
    """Make every forward that includes `adapter`'s rows raise (when: 'always' | 'decode')."""
    multi, forward = engine.multi, engine.multi.forward
    uid = multi.adapters[adapter].uid

    def broken(ids, row_uids, **kw):
        if uid in row_uids and (when == "always" or ids.shape[1] == 1):
            raise RuntimeError(f"injected fault in {adapter}")
        return forward(ids, row_uids=row_uids, **kw)

    multi.forward = broken
    return lambda: setattr(multi, "forward", forward)


@pytest.mark.parametrize("when", ["always", "decode"])
def test_a_generation_that_raises_fails_only_its_request(adapters, tok, when):
    # The requests are queued before the engine starts, so they share one prefill and then
    # every decode step: a fault in either is a fault in a batch with the good requests.
    with serving(adapters, tok, start=False) as srv:
        c, results = Client(srv), {}
        for a in ("nolora", "nora", "lora"):
            assert c.post("/v1/adapters/load", {"name": a})[0] == 200
        restore = poison(srv.engine, "nolora", when)
        jobs = {"bad": ("nolora", "hey"), "good1": ("nora", "hello"), "good2": ("lora", "abc")}

        def run(key, adapter, prompt):
            results[key] = complete(Client(srv), adapter, prompt, n=12)

        threads = [threading.Thread(target=run, args=(k, *j)) for k, j in jobs.items()]
        for t in threads:
            t.start()
        wait_for(lambda: len(srv.engine.waiting) == 3, what="three queued requests")
        srv.engine.start()
        for t in threads:
            t.join(60)
        status, _, out = results["bad"]
        assert status == 500 and "injected fault in nolora" in out["error"]["message"]
        assert out["error"]["type"] == "server_error"
        for key in ("good1", "good2"):
            adapter, prompt = jobs[key]
            assert text(results[key]) == ref(adapters, tok, prompt, adapter, 12)
        # one shared prefill (decode faults), or one failed and then one per row
        assert srv.engine.stats.prefills == (1 if when == "decode" else 2)
        events = c.sse("/v1/completions", greedy(model="nolora", prompt="x", max_tokens=5))
        assert "injected fault" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        restore()
        assert text(complete(c, "nolora", "hey", 12)) == ref(adapters, tok, "hey", "nolora", 12)
        assert srv.engine.alive and c.call("GET", "/health")[0] == 200


# ---------------------------------------------------------------------- SIGTERM


SERVER = """
import socket, sys, time
sys.path.insert(0, {tests!r})
import torch
from conftest import tiny_llama
from serving.common import char_tokenizer
from nora.serving import AdapterStore, Engine, MultiAdapterModel, ServeConfig, create_app
from nora.serving.launch import run

torch.set_num_threads(1)
store = AdapterStore(MultiAdapterModel(tiny_llama()), {root!r}, max_resident=4)
engine = Engine(store.multi, char_tokenizer(), store, max_batch=8, max_model_len=256)
decode = engine._decode
def slow():
    time.sleep(0.02)
    decode()
engine._decode = slow
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
run(create_app(engine, {base!r}), engine, ServeConfig(grace=30, log_level="warning"), sock=sock)
print("exited cleanly", flush=True)
"""


def test_sigterm_during_a_stream_drains_it_and_exits_0(adapters, tok, tmp_path):
    script = tmp_path / "server.py"
    tests = str(Path(__file__).parents[1])
    script.write_text(textwrap.dedent(SERVER.format(tests=tests, root=str(adapters), base=BASE)))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        port = int(proc.stdout.readline())
        conn = None

        def connect():
            nonlocal conn
            with contextlib.suppress(ConnectionRefusedError):  # bound; listening soon
                conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            return conn is not None

        wait_for(connect, timeout=60, what="the server to listen")
        body = json.dumps(greedy(model="nora", prompt="go", max_tokens=60, stream=True)).encode()
        conn.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while got.count(b"data: ") < 3:
            got += conn.recv(4096)
        proc.send_signal(signal.SIGTERM)
        while b"[DONE]" not in got:  # the stream runs to its end
            chunk = conn.recv(65536)
            assert chunk, "the stream was cut"
            got += chunk
        conn.close()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read().strip() == "exited cleanly"
    finally:
        proc.kill()
    events = [json.loads(e[6:]) for e in got.decode().split("\r\n") if e.startswith("data: {")]
    streamed = "".join(e["choices"][0]["text"] for e in events)
    assert streamed == ref(adapters, tok, "go", "nora", 60)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(OSError):  # and it no longer listens
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_sampling_that_raises_fails_only_its_request(adapters, tok):
    # Guarded per request after the batched forward: here the logit shaping of one request
    # (the one with a presence penalty) raises; its batch mates decode on, unchanged.
    with serving(adapters, tok, start=False) as srv:
        engine, shape = srv.engine, srv.engine.sampler.shape

        def broken(params, output_ids, z):
            if params.presence_penalty == 0.5:
                raise ValueError("injected sampling fault")
            return shape(params, output_ids, z)

        engine.sampler.shape = broken
        bad = engine.submit("hey", "nolora", SamplingParams(max_tokens=8, presence_penalty=0.5))
        good = engine.submit("hello", "nora", SamplingParams(max_tokens=12, ignore_eos=True))
        engine.run_until_idle()
        assert bad.finish_reason == "error" and "injected sampling fault" in bad.error
        assert good.text == ref(adapters, tok, "hello", "nora", 12)
        assert engine.store.pins("nolora") == 0 and engine.running == 0
