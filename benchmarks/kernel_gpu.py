"""GPU check of the segmented multi-adapter kernel (`nora.kernels`): correctness against the
PyTorch reference, then time against the eager per-adapter loop and the bandwidth bound of
reading every adapter's A and B once. Needs a CUDA GPU and Triton; prints and writes JSON.

    python benchmarks/kernel_gpu.py --out benchmarks/results/kernel_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from nora.experiments import machine_info
from nora.kernels import segmented_delta, segmented_delta_reference, stack_adapters, tiles


def timed(fn, reps: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        fn()
    out = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kernel_gpu.json")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35, help="HBM bandwidth (H100: 3.35)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev, k, d, r = "cuda", 4096, 4096, 16
    rows = []
    for n_adapters, tokens in [(64, 64), (16, 16), (64, 1024), (1, 64)]:
        g = torch.Generator(device="cpu").manual_seed(0)
        ads = [
            (torch.randn(r, k, generator=g) / k**0.5, torch.randn(d, r, generator=g) / r**0.5, 1.0)
            for _ in range(n_adapters)
        ]
        A, B = (t.to(dev, torch.bfloat16) for t in stack_adapters(ads))
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
        idx = torch.arange(tokens, device=dev) % n_adapters
        y0 = torch.zeros(tokens, d, device=dev, dtype=torch.bfloat16)
        ref = segmented_delta_reference(
            x.float(), y0.float().clone(), idx, A.float(), B.float(), "silu"
        )
        got = segmented_delta(x, y0.clone(), idx, A, B, "silu").float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        meta = tiles(idx, 16)
        t_kernel = timed(lambda: segmented_delta(x, y0.clone(), idx, A, B, "silu", meta=meta))
        t_eager = timed(lambda: segmented_delta_reference(x, y0.clone(), idx, A, B, "silu"))
        used = idx.unique().numel()
        bound = used * A.shape[1] * (k + d) * 2 / (args.bandwidth_tbs * 1e12)
        rows.append(
            {
                "adapters": n_adapters,
                "tokens": tokens,
                "rel_err": err,
                "kernel_us": t_kernel * 1e6,
                "eager_us": t_eager * 1e6,
                "speedup_vs_eager": t_eager / t_kernel,
                "bandwidth_bound_us": bound * 1e6,
            }
        )
        print(rows[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
