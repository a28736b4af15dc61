"""What the generation endpoints answer: OpenAI's response and chunk shapes (protocol.py
types them), logprobs in each endpoint's layout, and the server-sent event stream."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from starlette.responses import StreamingResponse

from nora.serving.sequence import Request


class EventStream(StreamingResponse):
    """SSE response that cancels its requests however the response ends (e.g. the client left).

    Cancelling from here, not only from the generator's `finally`, does not depend on when
    a generator suspended at a `yield` gets finalised. `on_end` runs once it has ended.
    """

    def __init__(self, reqs: list[Request], content):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.reqs, self.on_end = reqs, None

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel(self.reqs)
            if self.on_end is not None:
                self.on_end()


def cancel(reqs: list[Request]) -> None:
    for r in reqs:
        r.cancel()


class Shaper:
    """The response of one generation request (its id, kind and model), whole or in chunks."""

    def __init__(self, kind: str, model: str, include_usage: bool, tok=None):
        self.kind, self.model, self.tok = kind, model, tok
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.include_usage = include_usage
        self.offset = {}  # completions' text_offset per choice, across stream chunks

    def head(self) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def empty(self) -> Any:
        return {} if self.kind == "chat" else ""

    def piece(self, text: str) -> Any:
        return {"content": text} if self.kind == "chat" else text

    def chunk(self, i: int, piece: Any, finish: str | None, logprobs: Any = None) -> dict:
        key, empty = ("delta", {}) if self.kind == "chat" else ("text", "")
        choice = {"index": i, key: piece or empty, "logprobs": logprobs, "finish_reason": finish}
        return {**self.head(), "choices": [choice]}

    def logprobs(self, entries: list[tuple], i: int = 0) -> dict:
        """OpenAI's shapes for (token id, logprob, [(id, logprob)] top k) entries."""
        text = [self.tok.decode([t]) for t, _, _ in entries]
        if self.kind == "chat":

            def one(s, lp):
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            content = [
                {**one(s, lp), "top_logprobs": [one(self.tok.decode([a]), b) for a, b in top]}
                for s, (_, lp, top) in zip(text, entries, strict=True)
            ]
            return {"content": content}
        offsets, at = [], self.offset.get(i, 0)
        for s in text:
            offsets.append(at)
            at += len(s)
        self.offset[i] = at
        return {
            "tokens": text,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{self.tok.decode([a]): b for a, b in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    def full(self, reqs: list[Request]) -> dict:
        choices = []
        for i, r in enumerate(reqs):
            lp = self.logprobs(r.logprobs, i) if r.params.logprobs is not None else None
            if self.kind == "chat":
                msg = {"role": "assistant", "content": r.text}
                choices.append({"index": i, "message": msg, "logprobs": lp,
                                "finish_reason": r.finish_reason})  # fmt: skip
            else:
                choices.append({"index": i, "text": r.text, "logprobs": lp,
                                "finish_reason": r.finish_reason})  # fmt: skip
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        head = {**self.head(), "object": obj}
        return {**head, "choices": choices, "usage": usage(reqs)}


def usage(reqs: list[Request]) -> dict:
    p, c = len(reqs[0].prompt_ids), sum(len(r.output_ids) for r in reqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def model_card(name: str, created: int, parent: str | None, loaded: bool) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "nora",
        "root": name,
        "parent": parent,
        "loaded": loaded,
    }
