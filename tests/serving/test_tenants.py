"""Tenants and keys, overload (queue, rate limits, time limits), draining, metrics."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nora.serving.tenants import KeyConfigError, Keys, exposure_warning, load_keys
from serving.common import (
    BASE,
    SPECS,
    Client,
    greedy,
    hf_generate,
    make_dir,
    make_server,
    paced,
    serving,
    wait_for,
)

ACME, BETA, OPS = "sk-acme-0123456789", "sk-beta-0123456789", "sk-ops-00123456789"
KEYS = {
    "keys": [
        {"key": ACME, "tenant": "acme", "adapters": ["nora", "lora"], "load": True},
        {"key": BETA, "tenant": "beta", "adapters": ["aurora", "lor?n"], "base": False},
        {"key": OPS, "tenant": "ops", "admin": True},
    ]
}


# ---------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("adapters"), SPECS)


@pytest.fixture(scope="module")
def server(root, tok):
    with serving(root, tok, keys=Keys.parse(KEYS, "test")) as srv:
        yield srv


def models(srv, key):
    status, _, body = Client(srv, key).call("GET", "/v1/models")
    assert status == 200, body
    return [m["id"] for m in body["data"]]


# ---------------------------------------------------------------------- keys and tenants


def test_requests_need_a_known_key(server):
    for key in (None, "sk-wrong-0123456789", ACME[:-1], ACME + "x"):
        c = Client(server, key)
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", {"model": "nora", "prompt": "a"}),
            ("POST", "/v1/adapters/load", {"name": "nora"}),
            ("GET", "/metrics", None),
        ]:
            status, _, out = c.call(method, path, body)
            assert status == 401 and out["error"]["type"] == "authentication_error", (key, path)
    status, _, out = Client(server).call("GET", "/health")  # liveness needs no key...
    assert status == 200 and out["status"] == "ok" and "resident" not in out  # ...and tells little
    _, _, out = Client(server, OPS).call("GET", "/health")
    assert "resident" in out and "stats" in out


def test_models_lists_only_what_the_key_may_use(server):
    assert models(server, ACME) == [BASE, "lora", "nora"]
    assert models(server, BETA) == ["aurora", "loran"]  # base: false; "lor?n" is a pattern
    assert models(server, OPS) == [BASE, "aurora", "lora", "loran", "nolora", "nora"]


def test_another_tenants_adapter_answers_like_a_missing_one(server):
    acme, beta = Client(server, ACME), Client(server, BETA)
    for client, theirs in [(acme, "aurora"), (acme, "nolora"), (beta, "nora"), (beta, BASE)]:
        for path, field in [("/v1/completions", "model"), ("/v1/adapters/load", "name")]:
            body = {"model": theirs, "prompt": "a"} if field == "model" else {"name": theirs}
            s1, h1, forbidden = client.post(path, body)
            ghost = {k: "ghost" if v == theirs else v for k, v in body.items()}
            s2, h2, missing = client.post(path, ghost)
            assert s1 == s2 == 404 and h1 == h2 | {"content-length": h1["content-length"]}
            assert json.dumps(forbidden).replace(theirs, "X") == json.dumps(missing).replace(
                "ghost", "X"
            )
            listed = forbidden["error"]["message"].split("known models: ")[1].split(", ")
            assert listed == models(server, client.key)  # only the names this key may use


def test_a_tenant_uses_its_adapters_and_the_answer_is_right(server, root, tok):
    for key, adapter in [(ACME, "nora"), (ACME, None), (BETA, "loran")]:
        body = greedy(model=adapter or BASE, prompt="hey", max_tokens=8)
        status, _, out = Client(server, key).post("/v1/completions", body)
        ref = hf_generate(root, tok, "hey", adapter, 8, do_sample=False)
        assert status == 200 and out["choices"][0]["text"] == tok.decode(ref)


def test_load_and_unload_rights(server):
    acme, beta, ops = Client(server, ACME), Client(server, BETA), Client(server, OPS)
    status, _, out = beta.post("/v1/adapters/load", {"name": "aurora"})  # may use, not load
    assert status == 403 and out["error"]["type"] == "permission_error"
    status, _, out = beta.post("/v1/adapters/unload", {"name": "aurora"})
    assert status == 403
    status, _, out = acme.post("/v1/adapters/load", {"name": "lora"})
    assert status == 200 and out["loaded"] and out["name"] == "lora"
    status, _, out = acme.post("/v1/adapters/unload", {"name": "lora"})
    assert status == 200 and out == {"name": "lora", "loaded": False}
    status, _, _ = acme.post("/v1/adapters/unload", {"name": "aurora"})  # not theirs: as missing
    assert status == 404
    for name in ("nolora", "aurora"):
        assert ops.post("/v1/adapters/load", {"name": name})[0] == 200
    status, _, out = acme.post("/v1/adapters/unload", {"name": "lora"})  # acme's, not loaded
    assert status == 404 and "aurora" not in out["error"]["message"]  # no leak of others
    assert ops.post("/v1/adapters/unload", {"name": "nolora"})[0] == 200


def test_the_official_openai_client_with_keys(server, root, tok):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ACME, max_retries=0)
    assert [m.id for m in client.models.list()] == [BASE, "lora", "nora"]
    out = client.completions.create(
        model="lora", prompt="abc", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == tok.decode(
        hf_generate(root, tok, "abc", "lora", 6, do_sample=False)
    )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="aurora", prompt="abc", max_tokens=2)
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-nope-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_keys_never_reach_logs_or_reprs(root, tok, caplog, capfd):
    keys = Keys.parse(KEYS, "test")
    assert all(k not in repr(keys) for k in (ACME, BETA, OPS))
    assert ACME not in repr(keys.lookup(ACME)) and repr(keys.lookup(ACME)) == "Tenant('acme')"
    caplog.set_level(logging.DEBUG)
    with serving(root, tok, keys=keys) as srv:
        for key in (ACME, BETA, OPS, "sk-guess-0123456789", ACME[:-1]):
            c = Client(srv, key)
            c.call("GET", "/v1/models")
            c.post("/v1/completions", {"model": "nora", "prompt": "a", "max_tokens": 2})
            c.post("/v1/adapters/load", {"name": "aurora"})
            c.call("GET", "/metrics")
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "unknown API key" in logged  # refusals are logged...
    for key in (ACME, BETA, OPS, "sk-guess-0123456789", ACME[:-1]):
        assert key not in logged  # ...without the key


def test_every_key_is_compared_in_constant_time(monkeypatch):
    import nora.serving.tenants as tenants

    keys = Keys.parse(KEYS, "test")
    calls = []
    real = tenants.hmac.compare_digest
    monkeypatch.setattr(
        tenants.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b)
    )
    for key in (ACME, OPS, "sk-nope", "", None):
        calls.clear()
        keys.lookup(key)
        # one comparison per entry whichever entry matches (no early exit), equal lengths
        assert calls == [(32, 32)] * 3
    assert keys.lookup(OPS).name == "ops" and keys.lookup("sk-nope") is None


def test_key_files_and_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps(KEYS))
    assert load_keys(f).lookup(BETA).name == "beta"
    monkeypatch.delenv("NORA_API_KEYS", raising=False)
    monkeypatch.delenv("NORA_API_KEY", raising=False)
    assert load_keys() is None
    monkeypatch.setenv("NORA_API_KEYS", json.dumps(KEYS["keys"][:1]))
    monkeypatch.setenv("NORA_API_KEY", "sk-admin-from-env")
    keys = load_keys()
    assert keys.lookup(ACME).name == "acme" and keys.lookup("sk-admin-from-env").admin
    bad = [
        ('{"keys": [{"key": "' + ACME + '", "tenant": "a"', "not valid JSON"),
        ({"keys": [{"key": "short"}]}, "at least 8 characters"),
        ({"keys": [{"key": ACME}, {"key": ACME}]}, "the same key appears twice"),
        ({"keys": [{"key": ACME, "adapters": [3]}]}, "'adapters' must be"),
        ({"keys": [{"key": ACME, "rate": -1}]}, "'rate' must be > 0"),
        ({"keys": [{"key": ACME, "rate": 1, "burst": 0.5}]}, "'burst' must be >= 1"),
        ({"keys": [{"key": ACME, "admin": "yes"}]}, "must be true or false"),
        ({"keys": [{"key": ACME, "tenat": "x"}]}, "unknown fields ['tenat']"),
        ({"keys": []}, "at least one key"),
    ]
    for content, fragment in bad:
        f.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(KeyConfigError, match=".") as e:
            load_keys(f)
        assert fragment in str(e.value) and ACME not in str(e.value)
    with pytest.raises(KeyConfigError, match="cannot read"):
        load_keys(tmp_path / "missing.json")


def test_no_keys_is_open_on_loopback_and_warned_elsewhere(root, tok):
    assert exposure_warning(None, "127.0.0.1") is None and exposure_warning(None, "::1") is None
    assert "anyone who reaches it" in exposure_warning(None, "0.0.0.0")
    assert exposure_warning(Keys.parse(KEYS, "t"), "0.0.0.0") is None
    with serving(root, tok) as srv:  # today's behaviour: no key needed, everything allowed
        assert models(srv, None) == [BASE, "aurora", "lora", "loran", "nolora", "nora"]
        assert Client(srv).post("/v1/adapters/load", {"name": "aurora"})[0] == 200
        assert Client(srv).call("GET", "/metrics")[0] == 200


# ---------------------------------------------------------------------- overload


def test_rate_limit_is_429_with_retry_after(root, tok):
    keys = Keys.parse({"keys": [{"key": ACME, "adapters": ["*"], "rate": 0.01, "burst": 2}]}, "t")
    with serving(root, tok, keys=keys) as srv:
        c = Client(srv, ACME)
        body = greedy(model=BASE, prompt="a", max_tokens=2)
        assert [c.post("/v1/completions", body)[0] for _ in range(2)] == [200, 200]
        status, headers, out = c.post("/v1/completions", body)
        assert status == 429 and out["error"]["type"] == "rate_limit_error"
        assert 1 <= int(headers["retry-after"]) <= 100  # 1 request at 0.01/s: <= 100 s
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=ACME, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=BASE, prompt="a", max_tokens=2)


def test_a_full_queue_is_503_with_retry_after(root, tok):
    # The engine is not started: the first request waits in the queue (max_waiting = 1).
    with serving(root, tok, max_waiting=1, start=False) as srv:
        c, first = Client(srv), {}
        body = greedy(model="nora", prompt="a", max_tokens=3)
        t = threading.Thread(target=lambda: first.update(r=c.post("/v1/completions", body)))
        t.start()
        wait_for(lambda: len(srv.engine.waiting) == 1, what="the first request to queue")
        status, headers, out = c.post("/v1/completions", body)
        assert status == 503 and out["error"]["type"] == "overloaded_error"
        assert headers["retry-after"] == "1"
        status, _, out = c.post("/v1/completions", {**body, "n": 2})  # n rows count too
        assert status == 503
        # With completions lately, Retry-After is the queue ahead over their rate: here 2
        # requests finished in the last 5 s (0.4/s) and 1 waits, so (1 + 1) / 0.4 = 5 s.
        srv.server.api.metrics._recent.append((time.monotonic() - 5, 0, 0))
        srv.engine.stats.finished += 2
        status, headers, _ = c.post("/v1/completions", body)
        assert status == 503 and headers["retry-after"] in ("5", "6")
        srv.server.api.metrics._recent.clear()
        srv.engine.start()
        t.join(30)
        assert first["r"][0] == 200 and c.post("/v1/completions", body)[0] == 200


def test_no_free_adapter_slot_is_503_with_retry_after(root, tok):
    with serving(root, tok, max_resident=1) as srv, paced(srv.engine):
        c = Client(srv)
        done = {}
        long = greedy(model="nora", prompt="a", max_tokens=200)
        t = threading.Thread(target=lambda: done.update(r=c.post("/v1/completions", long)))
        t.start()
        wait_for(lambda: srv.engine.running == 1, what="the long request to run")
        status, headers, out = c.post("/v1/completions", greedy(model="lora", prompt="a"))
        assert status == 503 and "in use" in out["error"]["message"] and "retry-after" in headers
        t.join(60)
        assert done["r"][0] == 200
        assert c.post("/v1/completions", greedy(model="lora", prompt="a"))[0] == 200


def test_the_per_request_time_limit(root, tok):
    with serving(root, tok, request_timeout=0.3) as srv, paced(srv.engine, 0.02):
        c = Client(srv)
        body = greedy(model="nora", prompt="a", max_tokens=250)
        t0 = time.monotonic()
        status, _, out = c.post("/v1/completions", body)
        assert status == 504 and out["error"]["type"] == "timeout_error"
        assert "0.3 s limit" in out["error"]["message"] and time.monotonic() - t0 < 5
        events = c.sse("/v1/completions", body)
        assert "0.3 s limit" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "timeout_error" and events[-2]["error"]["code"] == 504
        wait_for(lambda: srv.engine.running == 0 and srv.engine.store.pins("nora") == 0)
        assert c.post("/v1/completions", {**body, "max_tokens": 3})[0] == 200  # still serving


def test_drain_finishes_in_flight_streams_and_refuses_new_requests(root, tok):
    srv = make_server(root, tok)
    try:
        with paced(srv.engine, 0.02):
            c, got = Client(srv), {}
            body = greedy(model="nora", prompt="go", max_tokens=40)
            t = threading.Thread(target=lambda: got.update(ev=c.sse("/v1/completions", body)))
            t.start()
            wait_for(lambda: srv.engine.running == 1, what="the stream to start")
            srv.drain()  # what SIGTERM does
            assert srv.server.api.draining
            status, headers, out = Client(srv).call("GET", "/health")
            assert status == 503 and out["status"] == "draining"
            t.join(30)
        events = got["ev"]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert len("".join(e["choices"][0]["text"] for e in events[:-1])) == 40
        srv.thread.join(10)
        assert not srv.thread.is_alive()  # the server stopped once the stream was done
    finally:
        srv.stop()
        srv.engine.stop()


# ---------------------------------------------------------------------- metrics


def scrape(srv, key=OPS) -> dict:
    status, headers, text = Client(srv, key).call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics(root, tok):
    with serving(root, tok, keys=Keys.parse(KEYS, "t"), max_resident=2) as srv:
        acme = Client(srv, ACME)
        assert acme.call("GET", "/metrics")[0] == 403  # not an admin key
        for adapter, n in [("nora", 3), ("lora", 2), (BASE, 1)]:
            for _ in range(n):
                body = greedy(model=adapter, prompt="abc", max_tokens=5)
                assert acme.post("/v1/completions", body)[0] == 200
        acme.sse("/v1/completions", greedy(model="nora", prompt="abc", max_tokens=5))
        acme.post("/v1/completions", {"model": "aurora", "prompt": "a"})  # 404
        Client(srv, OPS).post("/v1/completions", greedy(model="aurora", prompt="a"))  # evicts
        req = "nora_requests_total"
        nora_ok = (req, (("adapter", "nora"), ("status", "200")))
        # a response reaches the client just before its row leaves the batch, and a stream
        # is counted once its last byte is sent: wait for both
        wait_for(lambda: srv.engine.running == 0 and scrape(srv).get(nora_ok) == 4)
        m = scrape(srv)
        assert m[(req, (("adapter", "nora"), ("status", "200")))] == 4
        assert m[(req, (("adapter", "lora"), ("status", "200")))] == 2
        assert m[(req, (("adapter", BASE), ("status", "200")))] == 1
        assert m[(req, (("adapter", "-"), ("status", "404")))] == 1  # names never leak as labels
        finished = 4 + 2 + 1 + 1
        assert m[("nora_time_to_first_token_seconds_count", ())] == finished
        assert m[("nora_time_per_output_token_seconds_count", ())] == finished
        assert m[("nora_generated_tokens_total", ())] == srv.engine.stats.generated_tokens
        assert m[("nora_batch_occupancy_count", ())] == srv.engine.stats.steps
        assert m[("nora_resident_adapters", ())] == 2
        assert m[("nora_adapter_loads_total", ())] == 3
        assert m[("nora_adapter_evictions_total", ())] == 1
        assert m[("nora_queue_length", ())] == 0 and m[("nora_running_requests", ())] == 0
        assert m[("nora_tokens_per_second", ())] > 0


def test_the_x_api_key_header_and_the_token_bucket(server):
    assert Client(server).call("GET", "/v1/models")[0] == 401
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("GET", "/v1/models", headers={"x-api-key": BETA})
    resp = conn.getresponse()
    assert resp.status == 200 and [m["id"] for m in json.loads(resp.read())["data"]] == [
        "aurora",
        "loran",
    ]
    conn.close()
    keys = Keys.parse({"keys": [{"key": ACME, "rate": 2.0}, {"key": BETA, "rate": 0.5}]}, "t")
    fast, slow = keys.lookup(ACME), keys.lookup(BETA)
    assert (fast.burst, slow.burst) == (2.0, 1.0)  # default burst: max(1, rate)
    assert fast.take() == 0.0 and fast.take() == 0.0 and fast.take() > 0  # a burst of 2
    assert slow.take() == 0.0 and 1.9 < slow.take() <= 2.0  # then one per 2 s


def test_nora_serve_refuses_a_bad_key_file_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from nora.cli import app

    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({"keys": [{"key": ACME}, {"key": ACME}]}))
    result = CliRunner().invoke(app, ["serve", "--api-keys", str(bad), "--adapters", str(tmp_path)])
    assert result.exit_code == 2 and "the same key appears twice" in result.output
    assert ACME not in result.output
