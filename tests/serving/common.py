"""Shared machinery of the serving tests (PEFT's testing_common.py pattern): random adapters
saved to a folder, a character-level tokenizer for the tiny models, references (a model
carrying one adapter alone; transformers' own generate), an in-process server and a tiny
HTTP client. Test files import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time

import torch
from conftest import VOCAB, randomize, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import nora
from nora.serving import (
    AdapterStore,
    Engine,
    MultiAdapterModel,
    ServeConfig,
    ServerThread,
    create_app,
)

# Every method, several activations, mixed ranks (2 … 8), scales != 1.
ALL_SPECS = {
    "lora-r2": dict(method="lora", r=2),
    "lora-r8": dict(method="lora", r=8, alpha=32.0),
    "nora-silu": dict(method="nora", r=4, scale=2.5),
    "nora-silu-r8": dict(method="nora", r=8),
    "nora-silu-r3": dict(method="nora", r=3, alpha=6.0),
    "nora-relu": dict(method="nora", r=8, activation="relu"),
    "nora-gelu": dict(method="nora", r=3, activation="gelu"),
    "nora-tanh": dict(method="nora", r=5, activation="tanh"),
    "nora-identity": dict(method="nora", r=2, activation="identity"),
    "nora-sinter": dict(method="nora", r=4, activation="sinter", sinter_a=0.05, sinter_omega=3.0),
    "nora-learnable": dict(method="nora", r=6, activation="learnable"),
    "nolora": dict(method="nolora", r=4),
    "nolora-silu": dict(method="nolora", r=7, activation="silu"),
    "aurora": dict(method="aurora", r=2),
    "aurora-r6": dict(method="aurora", r=6, spline_grid_size=4),
    "aurora-r5": dict(method="aurora", r=5),  # stacks with "aurora": spline rows zero-padded
    "loran": dict(method="loran", r=4, sinter_a=0.05, sinter_omega=5.0),
    "loran-r2": dict(method="loran", r=2),
}


# One adapter per method: what the engine, server and tenant tests serve.
SPECS = {
    "nora": dict(method="nora", r=4),
    "lora": dict(method="lora", r=2),
    "aurora": dict(method="aurora", r=3),
    "loran": dict(method="loran", r=2),
    "nolora": dict(method="nolora", r=8),
}

BASE = "tiny-base"


def save_random(path, seed: int = 0, base=tiny_llama, **cfg) -> None:
    """A random non-zero adapter (every parameter, B included) saved in PEFT layout."""
    model = base()
    nora.inject(model, nora.AdapterConfig(init_weights=False, **cfg))
    randomize(model, seed)
    nora.save_adapter(model, path)


def make_dir(root, specs=ALL_SPECS):
    for i, (name, cfg) in enumerate(specs.items()):
        save_random(root / name, seed=i, **cfg)
    return root


def solo(root, name, ids: torch.Tensor, base=tiny_llama) -> torch.Tensor:
    """Logits of `ids` through a fresh base model carrying only adapter `name` (or none)."""
    model = base()
    if name is not None:
        nora.load_adapter(model, root / name)
    with torch.no_grad():
        return model(ids).logits


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (fits VOCAB = 96), <eos> = 1, and a tiny chat template."""
    chars = ["\n"] + [chr(c) for c in range(32, 122)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def random_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def check_rows(multi, adapters, names, ids):
    with torch.no_grad():
        out = multi(ids, adapters=names).logits
    for b, name in enumerate(names):
        ref = solo(adapters, name, ids[b : b + 1])[0]
        assert torch.allclose(out[b], ref, atol=1e-5, rtol=1e-4), (name, (out[b] - ref).abs().max())
        if name is not None:  # the adapter really changes the output
            assert not torch.allclose(ref, solo(adapters, None, ids[b : b + 1])[0], atol=1e-3)


def hf_generate(root, tok, prompt, adapter, n, **kw) -> list[int]:
    """The reference: transformers' own generate on a model carrying only this adapter."""
    model = tiny_llama()
    if adapter is not None:
        nora.load_adapter(model, root / adapter)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw)
    return out[0, ids.shape[1] :].tolist()


class Client:
    """A tiny HTTP client for one server and one key: status, headers and JSON body."""

    def __init__(self, srv, key: str | None = None):
        self.srv, self.key = srv, key

    def _conn(self, method, path, body):
        conn = http.client.HTTPConnection(self.srv.host, self.srv.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        return conn, conn.getresponse()

    def call(self, method, path, body=None):
        conn, resp = self._conn(method, path, body)
        raw = resp.read()
        conn.close()
        ctype = resp.getheader("content-type") or ""
        out = json.loads(raw) if raw and "json" in ctype else raw.decode()
        return resp.status, dict(resp.getheaders()), out

    def post(self, path, body):
        return self.call("POST", path, body)

    def sse(self, path, body) -> list:
        conn, resp = self._conn("POST", path, {**body, "stream": True})
        assert resp.status == 200, resp.read()
        assert resp.getheader("content-type").startswith("text/event-stream")
        events = []
        for block in resp.read().decode().split("\n\n"):
            if block.startswith("data: "):
                payload = block[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
        conn.close()
        return events


@contextlib.contextmanager
def paced(engine, seconds=0.01):
    """Make each decode step take a while, so that requests overlap and streams last."""
    decode = engine._decode

    def slow():
        time.sleep(seconds)
        decode()

    engine._decode = slow
    try:
        yield
    finally:
        engine._decode = decode


def wait_for(cond, timeout=10.0, what="condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def greedy(**kw):
    return {"temperature": 0, "ignore_eos": True, **kw}


def make_server(root, tok, max_resident=4, max_batch=8, max_waiting=64, start=True, **limits):
    store = AdapterStore(MultiAdapterModel(tiny_llama()), root, max_resident=max_resident)
    engine = Engine(store.multi, tok, store, max_batch=max_batch, max_model_len=256,
                    max_waiting=max_waiting)  # fmt: skip
    if start:
        engine.start()
    keys = limits.pop("keys", None)
    cfg = ServeConfig(max_tokens_limit=300, **limits)
    srv = ServerThread(create_app(engine, BASE, cfg, keys=keys)).start()
    srv.engine = engine
    return srv


@contextlib.contextmanager
def serving(root, tok, **kw):
    srv = make_server(root, tok, **kw)
    try:
        yield srv
    finally:
        srv.stop()
        srv.engine.stop()
