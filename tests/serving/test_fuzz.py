"""Fuzz the HTTP API with schemathesis, from the server's own OpenAPI schema (generated from
the protocol models): a few hundred generated requests, valid and invalid, to every
operation, on a server without keys and on one with keys. No answer is a 5xx, every 4xx names
the field it refuses (`error.param`; a body that is not JSON, one over the size limit and a
refused key concern no field), and afterwards the server answers a greedy probe exactly as
before. With keys, each request carries one of five credentials (admin, two tenants, an
unknown key, none): a missing or unknown key gets 401 and nothing else but /health, a known
key never gets 401, and no tenant is answered by an adapter it may not use."""

from __future__ import annotations

import collections
import os
import time

import pytest
from conftest import tiny_llama
from hypothesis import HealthCheck, given, settings

from nora.serving import AdapterStore, Engine, MultiAdapterModel, ServeConfig, create_app
from nora.serving.tenants import Keys
from serving.common import SPECS, make_dir

schemathesis = pytest.importorskip("schemathesis")  # the `test` extra installs it
from schemathesis import GenerationMode  # noqa: E402

# per operation (5) and mode: 400 requests in CI; benchmarks/fuzz_api.py sets more
N = int(os.environ.get("NORA_FUZZ_EXAMPLES", "40"))
EXAMPLES = {"positive": N, "negative": N}
PROBE = {"model": "nora", "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
# 4xx that concern no field: a body over the size limit, a body that is not JSON at all
NO_FIELD = {413}
NOT_JSON = ("malformed JSON body", "the JSON body must be an object")
MODELS = ["base", "nora", "lora", "aurora"]  # steers valid bodies to models that exist
# keys on: (key sent, the tenant's adapters or None for a refused key; admin: every adapter)
ADMIN = "sk-fuzz-admin-0"
KEYS = {
    "keys": [
        {"key": ADMIN, "tenant": "ops", "admin": True},
        {"key": "sk-fuzz-acme-0", "tenant": "acme", "adapters": ["nora", "lora"], "load": True},
        {"key": "sk-fuzz-beta-0", "tenant": "beta", "adapters": ["aurora"], "base": False},
    ]
}
CREDENTIALS = [
    (ADMIN, set(MODELS)),
    ("sk-fuzz-acme-0", {"base", "nora", "lora"}),
    ("sk-fuzz-beta-0", {"aurora"}),
    ("sk-fuzz-unknown", None),
    (None, None),
]
OPEN_PATHS = {"/health", "/openapi.json"}  # answered without a key


@pytest.fixture(scope="module", params=["no keys", "keys"])
def app(request, tmp_path_factory, tok):
    root = make_dir(tmp_path_factory.mktemp("adapters"), SPECS)
    store = AdapterStore(MultiAdapterModel(tiny_llama()), root, max_resident=2)
    engine = Engine(store.multi, tok, store, max_batch=8, max_model_len=128).start()
    cfg = ServeConfig(max_tokens_limit=4, default_max_tokens=4, max_prompt_tokens=48, max_n=2)
    keys = Keys.parse(KEYS, "fuzz") if request.param == "keys" else None
    yield create_app(engine, "base", cfg, keys=keys), keys is not None
    engine.stop()


@pytest.mark.slow  # about 40 s per mode on 2 CPU cores; .ci/run runs it
def test_generated_requests_get_no_5xx_and_every_4xx_names_its_field(app):
    app, keyed = app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    probe = schema.find_operation_by_path("POST", "/v1/completions")
    admin = {"Authorization": f"Bearer {ADMIN}"} if keyed else None
    before = probe.Case(body=PROBE).call(headers=admin)
    assert before.status_code == 200, before.text
    seen: collections.Counter = collections.Counter()
    bad: list[str] = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in ops} >= {
        ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
        ("POST", "/v1/adapters/load"), ("POST", "/v1/adapters/unload"),
    }  # fmt: skip
    for op in ops:
        for mode, n in EXAMPLES.items():
            if mode == "negative" and not list(op.body):
                continue  # a GET has no body to make invalid
            t0, k = time.perf_counter(), sum(seen.values())
            fuzz(op, GenerationMode(mode), n, seen, bad, keyed)()
            print(f"{op.method.upper()} {op.path} {mode}: {sum(seen.values()) - k} requests, "
                  f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    total = sum(seen.values())
    mode = "keys on" if keyed else "no keys"
    print(f"schemathesis, {mode}: {total} requests, by status {dict(sorted(seen.items()))}")
    assert total >= 300 and not bad, "\n".join(bad[:20])
    assert seen[200] >= 10 and seen[400] > 0  # both answered and refused requests were made
    assert not keyed or (seen[401] > 0 and seen[403] > 0)  # refused keys and rights were met
    after = probe.Case(body=PROBE).call(headers=admin)
    assert after.status_code == 200 and after.json()["choices"] == before.json()["choices"]


def fuzz(op, mode, n: int, seen: collections.Counter, bad: list[str], keyed: bool):
    """A hypothesis test: n generated requests to `op`, each answer checked."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def one(case):
        i = sum(seen.values())  # requests so far: every (model, credential) pair in 20 cases
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            for field in ("model", "name"):  # completions name a model, load / unload a name
                if field in case.body:
                    case.body[field] = MODELS[i % len(MODELS)]
        key, may_use = CREDENTIALS[(i // len(MODELS)) % len(CREDENTIALS)] if keyed else (0, 0)
        resp = case.call(headers={"Authorization": f"Bearer {key}"} if key else None)
        code = resp.status_code
        seen[code] += 1
        json_ = resp.headers.get("content-type", [""])[0].startswith("application/json")
        err = resp.json().get("error") if json_ else None
        where = f"{op.method.upper()} {op.path} {case.body!r:.200} key={key} -> {code}"
        if code >= 500:
            bad.append(f"{where}: {resp.text[:200]}")
        elif keyed and may_use is None and op.path not in OPEN_PATHS:
            if code not in (401, 413):  # a body over the limit is refused before the key
                bad.append(f"{where}: a refused key must get 401")
        elif keyed and code == 401:
            bad.append(f"{where}: a known key got 401")
        elif keyed and code == 200 and isinstance(case.body, dict):
            asked = case.body.get("model", case.body.get("name"))
            if op.path.startswith("/v1/") and isinstance(asked, str) and asked not in may_use:
                bad.append(f"{where}: answered by (or loaded) an adapter this key may not use")
        elif 400 <= code < 500 and code not in NO_FIELD and not (keyed and code == 403):
            if not (err and (err.get("param") or err["message"].startswith(NOT_JSON))):
                bad.append(f"{where}: no param in {err}")

    return one
