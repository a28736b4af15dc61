"""QLoRA setting on the embedded default: the same NoRA run over a float32, an 8-bit and a
4-bit (NF4) base. Peak training memory (resident set), time per step, held-out perplexity.

    .venv/bin/python benchmarks/qlora.py                # writes benchmarks/results/qlora.{json,md}
    .venv/bin/python benchmarks/qlora.py --steps 2 --n-train 8 --n-eval 8   # a smoke run

Each base runs in its own process (memory peaks do not mix), the three at the same time (on a
shared machine they see the same contention; times are comparable with each other only). Memory: the process's resident
set after loading (and quantizing) the base, and its peak during `train` (VmHWM, reset by
writing 5 to /proc/self/clear_refs once the base is loaded and glibc has returned the freed
float32 weights), and the bytes of the model's tensors (quantization states included). Time per step: median of the
steps after the first. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BASES = ("float32", "8bit", "4bit")


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def one(base: str, args) -> dict:
    import torch

    from nora.config import AdapterConfig, TrainConfig
    from nora.models import load_base_model
    from nora.quantize import quantize_base
    from nora.train import train

    torch.set_num_threads(args.threads)
    model, tok = load_base_model()
    if base != "float32":
        quantize_base(model, bits=4 if base == "4bit" else 8)
    weights = sum(t.nbytes for t in model.state_dict().values()) / 2**20  # incl. quant states
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed float32 weights back to the OS
    loaded = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            adapter=AdapterConfig(method="nora", r=16),
            data="math",
            n_train=args.n_train,
            n_eval=args.n_eval,
            max_len=256,
            max_steps=args.steps,
            batch_size=4,
            lr=1e-3,
            load_in_4bit=base == "4bit",
            load_in_8bit=base == "8bit",
            output_dir=out,
        )
        result = train(cfg, model=model, tokenizer=tok, progress=args.progress)
    times = [
        b.elapsed_s - a.elapsed_s for a, b in zip(result.history, result.history[1:], strict=False)
    ]
    return {
        "base": base,
        "weights_mib": weights,
        "rss_loaded_mib": loaded / 1024,
        "peak_train_rss_mib": _kib("VmHWM") / 1024,
        "step_s_median": statistics.median(times) if times else result.train_time_s,
        "eval_ppl": result.eval_ppl,
        "final_train_loss": result.final_train_loss,
        "steps": result.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=80)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr")
    ap.add_argument("--base", choices=BASES, help="run one base in this process (internal)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.base:
        print(json.dumps(one(args.base, args)))
        return
    # the three run at once: on a shared machine they then see the same contention
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--base", base, *sys.argv[1:]],
            stdout=subprocess.PIPE,
            text=True,
        )
        for base in BASES
    ]
    rows = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{proc.args} failed ({proc.returncode})")
        rows.append(json.loads(stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.machine(),
    )  # fmt: skip
    meta = {"command": "benchmarks/qlora.py " + " ".join(sys.argv[1:]), "cpu": cpu,
            "cores": os.cpu_count(), "threads": args.threads}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qlora.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    ref = rows[0]
    lines = [
        "| base | model tensors (MiB) | RSS after load (MiB) | peak RSS in training (MiB) "
        "| s / step | vs float32 | held-out PPL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['base']} | {r['weights_mib']:.0f} | {r['rss_loaded_mib']:.0f} | "
            f"{r['peak_train_rss_mib']:.0f} | "
            f"{r['step_s_median']:.2f} | {r['step_s_median'] / ref['step_s_median']:.2f}x | "
            f"{r['eval_ppl']:.3f} |"
        )
    (args.out / "qlora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
