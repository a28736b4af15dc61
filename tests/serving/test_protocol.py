"""The typed OpenAI protocol: a bad field is named by the parser (ParamError.param), the
sampling ranges by SamplingParams.check, and /openapi.json is generated from the models."""

from __future__ import annotations

import pytest
from conftest import tiny_llama
from starlette.testclient import TestClient

from nora.serving import Engine, MultiAdapterModel, ParamError, SamplingParams, create_app
from nora.serving.openai.protocol import (
    AdapterRequest,
    ChatCompletionRequest,
    CompletionRequest,
    openapi,
    parse,
)
from serving.common import make_dir

OK = {"model": "m", "prompt": "hi"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "cls, body, param, fragment",
    [
        (CompletionRequest, {**OK, "max_tokens": "9"}, "max_tokens", "valid integer"),
        (CompletionRequest, {**OK, "max_tokens": True}, "max_tokens", "valid integer"),
        (CompletionRequest, {**OK, "temperature": "1"}, "temperature", "valid number"),
        (CompletionRequest, {**OK, "top_p": None, "top_k": 1.5}, "top_k", "valid integer"),
        (CompletionRequest, {**OK, "seed": "7"}, "seed", "seed"),
        (CompletionRequest, {**OK, "stop": 3}, "stop", "stop"),
        (CompletionRequest, {**OK, "stop": ["a", 1]}, "stop", "stop"),
        (CompletionRequest, {**OK, "stream": "yes"}, "stream", "'stream' must be a boolean"),
        (CompletionRequest, {**OK, "stream_options": 1}, "stream_options", "stream_options"),
        (CompletionRequest, {**OK, "ignore_eos": 1}, "ignore_eos", "ignore_eos"),
        (CompletionRequest, {**OK, "stop_token_ids": [1, "2"]}, "stop_token_ids", "integer"),
        (CompletionRequest, {**OK, "n": 2.0}, "n", "valid integer"),
        (CompletionRequest, {**OK, "presence_penalty": [1]}, "presence_penalty", "number"),
        (CompletionRequest, {**OK, "logit_bias": {"5": "x"}}, "logit_bias", "number"),
        (CompletionRequest, {**OK, "logit_bias": [5]}, "logit_bias", "logit_bias"),
        (CompletionRequest, {**OK, "logprobs": True}, "logprobs", "an integer in [0, 20]"),
        (CompletionRequest, {**OK, "echo": True}, "echo", "echo=True is not supported"),
        (CompletionRequest, {**OK, "suffix": "x"}, "suffix", "suffix='x' is not supported"),
        (CompletionRequest, {**OK, "best_of": "2"}, "best_of", "best_of"),
        (CompletionRequest, {**OK, "user": 5}, "user", "user"),
        (CompletionRequest, {**OK, "zap": 1, "boo": 2}, "boo", "unsupported fields: boo, zap"),
        (CompletionRequest, {**OK, "": 1}, '""', 'unsupported fields: ""'),  # fuzz found it
        (CompletionRequest, {"model": "m"}, "prompt", "'prompt' must be a string"),
        (CompletionRequest, {**OK, "prompt": [1, True]}, "prompt", "'prompt' must be"),
        (CompletionRequest, {"prompt": "a"}, "model", "'model' is required"),
        (CompletionRequest, {**OK, "model": 3}, "model", "'model' is required"),
        (ChatCompletionRequest, {**CHAT, "messages": []}, "messages", "non-empty list"),
        (ChatCompletionRequest, {"model": "m"}, "messages", "non-empty list"),
        (
            ChatCompletionRequest,
            {**CHAT, "messages": ["hi"]},
            "messages",
            "messages[0] needs a role",
        ),
        (
            ChatCompletionRequest,
            {**CHAT, "messages": [{"role": "bot", "content": "a"}]},
            "messages",
            "messages[0] needs a role",
        ),  # fmt: skip
        (
            ChatCompletionRequest,
            {**CHAT, "messages": [*CHAT["messages"], {"role": "user"}]},
            "messages",
            "messages[1].content must be a string",
        ),  # fmt: skip
        (
            ChatCompletionRequest,
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages",
            "messages[0]: only text",
        ),  # fmt: skip
        (ChatCompletionRequest, {**CHAT, "logprobs": 3}, "logprobs", "logprobs must be a boolean"),
        (ChatCompletionRequest, {**CHAT, "top_logprobs": 21}, "top_logprobs", "top_logprobs"),
        (ChatCompletionRequest, {**CHAT, "prompt": "x"}, "prompt", "unsupported fields: prompt"),
        (
            ChatCompletionRequest,
            {**CHAT, "max_completion_tokens": "3"},
            "max_completion_tokens",
            "valid integer",
        ),  # fmt: skip
        (AdapterRequest, {"name": 3}, "name", "name"),
        (AdapterRequest, {}, "name", "name"),
        (CompletionRequest, [1, 2], None, "the JSON body must be an object"),
    ],
)
def test_a_bad_field_is_named_by_the_parser(cls, body, param, fragment):
    with pytest.raises(ParamError) as e:
        parse(cls, body)
    assert e.value.param == param and fragment in str(e.value), str(e.value)


def test_good_bodies_parse():
    body = parse(CompletionRequest, {**OK, "prompt": [1, 2], "logprobs": False, "echo": False,
                                     "stop": "x", "temperature": 1, "logit_bias": {"3": 1}})  # fmt: skip
    assert body.prompt == [1, 2] and body.temperature == 1.0 and body.logprobs is False
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    chat = parse(
        ChatCompletionRequest, {**CHAT, "messages": msgs, "stream_options": {"include_usage": True}}
    )
    assert chat.messages[0].text() == "ab" and chat.stream_options.include_usage is True


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("temperature", -1),
        ("temperature", 101),
        ("top_p", 0),
        ("top_k", -1),
        ("seed", -1),
        ("seed", 2**64),
        ("stop", [""]),
        ("stop", ["a"] * 17),
        ("stop_token_ids", [-1]),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("logit_bias", {5: 101}),
        ("logprobs", 21),
        ("timeout", 0),
    ],
)
def test_sampling_params_name_the_field(field, value):
    with pytest.raises(ParamError) as e:
        SamplingParams(**{field: value}).check()
    assert e.value.param == field and field in str(e.value)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tok):
    root = make_dir(tmp_path_factory.mktemp("adapters"), {"lora": dict(method="lora", r=2)})
    multi = MultiAdapterModel(tiny_llama())
    multi.add("lora", root / "lora")
    engine = Engine(multi, tok).start()  # no store: the adapters of `multi`, fixed
    yield create_app(engine, "base")
    engine.stop()


def test_openapi_is_generated_from_the_models(app):
    with TestClient(app) as client:
        doc = client.get("/openapi.json").json()
    assert doc == openapi() and doc["openapi"].startswith("3.")
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/CompletionRequest")
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert set(props) == set(CompletionRequest.model_fields)
    assert doc["components"]["schemas"]["CompletionRequest"]["additionalProperties"] is False


def test_an_engine_without_a_store_serves_its_models_adapters(app):
    with TestClient(app) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["base", "lora"]
        body = {"model": "lora", "prompt": "ab", "max_tokens": 3, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        r = client.post("/v1/completions", json={**body, "model": "nope"})
        assert r.status_code == 404 and "known models: base, lora" in r.json()["error"]["message"]
        r = client.post("/v1/adapters/unload", json={"name": "lora"})
        assert r.status_code == 400 and "no adapter directory" in r.json()["error"]["message"]
        health = client.get("/health").json()
        assert health["resident"] == ["lora"]
        assert set(health["stats"]) == {"steps", "prefills", "prompt_tokens", "generated_tokens",
                                        "finished", "max_running"}  # fmt: skip


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"prompt": [1, 999]}, "prompt", "prompt token ids must be integers"),
        ({"prompt": "ab", "max_tokens": 600}, "max_tokens", "exceeds the context length"),
        ({"prompt": "ab", "n": 17}, "n", "n must be an integer in [1, 16]"),
        ({"prompt": "ab", "best_of": 2}, "best_of", "only best_of = n"),
        ({"prompt": "ab", "logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
    ],
)
def test_what_the_engine_refuses_is_named_too(app, body, param, fragment):
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "base", **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and fragment in err["message"], err
