"""The stacked serving path, per σ kind with tensors: adapters of one kind at different ranks
in one batch go through `Adapter.stack` and one batched σ (issue 22).

For each kind, every request's output must equal that adapter served alone (the two-matmul
path) and the trained model (the adapter injected into a copy of the base, eval mode). σ's
tensors and B are random, so a stacked path that skips σ, or mixes up whose tensors apply to
which rows, changes the output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, randomize, tiny_llama

import nora
from nora import kernels
from nora.serving import MultiAdapterModel
from nora.serving.backend import BACKENDS, select_backend

# every backend; Triton's kernels run in its CPU interpreter here (conftest), tiny shapes
NAMES = ["reference", "torch", "triton"]
BACKEND_NAMES = [
    n
    if n != "triton"
    else pytest.param(
        n, marks=pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
    )
    for n in NAMES
]


# kind -> adapters of that kind (different ranks; sinter's a, ω differ per adapter)
CASES = {
    "nolora": [
        dict(method="nolora", r=2),
        dict(method="nolora", r=5, alpha=8.0),
        dict(method="nolora", r=3),
    ],
    "nora-learnable": [
        dict(method="nora", r=4, activation="learnable"),
        dict(method="nora", r=2, activation="learnable", scale=1.5),
        dict(method="nora", r=6, activation="learnable"),
    ],
    "nora-sinter": [
        dict(method="nora", r=3, activation="sinter", sinter_a=0.4, sinter_omega=3.0),
        dict(method="nora", r=5, activation="sinter", sinter_a=0.2, sinter_omega=7.0),
        dict(method="nora", r=2, activation="sinter", sinter_a=0.6, sinter_omega=2.0),
    ],
    "aurora": [
        dict(method="aurora", r=2),
        dict(method="aurora", r=6),
        dict(method="aurora", r=4, scale=2.0),
    ],
}
# rows of one batch: adapter index per row (None: the base); adapter 0 has two rows, so the
# kind's segments are uneven and padded, and a base row rides along
ROWS = [0, 1, None, 2, 0]
T = 6


def trained(base, cfg: dict, seed: int):
    """The adapter injected into a copy of the base, every parameter random (σ's, B's)."""
    model = copy.deepcopy(base)
    nora.inject(model, nora.AdapterConfig(init_weights=False, dropout=0.0, **cfg))
    randomize(model, seed)
    return model.eval()


@pytest.mark.parametrize("backend", BACKEND_NAMES)  # each against the injected model
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_kind_at_different_ranks_stacked_in_one_batch(case, backend):
    specs = CASES[case]
    base = tiny_llama(layers=1)
    refs = [trained(base, cfg, seed=i + 1) for i, cfg in enumerate(specs)]
    mm = MultiAdapterModel(copy.deepcopy(base))
    mm.ctx.backend = select_backend(backend)
    names = [f"{case}-{i}" for i in range(len(specs))]
    for name, cfg, ref in zip(names, specs, refs, strict=True):
        mm.add_weights(name, nora.AdapterConfig(**cfg), nora.adapter_state_dict(ref))
    kinds = {mm.adapters[n].kind for n in names}
    assert len(kinds) == 1, kinds  # one kind: they stack
    assert len({mm.adapters[n].r for n in names}) == len(names)  # at different ranks

    rows = [None if i is None else names[i] for i in ROWS]
    plan = mm.plan([mm.uid(n) for n in rows], T)
    seg = plan.groups[kinds.pop()]
    assert len(seg.uids) == len(names) and not seg.loop and not seg.all_rows  # the stacked bmm
    assert seg.valid is not None  # uneven segments: padded

    ids = torch.randint(0, VOCAB, (len(rows), T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = mm(ids, adapters=rows).logits
        for b, i in enumerate(ROWS):
            x = ids[b : b + 1]
            alone = mm(x, adapters=[rows[b]]).logits[0]
            ref = (base if i is None else refs[i])(x).logits[0]
            assert torch.allclose(alone, ref, atol=1e-5, rtol=1e-4), (rows[b], "alone")
            err = (out[b] - ref).abs().max()
            assert torch.allclose(out[b], ref, atol=1e-5, rtol=1e-4), (rows[b], err)
            assert torch.allclose(out[b], alone, atol=1e-5, rtol=1e-4), (rows[b], "vs alone")
            if i is not None:  # the adapter really changes the output
                assert not torch.allclose(ref, base(x).logits[0], atol=1e-3)


def test_backends_agree_on_a_mixed_batch_of_every_kind():
    """Linear, element-wise and dense kinds side by side (single, looped and stacked paths)."""
    specs = [
        dict(method="lora", r=2),
        dict(method="lora", r=4),
        dict(method="nora", r=3),
        dict(method="loran", r=2),
        *CASES["nolora"][:2],
    ]
    base = tiny_llama(layers=1)
    mm = MultiAdapterModel(copy.deepcopy(base))
    names = [f"a{i}" for i in range(len(specs))]
    for i, (name, cfg) in enumerate(zip(names, specs, strict=True)):
        ref = trained(base, cfg, seed=i + 1)
        mm.add_weights(name, nora.AdapterConfig(**cfg), nora.adapter_state_dict(ref))
    rows = [*names, None, names[0]]
    ids = torch.randint(0, VOCAB, (len(rows), T), generator=torch.Generator().manual_seed(1))
    outs = {}
    with torch.no_grad():
        for backend in sorted(BACKENDS):  # Triton where it imports: loran falls back to Torch
            mm.ctx.backend = select_backend(backend)
            outs[backend] = mm(ids, adapters=rows).logits
    for backend in outs:
        assert torch.allclose(outs[backend], outs["reference"], atol=1e-5, rtol=1e-4), backend
    with pytest.raises(ValueError, match="unknown serving backend 'cuda'"):
        select_backend("cuda")
