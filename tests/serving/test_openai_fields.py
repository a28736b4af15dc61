"""The OpenAI fields people use: logprobs / top_logprobs, n, seed, penalties, logit_bias, stop.

References are independent of the engine: a fresh model carrying only the adapter, run over
the whole sequence at every step (no KV cache, no batch), with OpenAI's documented rules.
"""

from __future__ import annotations

import threading

import openai
import pytest
import torch

from serving.common import (
    BASE,
    SPECS,
    Client,
    greedy,
    make_dir,
    paced,
    serving,
    solo,
    wait_for,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("adapters"), SPECS)


@pytest.fixture(scope="module")
def server(root, tok):
    with serving(root, tok) as srv:
        yield srv


def reference(root, tok, prompt, adapter, n, presence=0.0, frequency=0.0, bias=None):
    """Greedy with OpenAI's penalties, recomputing the full sequence each step; returns the
    token ids and each token's log-probability under the model's own distribution."""
    ids = tok(prompt)["input_ids"]
    out, lps = [], []
    for _ in range(n):
        logits = solo(root, adapter, torch.tensor([ids + out]))[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel())
        z = logits - counts * frequency - (counts > 0).float() * presence
        for t, b in (bias or {}).items():
            z[t] += b
        t = int(z.argmax())
        lps.append(torch.log_softmax(logits, -1))
        out.append(t)
    return out, lps


def test_completion_logprobs_match_the_model(server, root, tok):
    body = greedy(model="nora", prompt="hello", max_tokens=8, logprobs=3)
    status, _, out = Client(server).post("/v1/completions", body)
    assert status == 200, out
    ids, lps = reference(root, tok, "hello", "nora", 8)
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    for k, t in enumerate(ids):
        assert lp["token_logprobs"][k] == pytest.approx(float(lps[k][t]), abs=1e-4)
        top = torch.topk(lps[k], 3)
        want = {
            tok.decode([int(i)]): float(v) for i, v in zip(top.indices, top.values, strict=True)
        }
        assert lp["top_logprobs"][k].keys() == want.keys()
        assert lp["top_logprobs"][k] == pytest.approx(want, abs=1e-4)
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:k]) for k in range(8)]
    # streamed, the chunks' logprobs add up to the full answer's
    events = Client(server).sse("/v1/completions", body)
    chunks = [e["choices"][0]["logprobs"] for e in events[:-1] if e["choices"][0]["logprobs"]]
    assert sum((c["tokens"] for c in chunks), []) == lp["tokens"]
    assert sum((c["text_offset"] for c in chunks), []) == lp["text_offset"]
    streamed = sum((c["token_logprobs"] for c in chunks), [])
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-6)


def test_chat_logprobs_with_the_openai_client(server, root, tok):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(
        model="lora", messages=messages, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids, lps = reference(root, tok, prompt, "lora", 6)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in ids]
    for c, t, lp in zip(content, ids, lps, strict=True):
        assert c.logprob == pytest.approx(float(lp[t]), abs=1e-4) and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].token == c.token  # greedy: the chosen one is the most likely
        assert c.bytes == list(c.token.encode())
    plain = client.chat.completions.create(model="lora", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_n_choices_and_seeds(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    def texts(**kw):
        out = client.completions.create(model="aurora", prompt="seed", max_tokens=12, **kw)
        assert [c.index for c in out.choices] == list(range(len(out.choices)))
        return [c.text for c in out.choices], out.usage

    a, usage = texts(n=3, temperature=1.0, seed=7)
    assert len(a) == 3 and len(set(a)) == 3  # each choice draws its own sample
    assert usage.completion_tokens == sum(len(t) for t in a)  # one token per character
    assert texts(n=3, temperature=1.0, seed=7)[0] == a  # same seed, same texts
    assert texts(n=1, temperature=1.0, seed=8)[0] == [a[1]]  # choice i draws from seed + i
    assert texts(n=3, temperature=1.0, seed=99)[0] != a
    g, _ = texts(n=2, temperature=0)
    assert g[0] == g[1] == texts(temperature=0)[0][0]


def test_a_seed_gives_the_same_text_whatever_the_batch(server):
    body = {"model": "nolora", "prompt": "x", "max_tokens": 16, "temperature": 0.9, "seed": 123}
    _, _, alone = Client(server).post("/v1/completions", body)
    results = {}

    def client(i):
        b = body if i == 0 else {**body, "seed": 1000 + i, "model": "nora"}
        results[i] = Client(server).post("/v1/completions", b)

    with paced(server.engine):
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results[0][2]["choices"][0]["text"] == alone["choices"][0]["text"]
    events = Client(server).sse("/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == alone["choices"][0]["text"]


@pytest.mark.parametrize("presence, frequency", [(0.0, 1.5), (1.2, 0.0), (0.7, -0.4)])
def test_presence_and_frequency_penalties(server, root, tok, presence, frequency):
    body = greedy(model="loran", prompt="aaa", max_tokens=12)
    _, _, plain = Client(server).post("/v1/completions", body)
    pen = {**body, "presence_penalty": presence, "frequency_penalty": frequency}
    status, _, out = Client(server).post("/v1/completions", pen)
    ids, _ = reference(root, tok, "aaa", "loran", 12, presence, frequency)
    assert status == 200 and out["choices"][0]["text"] == tok.decode(ids)
    assert out["choices"][0]["text"] != plain["choices"][0]["text"]  # the penalty mattered


def test_logit_bias(server, root, tok):
    y = tok.convert_tokens_to_ids("y")
    body = greedy(model=BASE, prompt="abc", max_tokens=5, logit_bias={str(y): 100})
    _, _, out = Client(server).post("/v1/completions", body)
    assert out["choices"][0]["text"] == "yyyyy"
    bias = {tok.convert_tokens_to_ids("q"): 3.0}
    body = greedy(
        model="nora", prompt="abc", max_tokens=8, logit_bias={str(k): v for k, v in bias.items()}
    )
    _, _, out = Client(server).post("/v1/completions", body)
    assert out["choices"][0]["text"] == tok.decode(
        reference(root, tok, "abc", "nora", 8, bias=bias)[0]
    )


def test_stop_lists_with_the_openai_client(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    kw = dict(
        model="lora", prompt="ab", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw).choices[0].text
    s1, s2 = full[9:11], full[5:7]  # the second occurs first
    cut = client.completions.create(**kw, stop=[s1, s2]).choices[0]
    assert cut.text == full[: min(full.index(s1), full.index(s2))]
    assert cut.finish_reason == "stop"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {"9999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a Unicode digit is not a token id
        ({"seed": 2**64}, "seed"),  # beyond a torch generator's 64-bit seed
        ({"seed": -1}, "seed"),
    ],
)
def test_unsupported_values_get_a_400_naming_the_field(server, extra, param):
    status, _, out = Client(server).post("/v1/completions", {"model": BASE, "prompt": "a", **extra})
    assert status == 400 and out["error"]["param"] == param and param in out["error"]["message"]


@pytest.mark.parametrize(
    "extra, param",
    [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": 3}, "logprobs")],
)
def test_chat_logprob_fields_are_checked(server, extra, param):
    body = {"model": BASE, "messages": [{"role": "user", "content": "a"}], **extra}
    status, _, out = Client(server).post("/v1/chat/completions", body)
    assert status == 400 and out["error"]["param"] == param


def test_n_streams_interleave_by_index(server):
    body = greedy(
        model="nora", prompt="hi", max_tokens=6, n=2, stream_options={"include_usage": True}
    )
    events = Client(server).sse("/v1/completions", body)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 12
    text = {0: "", 1: ""}
    for e in events[:-2]:
        text[e["choices"][0]["index"]] += e["choices"][0]["text"]
    _, _, full = Client(server).post("/v1/completions", {**body, "stream_options": None})
    assert [text[0], text[1]] == [c["text"] for c in full["choices"]]
    wait_for(lambda: server.engine.running == 0)
