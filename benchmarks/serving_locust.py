"""Locust scenario for `nora serve` with tenants: run by benchmarks/serving_locust_run.py.

    locust -f benchmarks/serving_locust.py --headless ...     (the runner sets it all up)

The runner writes a plan (JSON, path in $NORA_LOCUST_PLAN): the tenants' keys, the adapters
in popularity order with their owner, the power-law exponent, prompts, the greedy probes
with their answers run alone. Each simulated user is a client of no fixed tenant: every
request picks adapter i with probability ∝ (i + 1)^-α and sends it with its owner's key,
streamed or not (`stream_share`), sampled (temperature 0.7, a seed) -- or, with probability
`probe_share` (0.2), one of the greedy probes, whose text must equal the answer it got alone.
Refused with 429 / 503, a user waits the `Retry-After` seconds before its next request.

Recorded per request: the outcome (an error's kind: "HTTP 429", "HTTP 503", "HTTP 500 ...",
"greedy mismatch", "stream error: ...", a connection error), and for streams the time to
first token and the per-token latency ((last chunk - first chunk) / (tokens - 1)), as
locust entries TTFT / TPOT and as raw samples written to $NORA_LOCUST_SAMPLES at the end.
This file runs inside locust's own environment (gevent); it imports nothing from nora.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

PLAN = json.loads(open(os.environ["NORA_LOCUST_PLAN"]).read())
NAMES = [a for a, _ in PLAN["adapters"]]
OWNER = dict(PLAN["adapters"])
WEIGHTS = [(i + 1) ** -PLAN["alpha"] for i in range(len(NAMES))]
SAMPLES: dict[str, list] = {"ttft": [], "tpot": [], "outcomes": []}


def _metric(name: str, seconds: float) -> None:
    events.request.fire(request_type="METRIC", name=name, response_time=seconds * 1000,
                        response_length=0, exception=None, context={})  # fmt: skip


class Tenants(HttpUser):
    wait_time = between(*PLAN["wait"])

    def on_start(self) -> None:
        self.rng = random.Random()

    def _body(self) -> tuple[dict, str, str | None]:
        """The request, its adapter's owner key, and the expected text (probes only)."""
        rng = self.rng
        if rng.random() < PLAN["probe_share"]:
            p = rng.choice(PLAN["probes"])
            body = {"model": p["model"], "prompt": p["prompt"], "max_tokens": p["max_tokens"],
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            return body, PLAN["tenants"][OWNER[p["model"]]], p["text"]
        model = rng.choices(NAMES, WEIGHTS)[0]
        words = PLAN["words"]
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(*PLAN["prompt_words"])))
        body = {"model": model, "prompt": prompt, "max_tokens": rng.randint(*PLAN["max_tokens"]),
                "temperature": 0.7, "seed": rng.randrange(1 << 30), "ignore_eos": True}  # fmt: skip
        return body, PLAN["tenants"][OWNER[model]], None

    @task
    def complete(self) -> None:
        body, key, expected = self._body()
        stream = self.rng.random() < PLAN["stream_share"]
        kind = "probe" if expected is not None else "sampled"
        name = f"{kind} {'stream' if stream else 'full'}"
        headers = {"Authorization": f"Bearer {key}"}
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        t0, retry = time.perf_counter(), None
        with self.client.post("/v1/completions", json=body, headers=headers, name=name,
                              stream=stream, catch_response=True, timeout=600) as resp:  # fmt: skip
            if resp.status_code == 0:  # no response at all: say what the client saw
                outcome = f"connection error: {type(resp.error).__name__}: {str(resp.error)[:80]}"
                resp.failure(outcome)
            elif resp.status_code != 200:
                err = "?"
                try:
                    err = resp.json()["error"]["type"]
                except Exception:
                    pass
                outcome = f"HTTP {resp.status_code} {err}"
                resp.failure(outcome)
                retry = resp.headers.get("Retry-After")
            else:
                try:
                    text, outcome = self._read(resp, stream, t0)
                except Exception as e:  # the connection broke mid-answer
                    text, outcome = "", f"broken answer: {type(e).__name__}: {str(e)[:80]}"
                if outcome == "ok" and expected is not None and text != expected:
                    outcome = "greedy mismatch"
                if outcome == "ok":
                    resp.success()
                else:
                    resp.failure(outcome)
        SAMPLES["outcomes"].append((time.time(), name, outcome))
        if resp.status_code in (429, 503) and retry:  # a polite client waits as told
            time.sleep(min(float(retry), 60.0))

    def _read(self, resp, stream: bool, t0: float) -> tuple[str, str]:
        if not stream:
            return resp.json()["choices"][0]["text"], "ok"
        text, times, tokens = "", [], 0
        for line in resp.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                return text, f"stream error: {obj['error']['message'][:60]}"
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["text"]:
                times.append(time.perf_counter())
                text += obj["choices"][0]["text"]
        else:
            return text, "stream cut"
        if times:
            SAMPLES["ttft"].append(times[0] - t0)
            _metric("TTFT", times[0] - t0)
            if tokens > 1:
                SAMPLES["tpot"].append((times[-1] - times[0]) / (tokens - 1))
                _metric("TPOT", SAMPLES["tpot"][-1])
        return text, "ok"


@events.quitting.add_listener
def _dump(environment, **_kw) -> None:
    path = os.environ.get("NORA_LOCUST_SAMPLES")
    if path:
        with open(path, "w") as f:
            json.dump(SAMPLES, f)
