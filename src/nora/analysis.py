"""Spectral analysis of trained adapters: effective rank, spectra, cumulative energy, AUC-90.

NoRA paper §2.4, §5.1 and Appendices A-B; metric definitions below. Each adapted layer
is looked at in three views, each reduced to its singular values σ_1 ≥ σ_2 ≥ … ≥ 0:

    latent  H  ∈ R^{N×r}  the adapter's r-dim latent over N held-out tokens (the paper's view)
    output  Δh ∈ R^{N×d}  the adapter's contribution to the layer output (function space,
                          defined for every method, linear or not)
    weight  s·B·A ∈ R^{d×k}  the linear view of the two projections (LoRAN: its true ΔW)

and summarised by

    effective rank  ER = exp(−Σ_i p_i ln p_i),  p_i = σ_i / Σ_j σ_j   [Roy & Vetterli 2007; eq. 3]
    cumulative energy  E_k = Σ_{i≤k} σ_i² / Σ_i σ_i²                  [paper Fig. 6/9]
    AUC-90  = min{k : E_k ≥ 0.9}, the components holding 90% of the energy (also as k/r).

The latent H is what B reads, with the scalar scale s removed, in eval mode (no dropout):

    lora    A·x
    nora    σ(A·x)                 SiLU by default (the activation ablations swap it)
    nolora  v ⊙ f(A·x)
    aurora  σ(A·x) = tanh(H·tanh(A·x)) + w_s ⊙ spline(A·x)
    loran   A·x                    no latent non-linearity: Sinter acts on ΔW, not on activations

It is the method's own `Adapter.latent(x)` (σ(A·x), the same σ the adapter trains and serves
with), evaluated on the sampled tokens of the adapter's input x; the adapter's forward hook
gives x and Δh. Tokens are subsampled uniformly (bottom-k on random
keys, deterministic by seed) to at most `max_tokens` per layer, the same tokens in every
layer; padding (attention_mask == 0) is skipped. Memory: about max_tokens·(r + d) floats per
layer. SVDs run in float64 on the CPU.

    summary = analyze(model, batches)                        # JSON-able dict
    summary = analyze_adapter("out/adapter", base_model, batches)  # loads, analyzes, unloads
    agg = SpectralSummary.of(summary)                        # typed: agg.latent.auc90.mean
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nora.adapters import Adapter, AdapterWrapper
from nora.checkpoint import load_adapter
from nora.inject import InjectionError, adapter_modules, get_config, unload

VIEWS = ("latent", "output", "weight")
DEFAULT_MAX_TOKENS = 4096
DEFAULT_KEEP_SINGULAR_VALUES = 1024  # per layer and view, in the JSON summary
FORMAT_VERSION = 1


class AnalysisError(ValueError):
    """Input the analysis cannot work with (no batches, no adapters, a bad budget)."""


# ---------------------------------------------------------------- metrics (pure functions)


def singular_values(matrix: Tensor) -> Tensor:
    """σ_1 ≥ … ≥ σ_min(m,n) of a 2-D matrix (m, n), computed in float64 on the CPU."""
    m = torch.as_tensor(matrix).detach()
    if m.ndim != 2:
        raise AnalysisError(f"expected a 2-D matrix, got shape {tuple(m.shape)}")
    m = m.to("cpu", torch.float64)
    if not torch.isfinite(m).all():
        raise AnalysisError("matrix has NaN or infinite entries")
    if m.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(m)  # (min(m, n),)


def _spectrum(sv: Tensor) -> Tensor:
    s = torch.as_tensor(sv).detach().to("cpu", torch.float64)
    if s.ndim != 1:
        raise AnalysisError(f"expected a 1-D vector of singular values, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise AnalysisError("singular values must be finite and non-negative")
    return s


def effective_rank_from_singular_values(sv: Tensor) -> float:
    """ER = exp(−Σ p_i ln p_i) with p_i = σ_i / Σ_j σ_j (0·ln 0 = 0) [Roy & Vetterli 2007].

    Lies in [1, n] for a non-zero spectrum of n values: 1 for rank one, n for equal values.
    An all-zero (or empty) spectrum has no distribution; it returns 0.0.
    """
    s = _spectrum(sv)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def effective_rank(matrix: Tensor) -> float:
    """Effective rank of a 2-D matrix (paper eq. 3); the zero matrix gives 0.0.

    Scale invariant. For a vector of singular values use `effective_rank_from_singular_values`.
    """
    if torch.as_tensor(matrix).ndim == 1:
        raise AnalysisError(
            "effective_rank takes a 2-D matrix; for a vector of singular values use "
            "effective_rank_from_singular_values"
        )
    return effective_rank_from_singular_values(singular_values(matrix))


def cumulative_energy(sv: Tensor) -> Tensor:
    """E_k = Σ_{i≤k} σ_i² / Σ_i σ_i² (float64, sorted descending first); ends at exactly 1.

    An all-zero spectrum has no energy: all zeros.
    """
    s = _spectrum(sv).sort(descending=True).values
    cum = torch.cumsum(s * s, 0)  # (n,)
    if cum.numel() == 0 or cum[-1] == 0:
        return torch.zeros_like(s)
    return cum / cum[-1]


def auc90(sv: Tensor, threshold: float = 0.9) -> int:
    """AUC-90: the fewest components whose energy Σσ_i² reaches `threshold` of the total.

    min{k : E_k ≥ threshold} (paper Fig. 6/9); 0 for an all-zero spectrum.
    """
    if not 0 < threshold <= 1:
        raise AnalysisError(f"threshold must lie in (0, 1], got {threshold}")
    e = cumulative_energy(sv)
    if e.numel() == 0 or e[-1] == 0:
        return 0
    return int((e < threshold * (1 - 1e-12)).sum()) + 1  # tolerance: E_k == 0.9 up to rounding


def auc90_fraction(sv: Tensor, r: int | None = None, threshold: float = 0.9) -> float:
    """AUC-90 as a fraction of the rank budget r (default: the number of singular values)."""
    n = len(sv) if r is None else r
    if n <= 0:
        raise AnalysisError(f"r must be positive, got {n}")
    return auc90(sv, threshold) / n


# ---------------------------------------------------------------- weight view


def _adapter(module: AdapterWrapper | Adapter) -> Adapter:
    return module.adapter if isinstance(module, AdapterWrapper) else module


def _weight_is_product(a: Adapter) -> bool:
    # ΔW = s·B·A for every method but those mergeable *and* non-linear in weight space (LoRAN)
    return not a.mergeable or a.linear


def weight_update(module: AdapterWrapper | Adapter) -> Tensor:
    """The weight view (d, k), float64: s·B·A; for LoRAN the true ΔW = s·Sinter(B·A).

    For the non-linear methods this ignores the activation (and NoLoRA's v, AuroRA's H and
    spline): it is the linear view of the two projections only.
    """
    a = _adapter(module)
    with torch.no_grad():
        if not _weight_is_product(a):
            return a.delta_weight().detach().to("cpu", torch.float64)
        B = a.lora_B.weight.detach().to("cpu", torch.float64)  # (d, r)
        A = a.lora_A.weight.detach().to("cpu", torch.float64)  # (r, k)
        return a.scale * (B @ A)


def weight_singular_values(module: AdapterWrapper | Adapter) -> Tensor:
    """Singular values of `weight_update`, without forming d×k when ΔW = s·B·A.

    B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR), so σ(s·B·A) = |s|·σ(R_B R_Aᵀ), an r×r SVD:
    the at most min(d, k, r) non-zero values. LoRAN's full-rank ΔW gets a full SVD.
    """
    a = _adapter(module)
    if not _weight_is_product(a):
        return singular_values(weight_update(a))
    with torch.no_grad():
        B = a.lora_B.weight.detach().to("cpu", torch.float64)  # (d, r)
        A = a.lora_A.weight.detach().to("cpu", torch.float64)  # (r, k)
        rb = torch.linalg.qr(B, mode="r").R  # (min(d, r), r)
        ra = torch.linalg.qr(A.T, mode="r").R  # (min(k, r), r)
        return abs(a.scale) * torch.linalg.svdvals(rb @ ra.T)


# ---------------------------------------------------------------- collection with hooks


@dataclass
class Collected:
    """One adapted layer's sample of N ≤ max_tokens held-out tokens, in stream order."""

    latent: Tensor  # (N, r)  H: the r-dim latent after the method's non-linearity
    output: Tensor  # (N, d)  Δh: the adapter's output
    index: Tensor  # (N,) int64: each token's position in the stream of non-padding tokens
    n_seen: int  # non-padding tokens that went through the layer


class _Reservoir:
    """A uniform sample without replacement of ≤ k rows from a stream (bottom-k sampling):
    keep the rows with the k smallest random keys. Memory: k rows plus one batch."""

    def __init__(self, k: int):
        self.k = k
        self.keys = torch.zeros(0, dtype=torch.float64)
        self.rows: dict[str, Tensor] = {}

    def threshold(self) -> float:
        """Rows with a key at or above this cannot enter the sample any more."""
        return float(self.keys.max()) if len(self.keys) >= self.k else math.inf

    def add(self, keys: Tensor, **rows: Tensor) -> None:  # keys (n,), rows (n, ...)
        if self.rows:
            keys = torch.cat([self.keys, keys])
            rows = {n: torch.cat([self.rows[n], v]) for n, v in rows.items()}
        if len(keys) > self.k:
            keep = torch.topk(keys, self.k, largest=False).indices
            keys, rows = keys[keep], {n: v[keep] for n, v in rows.items()}
        self.keys, self.rows = keys, rows


def _active_wrappers(model: nn.Module) -> dict[str, AdapterWrapper]:
    wrappers = adapter_modules(model)
    if not wrappers:
        raise AnalysisError(
            "this model has no nora adapters (inject one or use analyze_adapter with a folder)"
        )
    off = [n for n, w in wrappers.items() if not w.active]
    if off:
        raise AnalysisError(
            f"{len(off)} adapter(s) are merged or disabled (e.g. {off[0]}): their forward does "
            "not run, so there is nothing to collect; analyze the unmerged, enabled adapter"
        )
    return wrappers


def _check_budget(max_tokens: int) -> None:
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise AnalysisError(f"max_tokens must be a positive integer, got {max_tokens!r}")


def _model_inputs(batch: Any, device: torch.device) -> dict[str, Tensor]:
    """input_ids (B, T), attention_mask (B, T) and position_ids if given; labels are dropped."""
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise AnalysisError("each batch must be an input_ids tensor or a dict with input_ids")
    ids = batch["input_ids"]
    if ids.ndim != 2:
        raise AnalysisError(f"input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise AnalysisError(f"attention_mask {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
    out = {"input_ids": ids, "attention_mask": mask}
    if batch.get("position_ids") is not None:
        out["position_ids"] = batch["position_ids"]
    return {k: v.to(device) for k, v in out.items()}


def collect(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor] | Tensor],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
) -> dict[str, Collected]:
    """Run `batches` through the model and sample each adapter's latent H and output Δh.

    batches: input_ids tensors (B, T) or dicts with input_ids and, optionally, attention_mask
    (tokens with mask 0 are skipped) and position_ids. The model runs in eval mode under
    no_grad; afterwards every module's training flag is restored and every hook removed.
    Returns {module path: Collected}, at most `max_tokens` tokens per layer, the same tokens
    in every layer, chosen uniformly at random (deterministic given `seed`).
    """
    _check_budget(max_tokens)
    wrappers = _active_wrappers(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {}  # the current batch: size B·T, pos (n,), keys (n,), offset
    reservoirs = {name: _Reservoir(max_tokens) for name in wrappers}
    seen = dict.fromkeys(wrappers, 0)

    def on_adapter(name: str):
        def hook(a: Adapter, args: tuple, out: Tensor) -> None:
            x = args[0]  # (..., k)
            pos = batch["pos"]  # (n,) flat positions of the non-padding tokens
            if x.shape[:-1].numel() != batch["size"]:
                raise AnalysisError(
                    f"{name}: the adapter saw {x.shape[:-1].numel()} tokens in a batch of "
                    f"{batch['size']}; collect needs one adapter call per token"
                )
            res = reservoirs[name]
            take = batch["keys"] < res.threshold()  # only tokens that can still enter
            at = pos[take].to(x.device)
            dtype = torch.promote_types(out.dtype, torch.float32)  # bf16 -> f32, f64 stays

            def rows(t: Tensor) -> Tensor:  # (..., w) -> (taken, w)
                return t.reshape(batch["size"], -1)[at]

            n = len(pos)
            index = (batch["offset"] + torch.arange(n))[take]
            latent = a.latent(rows(x))  # (taken, r): σ(A·x), the method's own map
            res.add(
                batch["keys"][take],
                latent=latent.to("cpu", dtype),
                output=rows(out).to("cpu", dtype),
                index=index,
            )
            seen[name] += n

        return hook

    flags = {m: m.training for m in model.modules()}
    handles = []
    kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    n_batches = offset = 0
    try:
        for name, w in wrappers.items():
            handles.append(w.adapter.register_forward_hook(on_adapter(name)))
        model.eval()
        with torch.no_grad():
            for raw in batches:
                inputs = _model_inputs(raw, device)
                mask = inputs["attention_mask"].reshape(-1).to("cpu").bool()  # (B·T,)
                pos = mask.nonzero().squeeze(1)  # (n,)
                n = len(pos)
                n_batches += 1
                if n == 0:  # all padding: nothing to sample
                    continue
                keys = torch.rand(n, generator=gen, dtype=torch.float64)  # (n,)
                batch.update(size=len(mask), pos=pos, keys=keys, offset=offset)
                model(**inputs, **kw)
                offset += n
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    if n_batches == 0:
        raise AnalysisError("batches is empty: nothing to run through the model")
    if offset == 0:
        raise AnalysisError("every token in the batches is padding (attention_mask is all 0)")
    return {name: _collected(name, res, seen[name]) for name, res in reservoirs.items()}


def _collected(name: str, res: _Reservoir, n_seen: int) -> Collected:
    """A layer's reservoir as a Collected, in stream order."""
    if n_seen == 0:
        raise AnalysisError(f"{name} was never called by the model's forward")
    order = torch.argsort(res.rows["index"])
    r = {k: v[order] for k, v in res.rows.items()}
    return Collected(r["latent"], r["output"], r["index"], n_seen)


# ---------------------------------------------------------------- summaries


def _view_summary(sv: Tensor, r: int, keep: int | None) -> dict[str, Any]:
    k = auc90(sv)
    return {
        "effective_rank": effective_rank_from_singular_values(sv),
        "auc90": k,
        "auc90_fraction": k / r,
        "energy": float((sv * sv).sum()),  # Σσ_i² over all values, for energy curves
        "n_singular_values": len(sv),
        "singular_values": sv[:keep].tolist(),  # descending, at most `keep`
    }


# The aggregate block is a typed record inside nora and a nested dict only at the JSON
# boundary (to_dict/from_dict), so consumers read `agg.latent.effective_rank.mean` and a
# misspelt key fails at the attribute, not deep inside a plot. Field order is the JSON order.


@dataclass(frozen=True)
class Stats:
    """One metric over the adapted layers. Values keep their type (AUC-90's min/max stay
    ints), so a summary read back writes the same JSON."""

    mean: float
    median: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        return cls(
            statistics.fmean(values),
            statistics.median(values),
            statistics.pstdev(values),
            min(values),
            max(values),
        )


@dataclass(frozen=True)
class ViewStats:
    """The layer statistics of one view's metrics."""

    effective_rank: Stats
    auc90: Stats
    auc90_fraction: Stats

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViewStats:
        return cls(**{f: Stats(**d[f]) for f in METRICS})

    @classmethod
    def over_layers(cls, layers: Mapping[str, Mapping[str, Any]], view: str) -> ViewStats:
        """`view`'s metrics of every layer of an `analyze` summary, aggregated."""
        return cls(**{m: Stats.of([layer[view][m] for layer in layers.values()]) for m in METRICS})


METRICS = tuple(f.name for f in fields(ViewStats))  # the per-layer metrics aggregated


@dataclass(frozen=True)
class SpectralSummary:
    """A summary's `aggregate`: {view: {metric: {mean, median, std, min, max}}} over layers."""

    latent: ViewStats
    output: ViewStats
    weight: ViewStats

    def view(self, name: str) -> ViewStats:
        if name not in VIEWS:
            raise AnalysisError(f"unknown view {name!r}; expected one of {VIEWS}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpectralSummary:
        return cls(**{v: ViewStats.from_dict(d[v]) for v in VIEWS})

    @classmethod
    def of(cls, summary: Mapping[str, Any]) -> SpectralSummary:
        """The aggregate of a whole `analyze` summary (as returned or read from JSON)."""
        return cls.from_dict(summary["aggregate"])

    @classmethod
    def over_layers(cls, layers: Mapping[str, Mapping[str, Any]]) -> SpectralSummary:
        """Aggregate the per-layer view summaries of `analyze`."""
        return cls(**{v: ViewStats.over_layers(layers, v) for v in VIEWS})


def analyze(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor] | Tensor],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
    keep_singular_values: int | None = DEFAULT_KEEP_SINGULAR_VALUES,
) -> dict[str, Any]:
    """ER, AUC-90 (count and fraction of r) and spectra of every adapted layer, three views.

    Returns a JSON-able dict: run info, `layers` {path: {"latent"|"output"|"weight": {
    effective_rank, auc90, auc90_fraction, energy, n_singular_values, singular_values}}}
    and `aggregate` {view: {metric: {mean, median, std, min, max}}} over layers. Only the
    first `keep_singular_values` values are stored (None: all); metrics use all of them.
    """
    collected = collect(model, batches, max_tokens=max_tokens, seed=seed)
    wrappers = adapter_modules(model)
    layers = {}
    for name, c in collected.items():
        a = wrappers[name].adapter
        svs = {
            "latent": singular_values(c.latent),  # (min(N, r),)
            "output": singular_values(c.output),  # (min(N, d),)
            "weight": weight_singular_values(a),  # (min(d, k, r),); LoRAN (min(d, k),)
        }
        layers[name] = {
            "method": a.name,
            "r": a.r,
            "in_features": a.in_features,
            "out_features": a.out_features,
            "tokens": len(c.index),
            **{v: _view_summary(sv, a.r, keep_singular_values) for v, sv in svs.items()},
        }
    first = wrappers[next(iter(collected))].adapter
    try:
        config = get_config(model).to_dict()
    except InjectionError:  # adapters present without nora's bookkeeping
        config = {"method": first.name, "r": first.r}
    return {
        "format_version": FORMAT_VERSION,
        "method": config["method"],
        "r": config["r"],
        "scale": first.scale,
        "weight_space": not first.shrinks,  # ΔW is delta_weight(), not s·B·A (LoRAN)
        "config": config,
        "max_tokens": max_tokens,
        "seed": seed,
        "tokens_seen": next(iter(collected.values())).n_seen,
        "tokens_used": len(next(iter(collected.values())).index),
        "n_layers": len(layers),
        "layers": layers,
        "aggregate": SpectralSummary.over_layers(layers).to_dict(),
    }


def analyze_adapter(
    adapter_dir: str | Path,
    base_model: nn.Module,
    batches: Iterable[Mapping[str, Tensor] | Tensor],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
    keep_singular_values: int | None = DEFAULT_KEEP_SINGULAR_VALUES,
) -> dict[str, Any]:
    """Load the adapter in `adapter_dir` onto `base_model` and `analyze` it.

    Returns the summary (with `adapter_dir`) and writes nothing: `nora analyze` saves it as
    analysis.json and draws it with `nora.study.plots.plot_run`. The adapter is unloaded
    afterwards, so `base_model` is returned to the caller as it came.
    """
    load_adapter(base_model, adapter_dir)
    try:
        summary = analyze(base_model, batches, max_tokens, seed, keep_singular_values)
    finally:
        unload(base_model)
    summary["adapter_dir"] = str(adapter_dir)
    return summary
