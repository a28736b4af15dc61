"""One prepared GPU check of nora's core (run on a lent CUDA machine; CI never has one).

    PYTHONPATH=src python benchmarks/gpu_check.py --out $OUT/gpu_check.json

1. Every method on CUDA in float32 (TF32 off) equals the float64 CPU reference: adapter
   output, and the fused training node's gradients equal plain autograd's.
2. A bfloat16-autocast training step of every method runs and gives finite gradients.
3. Multi-adapter serving on CUDA: a mixed batch over all five methods equals each row alone.
4. Per-token σ in the stacked layout (n = tokens, L = 1), the layout a serving engine with a
   fixed slot table uses: captured once in a CUDA graph, replayed with another token→adapter
   map, equal to the eager result (no data-dependent Python in the step).
5. Timing (CUDA events): a 16-adapter mixed decode step, 16 LoRA vs 16 NoRA (ratio).

Prints one line per check ("ok"/"FAIL") and writes JSON. Expected on an H200: every check ok,
max errors ≤ 1e-5 (float32) and the NoRA/LoRA decode ratio near 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import nora  # noqa: E402
from nora.adapters import METHODS  # noqa: E402
from nora.serving import MultiAdapterModel  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
torch.backends.cudnn.allow_tf32 = False
DEV = "cuda"
SPECS = {
    "lora": dict(method="lora", r=8, alpha=16.0),
    "nora": dict(method="nora", r=8, scale=2.5),
    "nora-relu": dict(method="nora", r=4, activation="relu"),
    "nolora": dict(method="nolora", r=6),
    "aurora": dict(method="aurora", r=4),
    "loran": dict(method="loran", r=4, sinter_a=0.05, sinter_omega=5.0),
}
results: dict = {"checks": {}}


def check(name: str, ok: bool, **info) -> None:
    results["checks"][name] = {"ok": bool(ok), **info}
    print(("ok   " if ok else "FAIL ") + name, info, flush=True)


def tiny(seed: int = 0):
    from conftest import tiny_llama

    return tiny_llama(seed=seed, hidden=64)


def adapter(method_cfg: dict, k=64, d=48, device="cpu", dtype=torch.float64):
    cfg = nora.AdapterConfig(init_weights=False, **method_cfg)
    a = METHODS[cfg.method](k, d, cfg, device=device, dtype=dtype)
    torch.manual_seed(0)
    a.reset_parameters(False)
    return a


def check_methods() -> None:
    x64 = torch.randn(37, 64, dtype=torch.float64)
    for name, spec in SPECS.items():
        ref = adapter(spec).eval()
        gpu = adapter(spec, device=DEV, dtype=torch.float32).eval()
        gpu.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        with torch.no_grad():
            err = (gpu(x64.float().to(DEV)).double().cpu() - ref(x64)).abs().max().item()
        check(f"forward {name} cuda fp32 = cpu fp64", err < 1e-4, max_err=err)
        # dropout 0 here: CUDA's F.dropout draws its mask differently from the fused node's
        # (which matches the CPU draw bit for bit); the math after the mask is what is compared
        gpu = adapter(dict(spec, dropout=0.0), device=DEV, dtype=torch.float32).train()
        x = x64.float().to(DEV).requires_grad_(True)
        grads = []
        for fused in (True, False):
            gpu.zero_grad()
            x.grad = None
            torch.manual_seed(1)
            with nora.fused.fused(fused):
                gpu(x).square().sum().backward()
            grads.append([x.grad.clone(), *(p.grad.clone() for p in gpu.parameters())])
        err = max(
            ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for a, b in zip(*grads, strict=True)
        )
        check(f"train {name} fused = plain on cuda", err < 1e-5, max_rel_err=err)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            out = gpu(x)
        out.float().square().sum().backward()
        finite = all(torch.isfinite(p.grad).all() for p in gpu.parameters())
        check(f"train {name} bf16 autocast", finite and out.dtype == torch.bfloat16)


def check_serving(root: Path) -> None:
    from conftest import randomize

    for i, (name, spec) in enumerate(SPECS.items()):
        m = nora.inject(tiny(), nora.AdapterConfig(init_weights=False, **spec))
        randomize(m, i)
        nora.save_adapter(m, root / name)
    multi = MultiAdapterModel(tiny().to(DEV))
    for name in SPECS:
        multi.add(name, root / name)
    names = [*SPECS, None, "nora", "aurora"]
    ids = torch.randint(0, 96, (len(names), 11), device=DEV)
    with torch.no_grad():
        out = multi(ids, adapters=names).logits
        errs = []
        for b, name in enumerate(names):
            solo = tiny().to(DEV)
            if name is not None:
                nora.load_adapter(solo, root / name)
            errs.append((out[b] - solo(ids[b : b + 1]).logits[0]).abs().max().item())
    check("serving mixed batch = each alone (cuda fp32)", max(errs) < 1e-4, max_err=max(errs))


def per_token_delta(x, slot, st, kind):  # x (T, k), slot (T,) -> (T, d); no Python branches
    A, B = st.A[slot], st.B[slot]  # (T, k, R), (T, R, d)
    p = {k: v[slot] for k, v in st.p.items()}  # (T, 1, R, ...) / (T, R, R)
    z = torch.bmm(x.unsqueeze(1), A)  # (T, 1, R)
    return torch.bmm(METHODS[kind[0]].sigma(kind, z, p), B).squeeze(1)


def check_cuda_graph() -> None:
    for name in ("nora", "nolora", "aurora"):
        spec = SPECS[name]
        packs = [
            adapter(dict(spec, r=r), device=DEV, dtype=torch.float32).pack() for r in (2, 4, 8)
        ]
        st = METHODS[packs[0].kind[0]].stack(packs)
        kind = packs[0].kind
        x = torch.randn(64, 64, device=DEV)
        slot = torch.randint(0, 3, (64,), device=DEV)
        per_token_delta(x, slot, st, kind)  # warm-up on a side stream, as CUDA graphs want
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = per_token_delta(x, slot, st, kind)
        slot.copy_(torch.randint(0, 3, (64,), device=DEV))  # another batch composition
        g.replay()
        ref = torch.stack(
            [
                METHODS[kind[0]].sigma(kind, x[t] @ packs[s].A, packs[s].p) @ packs[s].B
                for t, s in enumerate(slot.tolist())
            ]
        )
        err = (out - ref).abs().max().item()
        check(f"cuda graph per-token σ {name}, mixed ranks", err < 1e-4, max_err=err)


def timed(fn, reps: int = 30) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end))
    return statistics.median(ts)


def check_timing(root: Path) -> None:
    from conftest import randomize, tiny_llama

    base = tiny_llama(hidden=1024, layers=4, vocab=4096, intermediate_size=2816)
    base = base.to(DEV, torch.bfloat16)
    multi = MultiAdapterModel(base)
    for method in ("lora", "nora"):
        for i in range(16):
            m = nora.inject(
                tiny_llama(hidden=1024, layers=4, vocab=4096, intermediate_size=2816),
                nora.AdapterConfig(method=method, r=16, init_weights=False),
            )
            randomize(m, i)
            nora.save_adapter(m, root / f"{method}{i}")
            multi.add(f"{method}{i}", root / f"{method}{i}")
    ids = torch.randint(0, 4096, (16, 1), device=DEV)
    ms = {}
    with torch.no_grad():
        for _rep in range(3):  # interleaved
            for method in ("lora", "nora"):
                names = [f"{method}{i}" for i in range(16)]
                ms.setdefault(method, []).append(timed(lambda n=names: multi(ids, adapters=n)))
    lo, no = statistics.median(ms["lora"]), statistics.median(ms["nora"])
    results["decode_16_adapters_ms"] = {"lora": lo, "nora": no, "nora_over_lora": no / lo}
    check("timing decode 16 distinct adapters (bf16)", True, lora_ms=lo, nora_ms=no, ratio=no / lo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="checks 1-3 on the CPU (a dry run)")
    args = ap.parse_args()
    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU"
    results["device"] = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    results["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        steps = [check_methods, lambda: check_serving(Path(tmp))]
        if DEV == "cuda":
            steps += [check_cuda_graph, lambda: check_timing(Path(tmp))]
        for step in steps:
            try:
                step()
            except Exception as e:  # one failing part must not hide the others
                check(f"{getattr(step, '__name__', 'step')} raised", False, error=repr(e))
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("all ok" if all(c["ok"] for c in results["checks"].values()) else "SOME FAILED")


if __name__ == "__main__":
    main()
