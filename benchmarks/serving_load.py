"""Server load test with S-LoRA-style traffic: many adapters, power-law popularity, Poisson.

    .venv/bin/python benchmarks/serving_load.py                  # ~2 min on 2 cores
    .venv/bin/python benchmarks/serving_load.py --quick          # a smoke run

The embedded default base (SmolLM2-135M, fp32) behind the real HTTP server (in-process, on a
loopback port) over a directory of random adapters (r = 16 on q_proj, v_proj; mostly NoRA,
some LoRA / NoLoRA / AuroRA), more adapters than may be resident (LRU eviction at work; the
most popular ones are preloaded, so the resident set starts full).
Requests arrive with Gamma-distributed gaps (cv = 1: Poisson) and pick adapter i with
probability ∝ (i + 1)^-α (power law; `--popularity uniform|identical|distinct` for the other
S-LoRA modes). Each request streams (SSE) from its own client thread; we record TTFT, the
per-token latency of each request ((end − first token) / (tokens − 1)), the gaps between
streamed chunks, failures, and the server's RSS over time. Writes
benchmarks/results/serving_load.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from nora.checkpoint import CONFIG_NAME, PREFIX, WEIGHTS_NAME, config_to_dict
from nora.models import load_base_model
from nora.serving import ServeConfig, ServerThread, build

sys.path.insert(0, str(Path(__file__).parent))
from serving_bench import OtherLoad, machine, random_adapter  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORDS = "the a of to and in is it that for on with as was at by an be this from or are".split()
WORDS += "model adapter rank latent token batch step serve request answer number sum".split()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_adapters(model, root: Path, n: int) -> list[str]:
    methods = ["nora"] * 12 + ["lora"] * 2 + ["nolora", "aurora"]  # 3/4 NoRA
    names = []
    for i in range(n):
        method = methods[i % len(methods)]
        cfg, tensors = random_adapter(model, method, seed=i)
        folder = root / f"{method}-{i:03d}"
        folder.mkdir(parents=True)
        save_file({PREFIX + k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(config_to_dict(cfg)))
        names.append(folder.name)
    return names


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Client(threading.Thread):
    def __init__(self, srv: ServerThread, body: dict, t_send: float):
        super().__init__(daemon=True)
        self.srv, self.body, self.t_send = srv, body, t_send
        self.ok, self.error, self.tokens = False, None, 0
        self.chunks: list[float] = []
        self.t_end = float("nan")

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection(self.srv.host, self.srv.port, timeout=600)
            conn.request("POST", "/v1/completions", body=json.dumps(self.body))
            resp = conn.getresponse()
            if resp.status != 200:
                self.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
                return
            buf = b""
            while True:
                line = resp.readline()
                if not line:
                    break
                buf = line.strip()
                if not buf.startswith(b"data: "):
                    continue
                data = buf[6:]
                if data == b"[DONE]":
                    self.ok = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    self.error = obj["error"]["message"]
                    break
                if obj.get("usage"):
                    self.tokens = obj["usage"]["completion_tokens"]
                elif obj["choices"] and obj["choices"][0]["text"]:
                    self.chunks.append(time.perf_counter())
            self.t_end = time.perf_counter()
            conn.close()
        except Exception as e:  # counted as a failure
            self.error = f"{type(e).__name__}: {e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--max-resident", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rate", type=float, default=2.0, help="requests per second")
    ap.add_argument(
        "--cv", type=float, default=1.0, help="Gamma arrivals' coefficient of variation"
    )
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of measured arrivals")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds of traffic before")
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    ap.add_argument(
        "--popularity", default="powerlaw", choices=["powerlaw", "uniform", "identical", "distinct"]
    )
    ap.add_argument("--out", default=str(RESULTS / "serving_load"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.duration, args.warmup, args.adapters, args.max_resident = 10.0, 5.0, 16, 8
    info = machine()
    print(json.dumps(info), flush=True)
    rng = random.Random(0)
    model, tok = load_base_model()
    root = Path(tempfile.mkdtemp(prefix="nora-load-"))
    names = write_adapters(model, root, args.adapters)
    cfg = ServeConfig(
        adapters_dir=str(root), max_resident=args.max_resident, max_batch=args.max_batch,
        max_tokens_limit=256, preload=names[: args.max_resident],  # a full resident set: memory starts steady
    )  # fmt: skip
    app, engine = build(model, tok, cfg)
    engine.start()

    weights = [(i + 1) ** -args.alpha for i in range(len(names))]
    if args.popularity == "uniform":
        weights = [1.0] * len(names)

    def pick(k: int) -> str:
        if args.popularity == "identical":
            return names[0]
        if args.popularity == "distinct":
            return names[k % len(names)]
        return rng.choices(names, weights)[0]

    # the schedule: Gamma gaps with mean 1/rate and the given cv
    shape = 1 / args.cv**2
    t, plan = 0.0, []
    while True:
        t += rng.gammavariate(shape, 1 / (args.rate * shape))
        if t > args.warmup + args.duration:
            break
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 48)))
        body = {
            "model": pick(len(plan)),
            "prompt": prompt,
            "max_tokens": rng.randint(16, 48),
            "temperature": 0.7,
            "seed": len(plan),
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        plan.append((t, body))

    rss: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_rss(t0):
        while not stop.is_set():
            rss.append((time.perf_counter() - t0, rss_mb()))
            time.sleep(0.5)

    with ServerThread(app) as srv:
        t_start = time.perf_counter()  # warm-up traffic first: the same schedule, not counted
        t0 = t_start + args.warmup
        threading.Thread(target=sample_rss, args=(t0,), daemon=True).start()
        clients, warm = [], []
        for at, body in plan:
            delay = t_start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if at >= args.warmup and not clients:
                load = OtherLoad().__enter__()
            c = Client(srv, body, time.perf_counter())
            c.start()
            (clients if at >= args.warmup else warm).append(c)
        for c in warm + clients:
            c.join()
        t_end = time.perf_counter()
        load.__exit__()
        stop.set()
        health = json.loads(_get(srv, "/health"))
    engine.stop()

    done = [c for c in clients if c.ok]
    ttft = [c.chunks[0] - c.t_send for c in done if c.chunks]
    tpot = [(c.t_end - c.chunks[0]) / (c.tokens - 1) for c in done if c.chunks and c.tokens > 1]
    gaps = [b - a for c in done for a, b in zip(c.chunks, c.chunks[1:], strict=False)]
    tokens = sum(c.tokens for c in done)
    window = [(s, m) for s, m in rss if 0 <= s <= t_end - t0]
    slope = _slope(window) * 60 if len(window) > 2 else float("nan")  # MB per minute
    res = {
        "machine": {**info, "loadavg_end": os.getloadavg(), "other_cpu_share": load.share},
        "command": " ".join(["python", *sys.argv]),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "requests": len(clients),
        "failed": len(clients) - len(done),
        "warmup_requests": len(warm),
        "warmup_failed": sum(not c.ok for c in warm),
        "errors": sorted({c.error for c in clients if c.error})[:5],
        "wall_s": round(t_end - t0, 2),
        "generated_tokens": tokens,
        "throughput_tok_s": round(tokens / (t_end - t0), 2),
        "throughput_req_s": round(len(done) / (t_end - t0), 3),
        "ttft_ms": {"p50": 1000 * percentile(ttft, 50), "p99": 1000 * percentile(ttft, 99)},
        "per_token_ms": {"p50": 1000 * percentile(tpot, 50), "p99": 1000 * percentile(tpot, 99)},
        "inter_chunk_ms": {"p50": 1000 * percentile(gaps, 50), "p99": 1000 * percentile(gaps, 99)},
        "distinct_adapters_requested": len({c.body["model"] for c in clients}),
        "resident_adapters_end": len(health["resident"]),
        "evictions": engine.store.evictions,
        "engine": health["stats"],
        "rss_mb": {  # over the measured window (after warm-up)
            "start": window[0][1],
            "end": window[-1][1],
            "min": min(m for _, m in window),
            "max": max(m for _, m in window),
            "slope_mb_per_min": round(slope, 2),
            "at_warmup_start": rss[0][1],
        },
        "rss_trace_mb": [(round(s, 1), round(m, 1)) for s, m in rss[:: max(1, len(rss) // 40)]],
    }
    write(res, Path(args.out))


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def _get(srv: ServerThread, path: str) -> bytes:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


def write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    m, c, r = res["machine"], res["config"], res["rss_mb"]
    lines = [
        "# Serving load test (issue 5)",
        "",
        f"Command: `{res['command']}`.",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}. Load average at start "
        f"{m['loadavg_start']}, at end {m['loadavg_end']}; CPU share taken by other processes "
        f"during the run: {m['other_cpu_share']} (0 = quiet, 0.5 = one core).",
        "",
        f"SmolLM2-135M fp32 over {c['adapters']} random adapters (r=16 on q,v; 3/4 NoRA), "
        f"at most {c['max_resident']} resident, batch ≤ {c['max_batch']}; {c['popularity']} "
        f"popularity (α={c['alpha']}), Gamma arrivals cv={c['cv']} at {c['rate']} req/s: "
        f"{c['warmup']} s of warm-up traffic, then {c['duration']} s measured; prompts 12–48 "
        "words, 16–48 new tokens, streamed. Metrics and memory cover the measured requests.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| requests / failed | {res['requests']} / **{res['failed']}** (warm-up: "
        f"{res['warmup_requests']} / {res['warmup_failed']}) |",
        f"| distinct adapters requested | {res['distinct_adapters_requested']} |",
        f"| resident at end / LRU evictions | {res['resident_adapters_end']} / {res['evictions']} |",
        f"| throughput | {res['throughput_tok_s']} tok/s, {res['throughput_req_s']} req/s |",
        f"| TTFT p50 / p99 | {res['ttft_ms']['p50']:.0f} / {res['ttft_ms']['p99']:.0f} ms |",
        f"| per-token latency p50 / p99 | {res['per_token_ms']['p50']:.0f} / "
        f"{res['per_token_ms']['p99']:.0f} ms |",
        f"| gap between streamed chunks p50 / p99 | {res['inter_chunk_ms']['p50']:.0f} / "
        f"{res['inter_chunk_ms']['p99']:.0f} ms |",
        f"| engine max running rows | {res['engine']['max_running']} |",
        f"| RSS start → end of the measured window (MB) | {r['start']:.0f} → {r['end']:.0f} "
        f"(min {r['min']:.0f}, max {r['max']:.0f}; {r['at_warmup_start']:.0f} before warm-up) |",
        f"| RSS trend over the measured window | {r['slope_mb_per_min']} MB/min |",
    ]
    if res["errors"]:
        lines += ["", "Errors: " + "; ".join(res["errors"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
