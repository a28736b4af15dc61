"""Triton kernels for the serving step's adapter delta: out[t] += σ(x[t]·A_a)·B_a for the
adapter a of token t, as two launches near the bandwidth bound (vLLM punica's shrink → expand
split, with σ in between). `serving.backend.TritonBackend` calls them.

The inputs are what serving already holds, never a second copy: `rows` and `starts` come
from the step's `Segments` (the tokens of segment a are rows[starts[a] : starts[a + 1]]),
A (n, k, R), B (n, R, d) and σ's tensors p are the kind's `Adapter.stack` (ranks zero-padded
to R; p[key] (n, 1, R) per channel, (n, 1, 1) per adapter). Each op, by its reference loop:

    shrink(x, rows, starts, A, S) -> zp (S, M, R_pad) float32:
        for a in range(n):
            for m in range(starts[a], starts[a + 1]):       # the tokens of segment a
                for s in range(S):                          # k split into S slices ks
                    zp[s, m] = x[rows[m], ks] @ A[a, ks]     # partial sums, R_pad-wide

    expand(zp, rows, starts, B, σ, p, out):
        for a in range(n):
            for m in range(starts[a], starts[a + 1]):
                z = zp[:, m].sum(0)                          # σ sees the full sum, never a part
                out[rows[m]] += σ(z, p[a]) @ B[a]            # σ in the expand's prologue

Grids: shrink (token tiles, n, S), expand (token tiles, n, d blocks): a decode step with a few
tokens still fills the GPU through S and the d blocks. A program reads its segment's bounds
from `starts` on the device and returns if its tile is past the end, so the grid depends
only on host ints the plan already has (the longest segment L, n, d) and nothing here reads a
device value on the host: no `.item()`, no `.tolist()`, no sort, no gather copies of x or out
(rows are read through pointers). A CUDA graph captured at an upper bound of L and n replays
for any batch that fits.

σ is element-wise here: `ACTIVATIONS` holds the Triton form of each built-in activation of
`nora.activations` (the math's one description; tests check each against its `fn`), with
the keys of p it reads, plus an optional per-channel gain after it (NoLoRA's v·f(z)).

Precision: `tl.dot` on float32 defaults to TF32 on NVIDIA GPUs (~5e-4 relative), which float32
callers do not expect, so float32 dots are pinned to "ieee"; 16-bit inputs accumulate in
float32. The latent stays float32 through σ and is rounded to B's dtype for the expand, as
the Torch backend's bf16 latent is. Under the CPU interpreter the dots' operands go up to
float32 first (Triton 3.9's interpreter misreads 16-bit `tl.dot` inputs): the same exact
products and float32 sums a GPU computes for bf16.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:  # Triton is optional: serving falls back to the Torch backend without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on CPU tensors (tests)

# activation name (nora.activations) -> (code in the kernels, keys of p it reads: per-channel
# tensors first, then per-adapter scalars, in the order the kernels take them)
ACTIVATIONS = {
    "identity": (0, ()),
    "relu": (1, ()),
    "silu": (2, ()),
    "gelu": (3, ()),
    "tanh": (4, ()),
    "sinter": (5, ("a", "omega")),  # z + a·z·sin(ω·z), a and ω per adapter
    "learnable": (6, ("beta",)),  # z·sigmoid(β ⊙ z), β per channel
}


@dataclass(frozen=True)
class Sigma:
    """σ(z) = gain ⊙ act(z) as the kernels compute it: `activation` names a key of
    `ACTIVATIONS`; `gain` is the key of a per-channel tensor of p, or None."""

    activation: str
    gain: str | None = None


def available(device: torch.device) -> bool:
    """The kernels can run on tensors of this device: CUDA, or CPU under the interpreter."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _programs_wanted(device: torch.device) -> int:
    """Enough programs for two waves over the GPU's SMs; 1 in the interpreter (no waves)."""
    if device.type != "cuda":
        return 1
    return _sm_waves(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _sm_waves(index: int) -> int:
    return 2 * torch.cuda.get_device_properties(index).multi_processor_count


if triton is not None:

    @triton.jit
    def _tile_rows(rows_ptr, m0, end, BLOCK_T: tl.constexpr, IDENTITY_ROWS: tl.constexpr):
        """A tile's positions m0 + (0 … BLOCK_T) within rows, their mask (< end), and the
        token rows they hold (rows[m] = m for one segment of every token in order)."""
        offs_m = m0 + tl.arange(0, BLOCK_T)
        mask_m = offs_m < end
        if IDENTITY_ROWS:
            rows = offs_m.to(tl.int64)
        else:
            rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
        return offs_m, mask_m, rows

    @triton.jit
    def _shrink_kernel(
        x_ptr,
        rows_ptr,
        starts_ptr,
        a_ptr,
        zp_ptr,
        M,
        K,
        R,
        K_PER_SPLIT,  # a multiple of BLOCK_K, so the splits never share a k
        stride_x,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        IDENTITY_ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        tile, seg, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, end = tl.load(starts_ptr + seg), tl.load(starts_ptr + seg + 1)
        m0 = start + tile * BLOCK_T
        if m0 >= end:  # past this segment's tokens (the grid is sized by the longest)
            return
        offs_m, mask_m, rows = _tile_rows(rows_ptr, m0, end, BLOCK_T, IDENTITY_ROWS)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        a_base = a_ptr + seg.to(tl.int64) * K * R  # A[seg] (K, R)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        k_lo = split * K_PER_SPLIT
        for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xt = tl.load(
                x_ptr + rows[:, None] * stride_x + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )  # (BLOCK_T, BLOCK_K)
            at = tl.load(
                a_base + offs_k[:, None] * R + offs_r[None, :],
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_R)
            if UPCAST:
                acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(xt, at.to(xt.dtype), input_precision=PRECISION)
        zp = zp_ptr + split * M * BLOCK_R + offs_m[:, None] * BLOCK_R + offs_r[None, :]
        tl.store(zp, acc, mask=mask_m[:, None])  # padded channels hold 0

    @triton.jit
    def _expand_kernel(
        zp_ptr,
        rows_ptr,
        starts_ptr,
        b_ptr,
        out_ptr,
        p0_ptr,  # σ's tensors: the activation's, by ACTIVATIONS' order of keys
        p1_ptr,
        gain_ptr,
        M,
        D,
        R,
        S,
        stride_o,
        ACT: tl.constexpr,
        GAIN: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        IDENTITY_ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        tile, seg, dblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, end = tl.load(starts_ptr + seg), tl.load(starts_ptr + seg + 1)
        m0 = start + tile * BLOCK_T
        if m0 >= end:
            return
        offs_m, mask_m, rows = _tile_rows(rows_ptr, m0, end, BLOCK_T, IDENTITY_ROWS)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        # prologue: the full latent (the sum of the shrink's k-slices), then σ on it
        z = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for s in range(S):
            zp = zp_ptr + s * M * BLOCK_R + offs_m[:, None] * BLOCK_R + offs_r[None, :]
            z += tl.load(zp, mask=mask_m[:, None], other=0.0)
        if ACT == 1:  # relu
            z = tl.maximum(z, 0.0)
        elif ACT == 2:  # silu
            z = z * tl.sigmoid(z)
        elif ACT == 3:  # gelu (erf form, F.gelu's default)
            z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        elif ACT == 4:  # tanh
            z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        elif ACT == 5:  # sinter: a, ω per adapter
            sa = tl.load(p0_ptr + seg).to(tl.float32)
            so = tl.load(p1_ptr + seg).to(tl.float32)
            z = z + sa * z * tl.sin(so * z)
        elif ACT == 6:  # learnable: β per channel
            beta = tl.load(p0_ptr + seg * R + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            z = z * tl.sigmoid(beta[None, :] * z)
        if GAIN:  # per-channel gain after the activation (NoLoRA's v)
            g = tl.load(gain_ptr + seg * R + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            z = z * g[None, :]
        offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        bt = tl.load(
            b_ptr + seg.to(tl.int64) * R * D + offs_r[:, None] * D + offs_d[None, :],
            mask=mask_r[:, None] & mask_d[None, :],
            other=0.0,
        )  # B[seg] block (BLOCK_R, BLOCK_D); padded channels: 0, whatever σ gave there
        h = z.to(bt.dtype)  # the latent rounded to B's dtype, as the Torch backend's is
        if UPCAST:
            y = tl.dot(h.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
        else:
            y = tl.dot(h, bt, input_precision=PRECISION)  # (BLOCK_T, BLOCK_D)
        ptrs = out_ptr + rows[:, None] * stride_o + offs_d[None, :]
        mask = mask_m[:, None] & mask_d[None, :]
        prev = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (prev.to(tl.float32) + y).to(prev.dtype), mask=mask)


def _precision(*ts: torch.Tensor) -> str:
    return "ieee" if INTERPRET or any(t.dtype == torch.float32 for t in ts) else "tf32"


def shrink(
    x: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    L: int,
    A: torch.Tensor,
    split_k: int | None = None,
    identity_rows: bool = False,
) -> torch.Tensor:
    """The module docstring's shrink: x (N, k), rows (M,), starts (n + 1,) int32 on x's
    device, L ≥ the longest segment, A (n, k, R) -> zp (S, M, R_pad) float32 partial sums.

    `split_k` slices k into S parts (default: enough programs to fill the GPU); the partials
    are summed in the expand, never before σ sees them.
    """
    M, K, n, R = rows.numel(), x.shape[1], A.shape[0], A.shape[2]
    BT, BK, BR = _pow2(L, 16, 64), 64, _pow2(R, 16, 128)
    tiles, chunks = triton.cdiv(L, BT), triton.cdiv(K, BK)
    if split_k is None:  # at most 4 chunks of k per slice when the grid would be small
        split_k = min(triton.cdiv(chunks, 4), triton.cdiv(_programs_wanted(x.device), tiles * n))
    S = max(1, min(split_k, chunks))
    per_split = triton.cdiv(chunks, S) * BK
    S = triton.cdiv(K, per_split)  # no empty slice
    zp = torch.empty(S, M, BR, device=x.device, dtype=torch.float32)
    _shrink_kernel[(tiles, n, S)](
        x,
        rows,
        starts,
        A,
        zp,
        M,
        K,
        R,
        per_split,
        x.stride(0),
        BLOCK_T=BT,
        BLOCK_K=BK,
        BLOCK_R=BR,
        IDENTITY_ROWS=identity_rows,
        PRECISION=_precision(x, A),
        UPCAST=INTERPRET,
    )
    return zp


def expand(
    zp: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    L: int,
    B: torch.Tensor,
    sigma: Sigma,
    p: dict[str, torch.Tensor],
    out: torch.Tensor,
    identity_rows: bool = False,
) -> None:
    """The module docstring's expand: zp from `shrink`, B (n, R, d), σ's tensors p stacked
    (`Adapter.stack`), out (N, d) added into in place."""
    code, keys = ACTIVATIONS[sigma.activation]
    n, R, D = B.shape
    S, M, BR = zp.shape
    BT = _pow2(L, 16, 64)
    tiles = triton.cdiv(L, BT)
    BD = 32
    for bd in (128, 64):  # the widest output block that still gives enough programs
        if tiles * n * triton.cdiv(D, bd) >= _programs_wanted(out.device):
            BD = bd
            break
    flat = [p[key].reshape(n, -1) for key in keys]  # (n, R) per channel, (n, 1) per adapter
    gain = p[sigma.gain].reshape(n, -1) if sigma.gain is not None else zp
    p0, p1 = (flat + [zp, zp])[:2]  # unused pointers: any tensor
    _expand_kernel[(tiles, n, triton.cdiv(D, BD))](
        zp,
        rows,
        starts,
        B,
        out,
        p0,
        p1,
        gain,
        M,
        D,
        R,
        S,
        out.stride(0),
        ACT=code,
        GAIN=sigma.gain is not None,
        BLOCK_T=BT,
        BLOCK_D=BD,
        BLOCK_R=BR,
        IDENTITY_ROWS=identity_rows,
        PRECISION=_precision(B),
        UPCAST=INTERPRET,
    )


def add_delta(
    x: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    L: int,
    A: torch.Tensor,
    B: torch.Tensor,
    sigma: Sigma,
    p: dict[str, torch.Tensor],
    split_k: int | None = None,
    identity_rows: bool = False,
) -> None:
    """out[rows[m]] += σ(x[rows[m]]·A[a], p[a])·B[a] for the m of each segment a: `shrink`
    then `expand`. x (N, k) and out (N, d) with unit stride along features; out in place."""
    if triton is None:
        raise RuntimeError("Triton is not installed: serve with the torch backend")
    if sigma.activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {sigma.activation!r} has no kernel; one of {sorted(ACTIVATIONS)}"
        )
    if x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("x and out need unit stride along their features")
    if rows.numel() == 0:
        return
    zp = shrink(x, rows, starts, L, A.contiguous(), split_k, identity_rows)
    expand(zp, rows, starts, L, B.contiguous(), sigma, p, out, identity_rows)
