"""The Triton serving backend (`nora.kernels` behind `serving.backend.TritonBackend`) against
the reference loop, case by case: every supported kind, mixed ranks, tokens with no adapter,
float32 and bfloat16. Without a GPU the kernels run in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1), which is slow: the shapes are tiny."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import nora
from nora import kernels
from nora.activations import REGISTRY, make_activation
from nora.adapters import METHODS, Adapter
from nora.serving.backend import (
    BACKENDS,
    ReferenceBackend,
    TritonBackend,
    kernel_sigma,
    select_backend,
)
from nora.serving.plan import BatchPlan

needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_gpu.py"

K, D = 72, 24  # k = two of the shrink's 64-wide chunks, so split_k=2 really splits
RANKS = (2, 5, 3)  # mixed ranks in one stack: R = 5, padded to 16 inside the kernels
# every kind the Triton backend supports: LoRA, NoRA with every built-in activation, NoLoRA
KINDS = {
    "lora": dict(method="lora"),
    **{f"nora-{a}": dict(method="nora", activation=a) for a in sorted(kernels.ACTIVATIONS)},
    "nolora-learnable": dict(method="nolora"),  # v ⊙ z·sigmoid(β ⊙ z)
    "nolora-silu": dict(method="nolora", activation="silu"),
    "nolora-sinter": dict(method="nolora", activation="sinter"),
}
# token layouts: adapter index per token (None: no adapter), and the shrink's k split
LAYOUTS = {
    "mixed": ([0, None, 1, 2, 0, None, 2, 2, 1], 2),  # uneven segments, base tokens between
    "one adapter, every token": ([1] * 5, 1),  # all_rows: rows read as 0..N-1
    "long segment": ([0] * 70 + [None, 2, None], None),  # 70 tokens: two 64-token tiles
}
# of max |reference|; bf16: the latent rounded to bf16 before the expand, the output on store
TOL = {torch.float32: 1e-4, torch.bfloat16: 2**-6}


def adapters(cfg: dict, dtype: torch.dtype, seed: int = 0) -> list[Adapter]:
    """One adapter per rank, every parameter random (σ's tensors too; sinter's a, ω per
    adapter), so a kernel that skips σ or mixes up whose tensors apply where is caught."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(RANKS):
        extra = dict(sinter_a=0.2 + 0.2 * i, sinter_omega=2.0 + i)
        c = nora.AdapterConfig(r=r, init_weights=False, dropout=0.0, **extra, **cfg)
        a = METHODS[c.method](K, D, c, dtype=dtype)
        with torch.no_grad():
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out.append(a.eval())
    return out


def run(case: str, layout: str, dtype: torch.dtype, backend) -> tuple[torch.Tensor, ...]:
    """(x, out before, out after `backend`, the reference's out in float32) for one case."""
    ads = adapters(KINDS[case], dtype)
    tokens, _ = LAYOUTS[layout]
    packed = {i + 1: a.pack() for i, a in enumerate(ads)}  # uid 0 is the base
    kind = packed[1].kind
    uids = torch.tensor([0 if t is None else t + 1 for t in tokens])
    seg = BatchPlan.build(uids, {u: kind for u in packed}).groups[kind]
    stack = METHODS[kind[0]].stack([packed[u] for u in seg.uids])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(tokens), K, generator=g).to(dtype)  # (N, k)
    out0 = torch.randn(len(tokens), D, generator=g).to(dtype)  # (N, d): the base output
    got = out0.clone()
    backend.add_delta(kind, seg, x, got, packed, lambda: stack)
    # the reference on the same (rounded) inputs, computed in float32
    up = {u: type(w)(w.kind, w.r, _f32(w.A), _f32(w.B), p=_f32(w.p)) for u, w in packed.items()}
    ref = out0.float().clone()  # (N, d): .float() of float32 is out0 itself
    ReferenceBackend().add_delta(kind, seg, _f32(x), ref, up, lambda: None)
    return x, out0, got, ref, tokens


def _f32(t):
    return {k: v.float() for k, v in t.items()} if isinstance(t, dict) else t.float()


def check(out0, got, ref, tokens, dtype):
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert err < TOL[dtype], err
    for t, a in enumerate(tokens):
        if a is None:  # a token with no adapter: its row is untouched, bit for bit
            assert torch.equal(got[t], out0[t])
        else:  # the adapter really changed it
            assert not torch.allclose(got[t].float(), out0[t].float(), atol=1e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(KINDS))
def test_every_supported_kind_matches_the_reference(case, dtype):
    _, split = LAYOUTS["mixed"]
    x, out0, got, ref, tokens = run(case, "mixed", dtype, TritonBackend(split_k=split))
    check(out0, got, ref, tokens, dtype)


@needs_triton
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", ["nora-silu", "nolora-learnable"])
def test_token_layouts_match_the_reference(case, layout):
    _, split = LAYOUTS[layout]
    x, out0, got, ref, tokens = run(case, layout, torch.float32, TritonBackend(split_k=split))
    check(out0, got, ref, tokens, torch.float32)


def test_every_built_in_activation_has_a_kernel():
    assert set(kernels.ACTIVATIONS) == set(REGISTRY)
    for name, (_, keys) in kernels.ACTIVATIONS.items():  # the kernel reads what fn reads
        act = make_activation(name, 4, nora.AdapterConfig())
        assert set(keys) == set(act.params()), name


class _ReLoRA(Adapter):  # a method of its own σ, unknown to the kernels
    name = "_test_relu_lora"

    @classmethod
    def sigma(cls, kind, z, p):
        return torch.relu(z)


@pytest.mark.parametrize(
    "kind, sigma",
    [
        (("lora",), kernels.Sigma("identity")),
        (("nora", "gelu"), kernels.Sigma("gelu")),
        (("nora", "learnable"), kernels.Sigma("learnable")),
        (("nolora", "learnable"), kernels.Sigma("learnable", "v")),
        (("nolora", "sinter"), kernels.Sigma("sinter", "v")),
        (("aurora", -1.0, 0.4, 8, 3), None),  # σ mixes channels: Torch
        (("loran", "sinter"), None),  # dense: nothing to shrink
        ((_ReLoRA.name,), None),  # its own σ: the kernels do not know it
    ],
)
def test_kernel_sigma_is_asked_of_the_class(kind, sigma, monkeypatch):
    monkeypatch.setitem(METHODS, _ReLoRA.name, _ReLoRA)
    assert kernel_sigma(kind) == sigma
    assert TritonBackend().supports(kind) == (sigma is not None)


def test_select_backend_on_this_machine():
    assert select_backend("torch") is BACKENDS["torch"]
    expect = "triton" if "triton" in BACKENDS and torch.cuda.is_available() else "torch"
    assert select_backend().name == expect  # the default: Triton on CUDA only
    with pytest.raises(ValueError, match="unknown serving backend 'cuda'"):
        select_backend("cuda")


@needs_triton
def test_segment_bounds_go_to_the_device_once_per_segments():
    b = TritonBackend()
    seg = BatchPlan.build(torch.tensor([1, 2, 2, 0, 1]), {1: ("lora",), 2: ("lora",)})
    seg = seg.groups[("lora",)]
    starts = b.starts(seg, torch.device("cpu"))
    assert starts.tolist() == [0, 2, 4] and starts.dtype == torch.int32
    assert b.starts(seg, torch.device("cpu")) is starts  # every layer of the step reuses it
    del seg
    assert not b._starts  # forgotten with its step


@needs_triton
def test_cpu_tensors_outside_the_interpreter_run_torch(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "add_delta", lambda *a, **k: pytest.fail("kernel launched"))
    x, out0, got, ref, tokens = run("nora-silu", "mixed", torch.float32, TritonBackend())
    check(out0, got, ref, tokens, torch.float32)


@needs_triton
def test_unknown_activation_is_refused():
    z = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="activation 'swish' has no kernel"):
        kernels.add_delta(
            z, z, torch.zeros(1, dtype=torch.long), z, 1, z, z, kernels.Sigma("swish"), {}
        )


@needs_triton
def test_the_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("nora_kernel_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "k.json"
    mod.main(["--tiny", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["failures"] == [] and res["rows"]
    row = res["rows"][0]
    assert {"kernel_us", "torch_us", "hbm_bound_us", "vs_bound", "vs_torch"} <= set(row)
