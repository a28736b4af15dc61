"""The whole `nora serve` decode step on a GPU (issue 23): nora's Engine over a
MultiAdapterModel over a random-weights model of Llama-3-8B shape, as `nora serve` builds it.

    python benchmarks/serve_gpu.py                 # CUDA, bf16, 4 layers
    python benchmarks/serve_gpu.py --tiny          # CPU smoke, float32, < 60 s

Unmeasured on a GPU until someone runs it: no numbers are claimed here.

Model: transformers' LlamaConfig with hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocab 128256 (Llama-3-8B) but only `--layers` layers, random weights, nothing downloaded.
Adapters: random NoRA (SiLU) and LoRA, r = 16 on the default targets (q_proj, v_proj), made
through nora's public API (inject + save_adapter) into a temp dir and loaded by the
AdapterStore in nora's safetensors format, as the server loads them.

Variants (one Engine each, sharing the one MultiAdapterModel, as tenants share a server):
nora64 (64 distinct NoRA adapters, one per request), lora64 (64 distinct LoRA adapters),
nora1 (one NoRA adapter for all 64 requests). Each engine admits its 64 requests (prefill),
warms up, then the variants take turns one decode step each (the order rotating), timed with
torch.cuda.synchronize() around Engine.step(). Prints the median per variant, the paired
ratios NoRA64/LoRA64 and NoRA64/NoRA1 (median over rounds of the per-round ratio) against the
target ≤ 1.10, the machine (GPU, torch), the git commit and the serving context's backend.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nora
from nora.serving import AdapterStore, Engine, MultiAdapterModel
from nora.serving.layers import MultiAdapterLinear
from nora.serving.sampling import SamplingParams

TARGET = 1.10  # issue 23: a mixed batch of distinct NoRA adapters within 10 % of LoRA / one
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)  # fmt: skip
# Three engines take turns through one model: each keeps its own stack per kind.
MultiAdapterLinear.STACKS_PER_KIND = 4


class IdTokenizer:
    """What the Engine needs of a tokenizer when prompts are token ids (no file to load)."""

    eos_token_id = None  # decoding runs to max_tokens
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def base_model(cfg: dict, layers: int, dtype, device) -> LlamaForCausalLM:
    config = LlamaConfig(**cfg, num_hidden_layers=layers, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # random init, no checkpoint
    return model.eval()


def save_adapters(root: Path, skeleton, method: str, n: int, r: int) -> None:
    """n random non-zero adapters (B scaled to keep the logits sane) saved by nora's public
    API (inject, save_adapter: safetensors) as root/{method}-{i}, as `nora serve` reads them."""
    kw = {"scale": 1.0} if method == "nora" else {"alpha": float(r)}
    acfg = nora.AdapterConfig(method=method, r=r, init_weights=False, dropout=0.0, **kw)
    for i in range(n):
        nora.inject(skeleton, acfg)  # default targets: q_proj, v_proj
        with torch.no_grad():
            for name, t in skeleton.named_parameters():
                if "lora_" in name:  # A: (r, k) ~ 1/sqrt(k); B: (d, r) small
                    std = 0.05 if "lora_B" in name else t.shape[-1] ** -0.5
                    t.copy_(torch.randn_like(t) * std)
        nora.save_adapter(skeleton, root / f"{method}-{i}")
        nora.unload(skeleton)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, float32, tiny shapes (smoke)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--n", type=int, default=64, help="adapters / concurrent requests")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args(argv)
    if a.tiny:
        a.layers, a.n, a.prompt_len, a.warmup, a.reps = 2, 4, 8, 1, 4
    cfg = TINY if a.tiny else LLAMA3_8B
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = base_model(cfg, a.layers, dtype, device)
    multi = MultiAdapterModel(model)
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    torch.manual_seed(1)
    # One CPU copy of the base carries each adapter in turn while it is saved.
    skeleton = base_model(cfg, a.layers, torch.float32 if a.tiny else torch.bfloat16, "cpu")
    for method in ("nora", "lora"):
        save_adapters(root, skeleton, method, a.n, a.r)
    del skeleton
    store = AdapterStore(multi, root, max_resident=2 * a.n + 1)
    variants = {
        "nora64": [f"nora-{i}" for i in range(a.n)],
        "lora64": [f"lora-{i}" for i in range(a.n)],
        "nora1": ["nora-0"] * a.n,
    }
    g = torch.Generator().manual_seed(2)
    engines = {}
    max_tokens = a.warmup + a.reps + 4
    for v, names in variants.items():
        eng = Engine(multi, IdTokenizer(), store, max_batch=a.n,
                     max_prefill_tokens=a.n * a.prompt_len, max_model_len=a.prompt_len + max_tokens + 8)  # fmt: skip
        for name in names:
            ids = torch.randint(1, cfg["vocab_size"], (a.prompt_len,), generator=g).tolist()
            eng.submit(ids, name, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        eng.step()  # admits all n (prefill) and decodes once
        assert eng.running == a.n, f"{v}: {eng.running} rows running, wanted {a.n}"
        engines[v] = eng
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(v: str) -> float:
        sync()
        t0 = time.perf_counter()
        engines[v].step()
        sync()
        return time.perf_counter() - t0

    order = list(variants)
    for _ in range(a.warmup):
        for v in order:
            step(v)
    times: dict[str, list[float]] = {v: [] for v in order}
    for k in range(a.reps):
        for v in order[k % 3 :] + order[: k % 3]:  # rotate: no variant always runs first
            times[v].append(step(v))
    for eng in engines.values():
        eng.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (no GPU)"
    print(f"machine: {gpu}, torch {torch.__version__}, commit {commit or '?'}")
    print(f"model: {'tiny' if a.tiny else 'Llama-3-8B'} shape {cfg}, {a.layers} layers, {dtype}, {device}; "
          f"{a.n} requests, prompt {a.prompt_len}, r={a.r}, {a.reps} reps")  # fmt: skip
    # the serving context's backend; a kind it does not support falls back to torch per kind
    print(f"backend {multi.ctx.backend.name}")
    for v in order:
        print(f"{v}: median {1000 * statistics.median(times[v]):.3f} ms/step")
    for num, den in (("nora64", "lora64"), ("nora64", "nora1")):
        ratio = statistics.median(x / y for x, y in zip(times[num], times[den], strict=True))
        ok = "ok" if ratio <= TARGET else "MISSED"
        print(f"ratio {num}/{den}: {ratio:.3f} (target <= {TARGET:.2f}) {ok}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
