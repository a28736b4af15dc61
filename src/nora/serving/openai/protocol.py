"""The bodies of the OpenAI-compatible endpoints, typed (pydantic, as vLLM and SGLang do).

    body = parse(CompletionRequest, json.loads(raw))   # or ParamError(param, message)

A field of the wrong type, an unknown field or a no-op field with another value is named by
the parser: `ParamError.param` is the field (as for SamplingParams.check), its message says what the field takes. Types
are strict (JSON's `true` is not an integer, `"1"` is not a number); the ranges of the
sampling fields are SamplingParams.check's (one place), the limits of this server (n,
max_tokens, the prompt's length) the app's. The response models are what the endpoints
answer; `openapi()` is the schema of both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nora.serving.sampling import ParamError


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class _Sampling(_Body):
    """Fields both generation endpoints take."""

    model: str = Field(description="an adapter name or the base model")
    max_tokens: int | None = None
    temperature: float | None = Field(None, description="default 1.0 (OpenAI's)")
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = Field(None, description="choice i draws from seed + i")
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] = Field(description="a string or token ids (one prompt)")
    logprobs: int | Literal[False] | None = Field(None, description="the top k per token")
    echo: Literal[False] | None = None  # accepted with their no-op value only
    suffix: Literal[""] | None = None
    best_of: int | None = Field(None, description="only best_of = n")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class AdapterRequest(_Body):
    """POST /v1/adapters/load and /v1/adapters/unload."""

    name: str


# What a field takes, in the words of the 400 for a value of the wrong type.
_TAKES = {
    "model": "'model' is required: an adapter name or the base model",
    "prompt": "'prompt' must be a string or a list of token ids (one prompt)",
    "stream": "'stream' must be a boolean",
    "echo": "echo={input!r} is not supported (only False)",
    "suffix": "suffix={input!r} is not supported (only None)",
}


def parse(cls: type[_Body], body: Any):
    """`body` (parsed JSON) as `cls`, or ParamError naming the first bad field."""
    if not isinstance(body, dict):
        raise ParamError(None, "the JSON body must be an object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise _first(cls, body, e.errors()) from None


def _first(cls: type[_Body], body: dict, errors: list[dict]) -> ParamError:
    unknown = sorted(str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden")
    unknown = [k or '""' for k in unknown]  # JSON allows "" as a key: name it, never param ''
    if unknown:
        return ParamError(unknown[0], f"unsupported fields: {', '.join(unknown)}")
    err = errors[0]
    field = str(err["loc"][0]) if err["loc"] else None
    if field == "messages":
        return ParamError(
            field, _message_error([x["loc"] for x in errors if x["loc"][:2] == err["loc"][:2]])
        )
    if field == "logprobs":
        takes = "a boolean" if cls is ChatCompletionRequest else "an integer in [0, 20]"
        return ParamError(field, f"logprobs must be {takes}, got {body.get(field)!r}")
    if field in _TAKES:
        return ParamError(field, _TAKES[field].format(input=body.get(field)))
    got = f", got {body[field]!r}" if field in body else ""
    return ParamError(field, f"{field}: {err['msg'][0].lower()}{err['msg'][1:]}{got}")


def _message_error(locs: list[tuple]) -> str:
    """The 400 of a bad chat message, from the error locations of that message."""
    loc = locs[0]
    if len(loc) < 2 or not isinstance(loc[1], int):
        return "'messages' must be a non-empty list"
    i = loc[1]
    if len(loc) < 3 or loc[2] == "role":
        return f"messages[{i}] needs a role of system, user or assistant"
    if any("type" in x[3:] for x in locs):  # a content part that is not text
        return f"messages[{i}]: only text content is supported"
    return f"messages[{i}].content must be a string"


# ---------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    id: str
    object: str
    created: int
    model: str


class CompletionResponse(_Response):
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatCompletionResponse(_Response):
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Response):
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")  # an adapter's AdapterInfo fields
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nora"
    root: str
    parent: str | None
    loaded: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# path -> (request model or None, response model), for the OpenAPI schema
ENDPOINTS = {
    ("post", "/v1/completions"): (CompletionRequest, CompletionResponse),
    ("post", "/v1/chat/completions"): (ChatCompletionRequest, ChatCompletionResponse),
    ("get", "/v1/models"): (None, ModelList),
    ("post", "/v1/adapters/load"): (AdapterRequest, ModelCard),
    ("post", "/v1/adapters/unload"): (AdapterRequest, None),
}


def openapi(title: str = "nora serve") -> dict:
    """An OpenAPI 3.1 document of the endpoints, from the models above."""
    from pydantic.json_schema import models_json_schema

    models = {m for pair in ENDPOINTS.values() for m in pair if m is not None} | {ErrorResponse}
    refs, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )

    def content(m):
        return {"application/json": {"schema": refs[(m, "validation")]}}

    paths: dict[str, dict] = {}
    for (method, path), (req, resp) in ENDPOINTS.items():
        op: dict[str, Any] = {"responses": {"400": {"description": "a bad field, named",
                                                    "content": content(ErrorResponse)}}}  # fmt: skip
        op["responses"]["200"] = {"description": "OK"} | (
            {"content": content(resp)} if resp else {}
        )
        if req is not None:
            op["requestBody"] = {"required": True, "content": content(req)}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }
