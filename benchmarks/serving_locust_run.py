"""Load test of `nora serve` with tenants, driven by locust (headless); writes the results.

    .venv/bin/python benchmarks/serving_locust_run.py                 # 10 minutes
    .venv/bin/python benchmarks/serving_locust_run.py --duration 60   # a shorter run

Needs locust (`pip install -e ".[bench]"`, or a separate environment: --locust PATH; locust
runs in its own process, so its gevent never meets torch). What it does:
1. writes 64 random adapters (r = 16 on q_proj, v_proj; mostly NoRA) for SmolLM2-135M, owned
   round-robin by 3 tenants, and a key file (random keys; the third tenant rate-limited);
2. starts the real `nora serve --api-keys ...` as a subprocess on a loopback port, with a
   small waiting queue, so that overload is shed with 503 on purpose;
3. runs each greedy probe (an adapter, a prompt) alone, one after another: the reference;
4. runs benchmarks/serving_locust.py: power-law adapter popularity, each request with its
   adapter's owner key, half streamed, 20 % greedy probes compared with their reference;
   samples the server's RSS every 5 s;
5. scrapes /metrics (admin key), sends SIGTERM and checks that the server exits with 0;
6. writes benchmarks/results/serving_locust.{json,md}: requests/s, p50 / p99 time to first
   token and per-token latency (client side, streamed requests), outcomes by kind (429 / 503
   are the shedding provoked on purpose; anything else is unexpected), RSS over time.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from serving_bench import machine  # noqa: E402
from serving_load import WORDS, percentile, write_adapters  # noqa: E402

RESULTS = HERE / "results"
SHED = ("HTTP 429", "HTTP 503")  # what the test provokes on purpose


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def call(port: int, method: str, path: str, body=None, key=None, timeout=600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    resp = conn.getresponse()
    status, raw = resp.status, resp.read()
    conn.close()
    return status, raw


def metrics(port: int, key: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    _, raw = call(port, "GET", "/metrics", key=key)
    out = {}
    for fam in text_string_to_metric_families(raw.decode()):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=600, help="seconds of load")
    ap.add_argument("--users", type=int, default=16, help="concurrent locust users")
    ap.add_argument("--spawn-rate", type=float, default=2.0)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--tenants", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    ap.add_argument("--max-resident", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-waiting", type=int, default=4, help="small: overload is shed")
    ap.add_argument("--rate", type=float, default=0.3, help="the last tenant's requests/s")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument(
        "--warmup", type=float, default=0.2, help="share of the run before the RSS baseline"
    )
    ap.add_argument("--locust", default=str(REPO / ".venv-bench" / "bin" / "locust"))
    ap.add_argument("--out", default=str(RESULTS / "serving_locust"))
    args = ap.parse_args()
    locust = args.locust if Path(args.locust).exists() else shutil.which("locust")
    if not locust:
        sys.exit("locust not found: pip install -e '.[bench]' or pass --locust PATH")
    info = machine()
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="nora-locust-"))

    # 1. adapters, tenants, keys
    from nora.models import load_base_model

    model, tok = load_base_model()
    names = write_adapters(model, work / "adapters", args.adapters)
    del model
    tenants = [f"tenant-{chr(97 + t)}" for t in range(args.tenants)]
    owner = {n: tenants[i % args.tenants] for i, n in enumerate(names)}
    keys = {t: "sk-" + secrets.token_urlsafe(24) for t in [*tenants, "ops"]}
    entries = [
        {"key": keys[t], "tenant": t, "adapters": [n for n in names if owner[n] == t]}
        for t in tenants
    ]
    entries[-1]["rate"] = args.rate
    entries.append({"key": keys["ops"], "tenant": "ops", "admin": True})
    (work / "keys.json").write_text(json.dumps({"keys": entries}))
    order = names[:]  # popularity rank: a shuffled order, so every tenant has popular ones
    rng.shuffle(order)

    # 2. the server: the real CLI
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-c", "from nora.cli import app; app()", "serve",
           "--adapters", str(work / "adapters"), "--api-keys", str(work / "keys.json"),
           "--port", str(port), "--max-resident", str(args.max_resident),
           "--max-batch", str(args.max_batch), "--max-waiting", str(args.max_waiting),
           "--request-timeout", "300", "--grace", "60"]  # fmt: skip
    log = open(work / "server.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while True:
        try:
            if call(port, "GET", "/health", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() - t0 > 300:
            sys.exit(f"the server did not start; see {work / 'server.log'}")
        time.sleep(0.5)
    print(f"server up on {port} after {time.monotonic() - t0:.0f} s", flush=True)

    # 3. greedy probes, each run alone
    probes = []
    for rank in sorted({0, 1, 2, 3, 5, 8, 13, 21, 34, args.adapters // 2, args.adapters - 1}):
        name = order[rank]
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
        body = {"model": name, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        status, raw = call(port, "POST", "/v1/completions", body, key=keys[owner[name]])
        if status == 429:  # the rate-limited tenant: wait for its bucket
            time.sleep(1 / args.rate + 0.5)
            status, raw = call(port, "POST", "/v1/completions", body, key=keys[owner[name]])
        assert status == 200, raw
        text = json.loads(raw)["choices"][0]["text"]
        probes.append({**body, "text": text, "rank": rank})
    print(f"{len(probes)} probe references done", flush=True)

    # 4. locust
    plan = {
        "tenants": keys,
        "adapters": [[n, owner[n]] for n in order],
        "alpha": args.alpha,
        "stream_share": 0.5,
        "probe_share": 0.2,
        "probes": probes,
        "words": WORDS,
        "prompt_words": [12, 48],
        "max_tokens": [16, 48],
        "wait": [0.5, 2.0],
    }
    (work / "plan.json").write_text(json.dumps(plan))
    lenv = {**os.environ, "NORA_LOCUST_PLAN": str(work / "plan.json"),
            "NORA_LOCUST_SAMPLES": str(work / "samples.json")}  # fmt: skip
    rss: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_rss(t_start):
        while not stop.is_set():
            rss.append((round(time.monotonic() - t_start, 1), round(rss_mb(server.pid), 1)))
            stop.wait(5.0)

    m0 = metrics(port, keys["ops"])
    lcmd = [locust, "-f", str(HERE / "serving_locust.py"), "--headless", "-u", str(args.users),
            "-r", str(args.spawn_rate), "-t", f"{args.duration}s", "--host",
            f"http://127.0.0.1:{port}", "--csv", str(work / "locust"), "--only-summary",
            "--stop-timeout", "120", "--loglevel", "WARNING"]  # fmt: skip
    t_start = time.monotonic()
    threading.Thread(target=sample_rss, args=(t_start,), daemon=True).start()
    lrun = subprocess.run(lcmd, env=lenv, capture_output=True, text=True)
    elapsed = time.monotonic() - t_start
    stop.set()
    (work / "locust.log").write_text(lrun.stdout + lrun.stderr)
    m1 = metrics(port, keys["ops"])

    # 5. drain and exit
    server.send_signal(signal.SIGTERM)
    try:
        exit_code = server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        exit_code = "did not exit within 120 s"

    # 6. results
    samples = json.loads((work / "samples.json").read_text())
    outcomes = Counter(o for _, _, o in samples["outcomes"])
    by_kind = Counter((name, o) for _, name, o in samples["outcomes"])
    unexpected = {o: c for o, c in outcomes.items() if o != "ok" and not o.startswith(SHED)}
    ok = outcomes["ok"]
    probe_ok = sum(c for (n, o), c in by_kind.items() if n.startswith("probe") and o == "ok")
    probe_bad = sum(c for (n, o), c in by_kind.items() if o == "greedy mismatch")
    # memory: the samples under load after the warm-up share of the run
    base = [r for t, r in rss if args.warmup * args.duration <= t <= args.duration]
    ref_rss = base[0] if base else float("nan")
    locust_stats = list(csv.DictReader(open(work / "locust_stats.csv")))
    gen = m1["nora_generated_tokens_total"] - m0["nora_generated_tokens_total"]
    result = {
        "command": "python benchmarks/serving_locust_run.py " + " ".join(sys.argv[1:]),
        "machine": info,
        "loadavg_end": os.getloadavg(),
        "config": {k: v for k, v in vars(args).items() if k not in ("locust", "out")},
        "elapsed_s": round(elapsed, 1),
        "requests": sum(outcomes.values()),
        "ok": ok,
        "requests_per_s": round(ok / elapsed, 3),
        "offered_per_s": round(sum(outcomes.values()) / elapsed, 3),
        "generated_tokens_per_s": round(gen / elapsed, 2),
        "outcomes": dict(outcomes),
        "outcomes_by_request_kind": {f"{n}: {o}": c for (n, o), c in sorted(by_kind.items())},
        "unexpected_errors": unexpected,
        "probes_equal_alone": [probe_ok, probe_ok + probe_bad],
        "shed_share": round(1 - ok / max(1, sum(outcomes.values())), 3),
        "ttft_s": {
            "n": len(samples["ttft"]),
            "p50": percentile(samples["ttft"], 50),
            "p99": percentile(samples["ttft"], 99),
        },  # fmt: skip
        "tpot_s": {
            "n": len(samples["tpot"]),
            "p50": percentile(samples["tpot"], 50),
            "p99": percentile(samples["tpot"], 99),
        },  # fmt: skip
        "rss_mb": rss,
        "rss_after_warmup_mb": ref_rss,
        "rss_end_of_load_mb": base[-1] if base else None,
        "rss_min_max_after_warmup_mb": [min(base), max(base)] if base else None,
        "rss_change_after_warmup_pct": round(100 * (base[-1] - ref_rss) / ref_rss, 2),
        "rss_max_deviation_after_warmup_pct": round(
            100 * max(abs(v - ref_rss) for v in base) / ref_rss, 2
        ),
        "server": {
            "exit_code_after_sigterm": exit_code,
            "adapter_loads": m1["nora_adapter_loads_total"] - m0["nora_adapter_loads_total"],
            "evictions": m1["nora_adapter_evictions_total"] - m0["nora_adapter_evictions_total"],
            "batch_occupancy_mean": (
                m1["nora_batch_occupancy_sum"] - m0["nora_batch_occupancy_sum"]
            )
            / max(1, m1["nora_batch_occupancy_count"] - m0["nora_batch_occupancy_count"]),
            "ttft_mean_s": (
                m1["nora_time_to_first_token_seconds_sum"]
                - m0["nora_time_to_first_token_seconds_sum"]
            )
            / max(
                1,
                m1["nora_time_to_first_token_seconds_count"]
                - m0["nora_time_to_first_token_seconds_count"],
            ),
        },
        "locust_stats": locust_stats,
    }
    statuses = Counter()
    for k, v in m1.items():
        if k.startswith("nora_requests_total{"):
            statuses[k.split("status=")[1].rstrip("}")] += v - m0.get(k, 0)
    result["server"]["requests_by_status"] = dict(statuses)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(report(result))
    print(report(result))
    shutil.rmtree(work / "adapters", ignore_errors=True)
    print(f"logs: {work}")


def report(r: dict) -> str:
    c, m = r["config"], r["machine"]
    ms = lambda v: f"{1000 * v:.0f}"  # noqa: E731
    lines = [
        "# Serving load test with tenants (issue 14, locust)",
        "",
        f"Command: `{r['command']}`.",
        f"Machine: {m.get('cpu', 'CPU')}, {m.get('cores', '?')} cores, shared with other jobs "
        f"(load average at start {tuple(round(x, 2) for x in m['loadavg_start'])}, at end "
        f"{tuple(round(x, 2) for x in r['loadavg_end'])}); torch {m.get('torch')}, server torch "
        f"threads {c['threads']}.",
        "",
        f"`nora serve` (the CLI, a subprocess) with SmolLM2-135M fp32 over {c['adapters']} random "
        f"adapters (r = 16 on q, v) owned by {c['tenants']} tenants (keys from a file; the last "
        f"tenant limited to {c['rate']} requests/s), at most {c['max_resident']} resident, batch "
        f"<= {c['max_batch']}, waiting queue <= {c['max_waiting']}. Locust, headless: "
        f"{c['users']} users for {r['elapsed_s']:.0f} s, power-law popularity (alpha = "
        f"{c['alpha']}), half of the requests streamed, 20 % greedy probes compared with the "
        "same request run alone; 16-48 new tokens, prompts of 12-48 words; a user waits 0.5-2 s "
        "between requests, and the Retry-After seconds after a 429 / 503.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| requests (all outcomes) / answered | {r['requests']} / {r['ok']} |",
        f"| answered requests / s (offered) | {r['requests_per_s']} ({r['offered_per_s']}) |",
        f"| generated tokens / s | {r['generated_tokens_per_s']} |",
        f"| TTFT p50 / p99 (streamed, client side) | {ms(r['ttft_s']['p50'])} / {ms(r['ttft_s']['p99'])} ms (n = {r['ttft_s']['n']}) |",
        f"| per-token latency p50 / p99 | {ms(r['tpot_s']['p50'])} / {ms(r['tpot_s']['p99'])} ms (n = {r['tpot_s']['n']}) |",
        f"| greedy probes answered: equal to the request alone | {r['probes_equal_alone'][0]} / {r['probes_equal_alone'][1]} |",
        f"| refused on purpose (429 + 503) | {100 * r['shed_share']:.1f} % of requests |",
        f"| **unexpected errors** | **{sum(r['unexpected_errors'].values())}** {r['unexpected_errors'] or ''} |",
        f"| RSS under load after warm-up: first -> last (min, max) | {r['rss_after_warmup_mb']:.0f} -> {r['rss_end_of_load_mb']:.0f} MB ({r['rss_change_after_warmup_pct']:+.1f} %; {r['rss_min_max_after_warmup_mb'][0]:.0f}, {r['rss_min_max_after_warmup_mb'][1]:.0f}) |",
        f"| RSS largest deviation from the first sample after warm-up | {r['rss_max_deviation_after_warmup_pct']:.1f} % |",
        f"| adapter loads / evictions (server) | {r['server']['adapter_loads']:.0f} / {r['server']['evictions']:.0f} |",
        f"| mean batch occupancy (server) | {r['server']['batch_occupancy_mean']:.2f} |",
        f"| exit status after SIGTERM | {r['server']['exit_code_after_sigterm']} |",
        "",
        "Outcomes by kind (client side; HTTP 429 / 503 are the shedding provoked on purpose):",
        "",
        "| request kind: outcome | count |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in r["outcomes_by_request_kind"].items()],
        "",
        f"Server-side status counts (/metrics): {r['server']['requests_by_status']}.",
        "",
        "RSS of the server over time (s: MB): "
        + ", ".join(f"{t:.0f}: {v:.0f}" for t, v in r["rss_mb"][:: max(1, len(r["rss_mb"]) // 20)]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
