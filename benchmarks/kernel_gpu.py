"""GPU check of the segmented multi-adapter kernel (`nora.kernels`): precision first, then time
against the eager per-adapter loop and the bandwidth bound of reading every adapter's A and B
once. Needs a CUDA GPU and Triton; prints, writes JSON, and exits non-zero if a check fails.

    python benchmarks/kernel_gpu.py --out benchmarks/results/kernel_gpu.json

Precision. On NVIDIA GPUs `tl.dot` on float32 defaults to TF32 (inputs rounded to 10 mantissa
bits, ~5e-4 relative); the kernel pins "ieee" for float32 inputs. Float32 rows are compared
with a float64 reference at FP32_TOL, which float32 accumulation over k = 4096 meets ~10x
over and TF32 misses ~10x over; the same rows are also run with precision="tf32" to show the
tolerance tells the two apart (that run must FAIL the tolerance). bf16 rows are compared at
BF16_TOL: the output is stored in bf16, so its own rounding (up to 2^-8 relative) dominates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from nora.kernels import segmented_delta, segmented_delta_reference, stack_adapters, tiles
from nora.study.sweep import machine_info

FP32_TOL = 1e-5  # max |error| / max |reference|
BF16_TOL = 2**-7  # one bf16 ulp at the top of a binade: the output's storage rounding


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


def problem(n_adapters: int, tokens: int, dtype: torch.dtype, k: int = 4096, d: int = 4096, r=16):
    g = torch.Generator(device="cpu").manual_seed(0)
    ads = [
        (torch.randn(r, k, generator=g) / k**0.5, torch.randn(d, r, generator=g) / r**0.5, 1.0)
        for _ in range(n_adapters)
    ]
    A, B = (t.to("cuda", dtype) for t in stack_adapters(ads))
    x = torch.randn(tokens, k, generator=g).to("cuda", dtype)
    idx = torch.arange(tokens, device="cuda") % n_adapters
    y0 = torch.zeros(tokens, d, device="cuda", dtype=dtype)
    return x, y0, idx, A, B


def rel_err(x, y0, idx, A, B, **kw) -> float:
    """Kernel vs the PyTorch reference in float64 on the same (already rounded) inputs."""
    ref = segmented_delta_reference(
        x.double(), y0.double(), idx, A.double(), B.double(), "silu"
    )  # (T, d)
    got = segmented_delta(x, y0.clone(), idx, A, B, "silu", **kw).double()
    return ((got - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kernel_gpu.json")
    ap.add_argument(
        "--bandwidth-tbs", type=float, default=4.8, help="HBM TB/s (H100 3.35, H200 4.8)"
    )
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    failures = []

    precision_rows = []
    for n_adapters, tokens in [(8, 64), (64, 1024)]:
        x, y0, idx, A, B = problem(n_adapters, tokens, torch.float32)
        row = {
            "adapters": n_adapters,
            "tokens": tokens,
            "fp32_default_rel_err": rel_err(x, y0, idx, A, B),  # pinned: ieee
            "fp32_tf32_rel_err": rel_err(x, y0, idx, A, B, precision="tf32"),
            "tol": FP32_TOL,
        }
        precision_rows.append(row)
        print("precision", row)
        if not row["fp32_default_rel_err"] < FP32_TOL:
            failures.append(f"float32 kernel misses {FP32_TOL:g}: {row}")
        if not row["fp32_tf32_rel_err"] > FP32_TOL:
            failures.append(f"the tolerance does not catch TF32: {row}")

    rows = []
    for n_adapters, tokens in [(64, 64), (16, 16), (64, 1024), (1, 64)]:
        x, y0, idx, A, B = problem(n_adapters, tokens, torch.bfloat16)
        err = rel_err(x, y0, idx, A, B)
        if not err < BF16_TOL:
            failures.append(
                f"bf16 kernel misses {BF16_TOL:g}: {n_adapters} adapters, {tokens} tokens: {err:.3g}"
            )
        meta = tiles(idx, 16)
        t_kernel = timed(lambda: segmented_delta(x, y0.clone(), idx, A, B, "silu", meta=meta))
        t_ieee = timed(
            lambda: segmented_delta(x, y0.clone(), idx, A, B, "silu", meta=meta, precision="ieee")
        )
        t_eager = timed(lambda: segmented_delta_reference(x, y0.clone(), idx, A, B, "silu"))
        used = idx.unique().numel()
        bound = used * A.shape[1] * (A.shape[2] + B.shape[1]) * 2 / (args.bandwidth_tbs * 1e12)
        rows.append(
            {
                "adapters": n_adapters,
                "tokens": tokens,
                "rel_err": err,
                "kernel_us": t_kernel * 1e6,  # default for bf16: tf32 dots (exact products)
                "kernel_ieee_us": t_ieee * 1e6,
                "eager_us": t_eager * 1e6,
                "speedup_vs_eager": t_eager / t_kernel,
                "bandwidth_bound_us": bound * 1e6,
            }
        )
        print(rows[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "precision": precision_rows, "rows": rows}
    Path(args.out).write_text(json.dumps({**result, "failures": failures}, indent=1))
    for f in failures:
        print("FAIL:", f)
    print("PASS" if not failures else f"{len(failures)} check(s) failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
