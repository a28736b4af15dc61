"""nora's vLLM plugin on a GPU: correctness against nora's HF path, under CUDA graphs, speed.

    bash benchmarks/vllm_gpu.sh          # the wrapper: checks the environment first

Needs a Python with a CUDA build of vLLM (0.32 API) and this checkout's nora importable, and
nothing else: the base is a random Llama built here (head_dim 64), no downloads. Three parts,
each printing one line per check:

1. correctness (eager): NoRA (s = 2.5), NoLoRA, AuroRA and LoRA on every target, greedy in
   float32, one mixed batch in vLLM vs `nora.load_adapter` + `generate` on the same GPU;
   expected: `equal True` for every adapter.
2. CUDA graphs (vLLM's default on GPU): graphs are captured at start-up; σ's per-slot state
   was allocated with vLLM's LoRA weights, so NoRA and NoLoRA loaded afterwards run inside the
   graphs; expected: `equal True` against the same HF reference (float32, greedy).
3. throughput (eager), batch 64 decode: base, 64 distinct LoRA, 64 distinct NoRA; expected:
   NoRA within a few percent of LoRA (σ is elementwise on (tokens, r)).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def save_random(path: Path, seed: int, **cfg) -> str:
    import nora

    model = base_model()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    nora.inject(model, nora.AdapterConfig(init_weights=False, target_modules=targets, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in nora.adapter_modules(model).values():
            for p in w.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return str(nora.save_adapter(model, path))


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    import nora

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    tmp = Path(tempfile.mkdtemp())
    base_model().save_pretrained(tmp / "base")
    specs = {
        "lora": dict(method="lora", r=8, alpha=32.0),
        "nora": dict(method="nora", r=4, scale=2.5),
        "nolora": dict(method="nolora", r=6),
        "aurora": dict(method="aurora", r=4),
    }
    folders = {n: save_random(tmp / n, i, **c) for i, (n, c) in enumerate(specs.items())}
    prompt = [5, 17, 33, 2, 99, 120, 7, 300]
    refs = {}
    for n in [None, *specs]:
        m = base_model().cuda()
        if n:
            nora.load_adapter(m, folders[n])
        ids = torch.tensor([prompt], device="cuda")
        out = m.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        refs[n] = out[0, len(prompt) :].tolist()
    common = dict(
        model=str(tmp / "base"),
        enable_lora=True,
        max_lora_rank=16,
        max_model_len=512,
        skip_tokenizer_init=True,
        seed=0,
        gpu_memory_utilization=0.5,
    )
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, detokenize=False)
    ids = {n: i + 1 for i, n in enumerate(specs)}

    def req(n):
        return LoRARequest(n, ids[n], folders[n]) if n else None

    # 1. correctness, eager, float32
    llm = LLM(dtype="float32", enforce_eager=True, max_loras=4, **common)
    names = [None, *specs]
    outs = llm.generate(
        [{"prompt_token_ids": prompt}] * len(names),
        [sp] * len(names),
        lora_request=[req(n) for n in names],
        use_tqdm=False,
    )
    ok = True
    for n, o in zip(names, outs, strict=True):
        eq = list(o.outputs[0].token_ids) == refs[n]
        ok &= eq
        print(f"correctness {n or 'base'}: equal {eq}")
    del llm
    # 3. throughput, eager, bf16, 64 distinct adapters per batch
    rows = {}
    B = 64
    many = {
        f"{m}{i}": save_random(tmp / f"{m}{i}", 100 + i, method=m, r=16)
        for m in ("lora", "nora")
        for i in range(B)
    }
    mids = {n: i + 1 for i, n in enumerate(many)}
    llm = LLM(dtype="bfloat16", enforce_eager=True, max_loras=B, **common)
    sp64 = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, detokenize=False)
    for rnd in range(3):
        for v in ["base", "lora", "nora"] if rnd % 2 == 0 else ["nora", "lora", "base"]:
            lr = (
                [None] * B
                if v == "base"
                else [LoRARequest(f"{v}{i}", mids[f"{v}{i}"], many[f"{v}{i}"]) for i in range(B)]
            )
            p = [{"prompt_token_ids": prompt}] * B
            llm.generate(p, [sp64] * B, lora_request=lr, use_tqdm=False)  # warm: adapters loaded
            t0 = time.perf_counter()
            llm.generate(p, [sp64] * B, lora_request=lr, use_tqdm=False)
            rows.setdefault(v, []).append(B * 128 / (time.perf_counter() - t0))
    del llm
    for v, xs in rows.items():
        print(f"throughput decode {v}: {sorted(xs)[1]:.0f} tok/s (median of 3)")
    print(
        f"throughput 64 NoRA cost vs 64 LoRA: {sorted(rows['lora'])[1] / sorted(rows['nora'])[1]:.3f}x"
    )
    # 2. CUDA graphs: σ's slot state exists from start-up (nora.vllm.layers.SlotSigma), so a
    # non-linear adapter loaded after capture runs inside the captured graphs
    llm = LLM(dtype="float32", max_loras=4, **common)
    for n in ("nora", "nolora"):
        o = llm.generate(
            [{"prompt_token_ids": prompt}], [sp], lora_request=[req(n)], use_tqdm=False
        )
        eq = list(o[0].outputs[0].token_ids) == refs[n]
        ok &= eq
        print(f"cuda graphs {n} loaded after capture: equal {eq}")
    del llm
    print(json.dumps({"correct": ok, "throughput": rows}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
