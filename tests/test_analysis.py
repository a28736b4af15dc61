"""nora.analysis: effective rank, spectra, AUC-90, hook collection, analyze_adapter, plots."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, randomize, tiny_llama

import nora
from nora.analysis import (
    AnalysisError,
    _Reservoir,
    analyze,
    analyze_adapter,
    auc90,
    auc90_fraction,
    collect,
    cumulative_energy,
    effective_rank,
    effective_rank_from_singular_values,
    singular_values,
    weight_singular_values,
    weight_update,
)

METHODS = ("lora", "nora", "nolora", "aurora", "loran")


def _rotated(sv: list[float], seed: int = 0) -> torch.Tensor:
    """U·diag(sv)·Vᵀ with random orthogonal U (6×6), V (5×5): a matrix with spectrum sv."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64)).Q
    S = torch.zeros(6, 5, dtype=torch.float64)
    S[range(len(sv)), range(len(sv))] = torch.tensor(sv, dtype=torch.float64)
    return U @ S @ V.T


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("n", [1, 4, 17])
def test_effective_rank_of_identity_is_n(n):
    assert effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-12)


def test_effective_rank_of_rank_one_is_one():
    u, v = torch.randn(7, 1), torch.randn(1, 5)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_hand_computed():
    # σ = [3, 1]: p = [3/4, 1/4], H = −(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623351, ER = e^H = 1.7547654
    assert effective_rank_from_singular_values(torch.tensor([3.0, 1.0])) == pytest.approx(
        1.7547654, abs=1e-6
    )
    assert effective_rank(_rotated([3.0, 1.0])) == pytest.approx(1.7547654, abs=1e-6)


def test_effective_rank_scale_invariant_and_zero_matrix():
    m = torch.randn(9, 4, dtype=torch.float64)
    assert effective_rank(1e-3 * m) == pytest.approx(effective_rank(m), rel=1e-9)
    assert effective_rank(1e4 * m) == pytest.approx(effective_rank(m), rel=1e-9)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    assert effective_rank_from_singular_values(torch.tensor([2.0, 0.0, 0.0])) == 1.0


def test_metric_input_errors():
    with pytest.raises(AnalysisError, match="effective_rank_from_singular_values"):
        effective_rank(torch.tensor([3.0, 1.0]))
    with pytest.raises(AnalysisError, match="non-negative"):
        effective_rank_from_singular_values(torch.tensor([1.0, -1.0]))
    with pytest.raises(AnalysisError, match="NaN"):
        singular_values(torch.tensor([[float("nan"), 1.0]]))


def test_singular_values_are_float64_descending():
    sv = singular_values(_rotated([5.0, 2.0, 0.5]).float())
    assert sv.dtype == torch.float64 and sv.shape == (5,)
    assert torch.allclose(sv[:3], torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64), atol=1e-5)


def test_cumulative_energy_and_auc90_on_a_hand_built_spectrum():
    energies = torch.tensor([50.0, 30.0, 15.0, 5.0], dtype=torch.float64)  # 0.5 .3 .15 .05
    sv = energies.sqrt()
    e = cumulative_energy(sv)
    assert torch.allclose(e, torch.tensor([0.5, 0.8, 0.95, 1.0], dtype=torch.float64))
    assert e[-1] == 1.0
    assert auc90(sv) == 3
    assert auc90(sv, threshold=0.8) == 2  # exactly on the boundary counts as reached
    assert auc90(sv.flip(0)) == 3  # order does not matter
    assert auc90_fraction(sv, r=8) == 3 / 8
    assert auc90_fraction(sv) == 3 / 4
    assert auc90(torch.ones(10)) == 9  # flat: 9 of 10 equal components hold 90%
    assert auc90(torch.zeros(4)) == 0


@pytest.mark.parametrize("seed", range(3))
def test_cumulative_energy_ends_at_one(seed):
    sv = singular_values(torch.randn(20, 8, generator=torch.Generator().manual_seed(seed)))
    e = cumulative_energy(sv)
    assert e[-1] == 1.0 and bool((e[1:] >= e[:-1]).all())


# ---------------------------------------------------------------- weight view


def _model(method: str, r: int = 4, targets=("q_proj", "v_proj"), **kw):
    m = tiny_llama()
    nora.inject(m, nora.AdapterConfig(method=method, r=r, target_modules=list(targets), **kw))
    randomize(m)
    return m


@pytest.mark.parametrize("method", METHODS)
def test_weight_update_and_its_singular_values(method):
    m = _model(method)
    w = nora.adapter_modules(m)["model.layers.0.self_attn.v_proj"]
    a = w.adapter
    dw = weight_update(w)
    if method == "loran":  # ΔW is the linear map the layer adds: read it off the outputs
        eye = torch.eye(32)  # (k, k): one basis vector per row
        with torch.no_grad():
            out = w(eye)  # (k, d) = eye·(W0 + ΔW)ᵀ
            with nora.disable_adapters(m):
                base = w(eye)
        expected = (out - base).T.double()  # (d, k)
    else:
        expected = a.scale * a.lora_B.weight.double() @ a.lora_A.weight.double()
    assert dw.dtype == torch.float64 and dw.shape == (16, 32)
    assert torch.allclose(dw, expected, atol=1e-5 if method == "loran" else 1e-6)
    sv = weight_singular_values(w)
    full = singular_values(dw)
    assert torch.allclose(sv, full[: len(sv)], rtol=1e-9, atol=1e-12)  # QR shortcut is exact
    assert len(sv) == (16 if method == "loran" else 4)


# ---------------------------------------------------------------- collection


def _batches(seed: int = 1, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (3, 8), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, 5:] = 0
            mask[2, 3:] = 0
            ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


def _latent(a, x: torch.Tensor) -> torch.Tensor:
    """The expected latent, written out per method (eval mode: no dropout)."""
    z = F.linear(x, a.lora_A.weight)
    if a.name in ("lora", "loran"):
        return z
    if a.name == "nora":
        return F.silu(z)
    if a.name == "nolora":
        return a.lora_v * z * torch.sigmoid(a.act.beta * z)
    return a.phi(z)  # aurora


def _manual(model, batches):
    """Per layer: (latent, Δh) over the non-padding tokens, from a plain base-layer hook."""
    wrappers = nora.adapter_modules(model)
    xs = {n: [] for n in wrappers}
    hooks = [
        w.base_layer.register_forward_hook(lambda m, a, o, n=n: xs[n].append(a[0]))
        for n, w in wrappers.items()
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    out = {}
    for n, w in wrappers.items():
        a = w.adapter
        with torch.no_grad():
            x = torch.cat(
                [
                    t.reshape(-1, t.shape[-1])[b["attention_mask"].reshape(-1).bool()]
                    for t, b in zip(xs[n], batches, strict=True)
                ]
            )  # (n_tokens, k)
            h = _latent(a, x)
            dh = F.linear(x, a.delta_weight()) if a.name == "loran" else a.lora_B(h * a.scale)
        out[n] = (h, dh)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_collect_matches_a_manual_computation(method):
    m = _model(method)
    batches = _batches()
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    got = collect(m, batches, max_tokens=1000)
    manual = _manual(m, batches)
    assert set(got) == set(manual) and len(got) == 4
    for name, c in got.items():
        h, dh = manual[name]
        assert c.n_seen == n_tokens == len(c.index)  # padding skipped, nothing dropped
        assert torch.equal(c.index, torch.arange(n_tokens))
        assert c.latent.shape == (n_tokens, 4) and c.output.shape == dh.shape
        assert torch.allclose(c.latent, h, atol=1e-5), name
        assert torch.allclose(c.output, dh, atol=1e-5), name


def test_output_is_the_wrapper_delta():
    """Δh = wrapper output − base output: the adapter's whole contribution to the layer."""
    m = _model("nora")
    w = nora.adapter_modules(m)["model.layers.1.self_attn.q_proj"]
    ids = torch.randint(0, VOCAB, (1, 6))
    seen = {}
    hook = w.register_forward_hook(lambda mod, a, o: seen.update(x=a[0], y=o))
    c = collect(m, [ids], max_tokens=100)["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        m(ids)
    hook.remove()
    delta = (seen["y"] - w.base_layer(seen["x"])).reshape(6, -1)
    assert torch.allclose(c.output, delta, atol=1e-5)


def _hook_count(model) -> int:
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())


@pytest.mark.parametrize("training", [False, True])
def test_collect_leaves_the_model_unchanged(training):
    m = _model("nora")  # dropout 0.1: train mode would make the latent random
    m.train(training)
    m.model.layers[0].mlp.eval()  # a mixed state must come back exactly
    flags = {n: mod.training for n, mod in m.named_modules()}
    hooks = _hook_count(m)
    ids = torch.randint(0, VOCAB, (2, 7))
    m.eval()
    with torch.no_grad():
        before = m(ids).logits
    for n, mod in m.named_modules():
        mod.training = flags[n]
    got = collect(m, [ids], max_tokens=100)
    assert {n: mod.training for n, mod in m.named_modules()} == flags
    assert _hook_count(m) == hooks
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before)
    # collected in eval mode even when the model was training: matches the manual latent
    manual = _manual(m, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    for name, c in got.items():
        assert torch.allclose(c.latent, manual[name][0], atol=1e-5)


def test_hooks_are_removed_when_the_forward_fails():
    m = _model("lora")
    hooks = _hook_count(m)
    with pytest.raises(AnalysisError, match="input_ids"):
        collect(m, [{"ids": torch.zeros(1, 3, dtype=torch.long)}])
    assert _hook_count(m) == hooks


def test_subsampling_bound_padding_and_determinism():
    m = _model("lora")
    batches = _batches()
    full = collect(m, batches, max_tokens=1000)
    a = collect(m, batches, max_tokens=7, seed=3)
    b = collect(m, batches, max_tokens=7, seed=3)
    c = collect(m, batches, max_tokens=7, seed=4)
    name = "model.layers.0.self_attn.q_proj"
    idx = a[name].index
    assert len(idx) == 7 and a[name].n_seen == full[name].n_seen == 32
    assert bool((idx[1:] > idx[:-1]).all())  # stream order
    assert torch.equal(idx, b[name].index) and not torch.equal(idx, c[name].index)
    for layer, col in a.items():
        assert torch.equal(col.index, idx)  # the same tokens in every layer
        assert torch.equal(col.latent, full[layer].latent[idx])  # latent and Δh rows match
        assert torch.equal(col.output, full[layer].output[idx])


def test_reservoir_is_uniform():
    counts = torch.zeros(20)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        res = _Reservoir(5)
        for start in range(0, 20, 3):  # uneven chunks
            idx = torch.arange(start, min(start + 3, 20))
            res.add(torch.rand(len(idx), generator=g, dtype=torch.float64), index=idx)
        counts[res.rows["index"]] += 1
    assert torch.allclose(counts / 2000, torch.full((20,), 0.25), atol=0.04)


def test_collect_errors():
    m = _model("nora")
    ids = torch.randint(0, VOCAB, (1, 4))
    with pytest.raises(AnalysisError, match="empty"):
        collect(m, [])
    with pytest.raises(AnalysisError, match="padding"):
        collect(m, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])
    for bad in (0, -5, 2.5):
        with pytest.raises(AnalysisError, match="max_tokens"):
            collect(m, [ids], max_tokens=bad)
    with pytest.raises(AnalysisError, match="no nora adapters"):
        collect(tiny_llama(), [ids])
    lora = _model("lora")
    nora.merge(lora)
    with pytest.raises(AnalysisError, match="merged or disabled"):
        collect(lora, [ids])


# ---------------------------------------------------------------- analyze, analyze_adapter, plots


@pytest.mark.parametrize("method", METHODS)
def test_analyze_summary(method):
    m = _model(method, r=4)
    s = analyze(m, _batches(), max_tokens=30)
    json.dumps(s, allow_nan=False)
    assert s["method"] == method and s["r"] == 4 and s["n_layers"] == 4
    assert s["tokens_seen"] == 32 and s["tokens_used"] == 30
    for layer in s["layers"].values():
        for view in ("latent", "output", "weight"):
            v = layer[view]
            assert 1.0 <= v["effective_rank"] <= v["n_singular_values"] + 1e-9
            assert 1 <= v["auc90"] <= v["n_singular_values"]
            assert v["auc90_fraction"] == v["auc90"] / 4
            sv = v["singular_values"]
            assert sv == sorted(sv, reverse=True)
        assert len(layer["latent"]["singular_values"]) == 4
        if method != "loran":  # Δh = s·B·H and s·B·A have rank ≤ r: the tail is round-off
            assert layer["output"]["effective_rank"] <= 4 + 0.05
    agg = s["aggregate"]["latent"]["effective_rank"]
    ers = [layer["latent"]["effective_rank"] for layer in s["layers"].values()]
    assert agg["mean"] == pytest.approx(sum(ers) / 4)
    assert set(agg) == {"mean", "median", "std", "min", "max"}


def test_analyze_adapter_loads_analyzes_unloads_and_writes_nothing(tmp_path):
    m = _model("nora", r=4)
    nora.save_adapter(m, tmp_path / "adapter")
    before = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    base = tiny_llama()
    s = analyze_adapter(tmp_path / "adapter", base, _batches(), max_tokens=32)
    assert not nora.adapter_modules(base)  # unloaded: the base model comes back as it was
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == before  # no file written
    assert {"method", "r", "config", "layers", "aggregate", "adapter_dir"} <= set(s)
    assert set(s["aggregate"]) == {"latent", "output", "weight"}
    # the same numbers as analysing the in-memory model directly
    direct = analyze(m, _batches(), max_tokens=32)
    assert s["aggregate"]["latent"]["effective_rank"]["mean"] == pytest.approx(
        direct["aggregate"]["latent"]["effective_rank"]["mean"], rel=1e-6
    )


def test_plot_run_draws_every_plot(tmp_path):
    from nora.study.plots import plot_run

    s = analyze(_model("nora", r=4), _batches(), max_tokens=32)
    for p in plot_run(s, tmp_path).values():
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"


def test_sweep_plots(tmp_path):
    from nora.study import plots

    runs = {}
    for method in ("lora", "nora"):
        for r in (2, 4):
            for seed in (0, 1):
                m = _model(method, r=r)
                randomize(m, seed)
                runs[f"{method} r={r} seed={seed}"] = analyze(m, _batches(), max_tokens=30)
    paths = [
        plots.plot_spectra_comparison(runs, tmp_path / "spectra.png", rank=4),
        plots.plot_effective_rank_vs_rank(runs, tmp_path / "er.png"),
        plots.plot_cumulative_energy(list(runs.values()), tmp_path / "energy.png", view="output"),
    ]
    for p in paths:
        assert p.stat().st_size > 5000
    with pytest.raises(ValueError, match="r=64"):
        plots.plot_spectra_comparison(runs, tmp_path / "x.png", rank=64)
    with pytest.raises(ValueError, match="no runs"):
        plots.plot_effective_rank_vs_rank({}, tmp_path / "x.png")


def test_metrics_vs_rank_figure(tmp_path):
    """Fig. 2/3: mean ± std over seeds per rank; the base model a dashed line, or named in the
    title when a line would squash the adapters (PPL 28 against 3)."""
    from nora.study.plots import metrics_figure, plot_metrics_vs_rank

    ppl = {"LoRA": {4: [3.0, 3.2], 16: [2.9, 2.9, 2.9]}, "NoRA": {4: [], 16: [2.8]}}
    acc = {"LoRA": {16: [20.0, 24.0]}}
    fig = metrics_figure([("PPL", ppl, 28.0), ("pass@1", acc, 0.0)], "t")
    ax_ppl, ax_acc = fig.axes
    lora = ax_ppl.containers[0]  # ErrorbarContainer: (data line, caps, bars)
    assert list(lora.lines[0].get_xdata()) == [4, 16]
    assert list(lora.lines[0].get_ydata()) == pytest.approx([3.1, 2.9])
    seg = lora.lines[2][0].get_segments()[0]  # the r=4 bar spans mean ± population std
    assert seg[:, 1] == pytest.approx([3.0, 3.2])
    assert list(ax_ppl.containers[1].lines[0].get_xdata()) == [16]  # NoRA r=4: no seed yet
    assert "base model: 28 (off the scale)" in ax_ppl.get_title()
    assert [ln.get_ydata()[0] for ln in ax_acc.get_lines() if ln.get_linestyle() == "--"] == [0.0]
    assert plot_metrics_vs_rank([("PPL", ppl, None)], tmp_path / "m.png").stat().st_size > 5000


def test_module_level_placement():
    """ParallelAdapter (paper ablation row (a)): the adapter reads the block's hidden states."""
    m = _model("nora", targets=("self_attn", "mlp"), placement="module")
    got = collect(m, _batches(), max_tokens=10)
    assert len(got) == 4
    for c in got.values():
        assert c.latent.shape == (10, 4) and c.output.shape == (10, 32)
    s = analyze(m, _batches(), max_tokens=10)
    assert s["config"]["placement"] == "module" and s["n_layers"] == 4


def test_learning_curves_wrap_and_log_scale(tmp_path):
    """More than 4 (variant, rank) panels wrap onto rows (a diverged rate among them)."""
    import struct
    from types import SimpleNamespace

    from nora.study.plots import plot_learning_curves

    def run(variant, r, lr, loss):
        return SimpleNamespace(variant=variant, r=r, lr=lr, curve=lambda: ([24, 48], loss))

    runs = [run("lora", r, 1e-2, [1.5, 1.2]) for r in (2, 4, 8, 16)] + [
        run("nora", 4, 1e-2, [1.5, 1.2]),
        run("nora", 4, 1e-1, [20.0, 9.0]),
    ]
    png = plot_learning_curves(runs, tmp_path / "c.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR size
    assert width < 3 * height  # 5 panels: 4 + 1 on two rows, not 5 side by side
