"""Serving benchmark: mixed-adapter prefill and decode against the baselines of issue 5.

    .venv/bin/python benchmarks/serving_bench.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/serving_bench.py --quick    # a smoke run

The embedded default base (SmolLM2-135M, fp32) with random adapters, r = 16 on q_proj and
v_proj (NoRA: SiLU, s = 1; LoRA: α = 16). Every variant decodes greedily with its own KV cache;
the variants of one table take turns, one step each (A B C … B C A … C A B …, the order
rotating), so they share the machine's state, and each cell is the median over steps. Prefill
(16 × 128 tokens, only the last position's logits) alternates the same way, one forward per
variant per round. The share of CPU time other processes took during each table is recorded:
on a busy machine, rerun (or compare `--threads 1` runs, which suffer less from sharing).

Variants: the base model alone; one merged LoRA (plain model, weights W0 + s·B·A); nora
serving (`MultiAdapterModel`) with 1, 4, 16 (and 64) distinct adapters, NoRA or LoRA; PEFT's
mixed batch (`adapter_names=`) over the *same* LoRA weights, and PEFT with one active adapter;
sequential per-adapter serving (one batch-1 forward per request, summed per step);
`nora.inject`'s single-adapter wrapper (batch-1 table). Writes
benchmarks/results/serving_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import DynamicCache

import nora
from nora.inject import plan
from nora.models import load_base_model
from nora.serving import MultiAdapterLinear, MultiAdapterModel
from nora.study.context import machine_info

RESULTS = Path(__file__).parent / "results"
TARGETS = ["q_proj", "v_proj"]
# A server holds one batch, so a layer keeps one stack per kind; here several batches take
# turns through one model, so each keeps its own, as in a server's steady decode.
MultiAdapterLinear.STACKS_PER_KIND = 4


def machine() -> dict:
    return {
        **machine_info(),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "loadavg_start": os.getloadavg(),
    }


class OtherLoad:
    """CPU time used by *other* processes while a block runs, as a share of the machine.

    0.0 = the machine was ours; 0.5 = another process kept one of two cores busy. Reads the
    machine's busy jiffies (/proc/stat) and this process's own (/proc/self/stat).
    """

    @staticmethod
    def _read() -> tuple[int, int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        ours = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(vals) - vals[3] - vals[4], int(ours[11]) + int(ours[12]), sum(vals)

    def __enter__(self) -> OtherLoad:
        self.start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        (b0, o0, t0), (b1, o1, t1) = self.start, self._read()
        self.share = round(max(0, (b1 - b0) - (o1 - o0)) / max(1, t1 - t0), 3)


def random_adapter(model, method: str, seed: int) -> tuple[nora.AdapterConfig, dict]:
    """Config + tensors of a random non-zero adapter for `model` (B scaled to stay sane)."""
    kw = {"scale": 1.0} if method == "nora" else {"alpha": 16.0}
    cfg = nora.AdapterConfig(
        method=method, r=16, target_modules=TARGETS, init_weights=False, dropout=0.0, **kw
    )
    torch.manual_seed(seed)
    tensors = {}
    for name, w in plan(model, cfg):
        sd = w.adapter.state_dict()
        sd["lora_B.weight"] = sd["lora_B.weight"] * 0.05
        tensors.update({f"{name}.{k}": v.clone() for k, v in sd.items()})
    return cfg, tensors


def median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


class Decoder:
    """Greedy decoding with a KV cache through `fwd(ids, **kw)`; `step()` returns seconds."""

    def __init__(self, name: str, fwd, prompt: torch.Tensor):
        self.name, self.fwd, self.prompt = name, fwd, prompt
        self.times: list[float] = []

    @torch.inference_mode()
    def prefill(self) -> float:
        self.cache = DynamicCache()
        t0 = time.perf_counter()
        out = self.fwd(self.prompt, cache=self.cache, use_cache=True, logits_to_keep=1)
        dt = time.perf_counter() - t0
        self.last = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        return dt

    @torch.inference_mode()
    def step(self) -> None:
        t0 = time.perf_counter()
        out = self.fwd(self.last, cache=self.cache, use_cache=True)
        self.last = out.logits[:, -1].argmax(-1, keepdim=True)
        self.times.append(time.perf_counter() - t0)


class Sequential:
    """The no-multi-tenancy baseline: one batch-1 forward per request (its own adapter)."""

    def __init__(self, name: str, fwds: list, prompt: torch.Tensor):
        self.name = name
        self.parts = [Decoder(name, f, prompt[i : i + 1]) for i, f in enumerate(fwds)]
        self.times: list[float] = []

    def prefill(self) -> float:
        return sum(d.prefill() for d in self.parts)

    def step(self) -> None:
        for d in self.parts:
            d.step()
        self.times.append(sum(d.times[-1] for d in self.parts))


def rotated(xs: list, i: int) -> list:
    """xs rotated by i: each round starts with a different variant (no position bias)."""
    i %= len(xs)
    return xs[i:] + xs[:i]


def interleaved_decode(decoders: list[Decoder], steps: int, warmup: int = 2) -> dict:
    for d in decoders:
        d.prefill()
    for i in range(warmup + steps):
        for d in rotated(decoders, i):
            d.step()
        if i < warmup:
            for d in decoders:
                d.times.clear()
    return {d.name: median_ms(d.times) for d in decoders}


@torch.inference_mode()
def interleaved_prefill(decoders: list[Decoder], rounds: int) -> dict:
    for d in decoders:  # warm-up
        d.prefill()
    times: dict[str, list[float]] = {d.name: [] for d in decoders}
    for i in range(rounds):
        for d in rotated(decoders, i):
            times[d.name].append(d.prefill())
    return {k: median_ms(v) for k, v in times.items()}


def build(args):
    loaded, _ = load_base_model()
    # every variant gets its own copy: the loaded weights may sit in file-backed pages, which
    # measured ~8% slower than the copies' anonymous memory here
    base = copy.deepcopy(loaded.requires_grad_(False))
    del loaded
    n_max = 64 if args.big else 16
    mm = MultiAdapterModel(copy.deepcopy(base))
    lora_tensors = []
    for i in range(n_max):
        cfg, t = random_adapter(mm.model, "nora", seed=i)
        mm.add_weights(f"nora{i}", cfg, t)
        cfg, t = random_adapter(mm.model, "lora", seed=1000 + i)
        mm.add_weights(f"lora{i}", cfg, t)
        lora_tensors.append((cfg, t))
    # one merged LoRA (lora0) in a plain copy
    merged = copy.deepcopy(base)
    cfg0, t0 = lora_tensors[0]
    with torch.no_grad():
        for name in {k.rsplit(".", 2)[0] for k in t0}:
            A, B = t0[f"{name}.lora_A.weight"], t0[f"{name}.lora_B.weight"]
            merged.get_submodule(name).weight += cfg0.effective_scale * (B @ A)
    # PEFT with the same LoRA weights
    pcfg = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(base), pcfg, adapter_name="lora0")
    for i in range(1, n_max):
        pm.add_adapter(f"lora{i}", pcfg)
    with torch.no_grad():
        for mname, module in pm.named_modules():
            if isinstance(module, LoraLayer):
                key = mname.removeprefix("base_model.model.")
                for i, (_, t) in enumerate(lora_tensors):
                    module.lora_A[f"lora{i}"].weight.copy_(t[f"{key}.lora_A.weight"])
                    module.lora_B[f"lora{i}"].weight.copy_(t[f"{key}.lora_B.weight"])
    pm.set_adapter("lora0")
    pm.eval()
    # nora.inject's single-adapter wrapper with nora0's weights
    inj = copy.deepcopy(base)
    cfg_n0, t_n0 = random_adapter(inj, "nora", seed=0)
    nora.inject(inj, cfg_n0)
    with torch.no_grad():
        for name, w in nora.adapter_modules(inj).items():
            for k, p in w.adapter.state_dict().items():
                p.copy_(t_n0[f"{name}.{k}"])
    inj.eval()
    return base, mm, merged, pm, inj


def variants(base, mm, merged, pm, B: int, names: dict[str, list]) -> dict:
    """name -> fwd(ids, **kw) for a batch of B rows."""
    out = {
        "base": lambda ids, **kw: base(input_ids=ids, **kw),
        "merged LoRA": lambda ids, **kw: merged(input_ids=ids, **kw),
    }
    for label, row_names in names.items():
        if label.startswith("PEFT"):
            if len(set(row_names)) == 1:
                out[label] = lambda ids, **kw: pm(input_ids=ids, **kw)
            else:
                out[label] = lambda ids, _n=row_names, **kw: pm(
                    input_ids=ids, adapter_names=_n, **kw
                )
        else:
            uids = [mm.uid(n) for n in row_names]
            out[label] = lambda ids, _u=uids, **kw: mm(ids, row_uids=_u, **kw)
    return out


def rows(prefix: str, n_distinct: int, B: int) -> list[str]:
    """B rows over n_distinct adapters, in a shuffled order (a server's rows come unsorted)."""
    order = torch.randperm(B, generator=torch.Generator().manual_seed(B + n_distinct)).tolist()
    return [f"{prefix}{order[i] % n_distinct}" for i in range(B)]


def sanity(mm, pm, B: int) -> dict:
    """nora serving vs PEFT on the same mixed LoRA batch (and vs the base, for scale)."""
    ids = torch.randint(0, 1000, (B, 8), generator=torch.Generator().manual_seed(0))
    names = rows("lora", B, B)
    with torch.inference_mode():
        a = mm(ids, adapters=names).logits
        b = pm(input_ids=ids, adapter_names=names).logits
        c = mm(ids, adapters=[None] * B).logits
    return {
        "max_abs_logit_diff_nora_vs_peft": float((a - b).abs().max()),
        "max_abs_logit_diff_adapters_vs_base": float((a - c).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps, no batch-64 table")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per variant")
    ap.add_argument("--rounds", type=int, default=5, help="prefill rounds per variant")
    ap.add_argument("--prompt", type=int, default=64, help="decode tables: prompt tokens")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only", default="", help="comma list of tables: b16,prefill,b1,b64")
    ap.add_argument("--out", default=str(RESULTS / "serving_bench"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.rounds = 4, 1
    args.big = "b64" in (args.only or "b64") and not args.quick
    info = machine()
    print(json.dumps(info), flush=True)
    t_start = time.time()
    base, mm, merged, pm, inj = build(args)
    gen = torch.Generator().manual_seed(0)
    res: dict = {"machine": info, "command": " ".join(["python", *sys.argv])}
    res["sanity_lora_b16"] = sanity(mm, pm, 16)
    print("sanity", res["sanity_lora_b16"], flush=True)

    want = set(args.only.split(",")) if args.only else {"b16", "prefill", "b1", "b64"}
    if args.quick:
        want.discard("b64")
    res["other_cpu_share"] = {}

    def table(key: str, decs: list[Decoder], run) -> None:
        with OtherLoad() as load:
            res[key] = run(decs)
        res["other_cpu_share"][key] = load.share
        print(key, {k: round(v, 1) for k, v in res[key].items()}, load.share, flush=True)

    B = 16
    names = {
        "nora 1 NoRA": rows("nora", 1, B),
        "nora 4 NoRA": rows("nora", 4, B),
        "nora 16 NoRA": rows("nora", 16, B),
        "nora 1 LoRA": rows("lora", 1, B),
        "nora 16 LoRA": rows("lora", 16, B),
        "PEFT 1 LoRA": rows("lora", 1, B),
        "PEFT 16 LoRA": rows("lora", 16, B),
    }
    fwds = variants(base, mm, merged, pm, B, names)
    if "b16" in want:  # decode, batch 16
        prompt = torch.randint(0, 49152, (B, args.prompt), generator=gen)
        decs = [Decoder(k, f, prompt) for k, f in fwds.items()]
        per_row = [
            lambda ids, _u=[mm.uid(n)], **kw: mm(ids, row_uids=_u, **kw)
            for n in names["nora 16 NoRA"]
        ]
        decs.append(Sequential("sequential 16 NoRA (batch-1 each)", per_row, prompt))
        table("decode_b16_ms_per_step", decs, lambda d: interleaved_decode(d, args.steps))
    if "prefill" in want:  # 16 x 128, last position's logits only
        prompt = torch.randint(0, 49152, (B, 128), generator=gen)
        keep = ["base", "merged LoRA", "nora 1 NoRA", "nora 4 NoRA", "nora 16 NoRA"]
        keep += ["nora 16 LoRA", "PEFT 1 LoRA", "PEFT 16 LoRA"]
        decs = [Decoder(k, fwds[k], prompt) for k in keep]
        table("prefill_16x128_ms", decs, lambda d: interleaved_prefill(d, args.rounds))
    if "b1" in want:  # decode, batch 1
        fwds1 = variants(
            base, mm, merged, pm, 1, {"nora 1 NoRA": ["nora0"], "PEFT 1 LoRA": ["lora0"]}
        )
        fwds1["nora.inject NoRA"] = lambda ids, **kw: inj(input_ids=ids, **kw)
        prompt = torch.randint(0, 49152, (1, args.prompt), generator=gen)
        decs = [Decoder(k, f, prompt) for k, f in fwds1.items()]
        table("decode_b1_ms_per_step", decs, lambda d: interleaved_decode(d, args.steps * 3))
    if "b64" in want:  # decode, batch 64: 1 / 16 / 64 distinct
        B = 64
        names64 = {
            "nora 1 NoRA": rows("nora", 1, B),
            "nora 16 NoRA": rows("nora", 16, B),
            "nora 64 NoRA": rows("nora", 64, B),
            "nora 64 LoRA": rows("lora", 64, B),
            "PEFT 1 LoRA": rows("lora", 1, B),
            "PEFT 64 LoRA": rows("lora", 64, B),
        }
        fwds64 = variants(base, mm, merged, pm, B, names64)
        prompt = torch.randint(0, 49152, (B, args.prompt), generator=gen)
        decs = [Decoder(k, f, prompt) for k, f in fwds64.items()]
        steps = max(args.steps // 2, 4)
        table("decode_b64_ms_per_step", decs, lambda d: interleaved_decode(d, steps))

    res["machine"]["loadavg_end"] = os.getloadavg()
    res["wall_s"] = round(time.time() - t_start, 1)
    res["ratios"] = ratios(res)
    write(res, Path(args.out))


RATIOS = [  # (label, table, numerator, denominator)
    ("decode b16: 16 distinct NoRA / 1 NoRA (target <= 1.10)", "decode_b16", "nora 16 NoRA", "nora 1 NoRA"),
    ("decode b16: PEFT 16 LoRA / nora 16 LoRA = nora's throughput gain (target >= 1.5)", "decode_b16", "PEFT 16 LoRA", "nora 16 LoRA"),
    ("decode b16: PEFT 16 LoRA / nora 16 NoRA = throughput gain", "decode_b16", "PEFT 16 LoRA", "nora 16 NoRA"),
    ("decode b16: PEFT 16 LoRA / PEFT 1 LoRA (issue measured 1.70)", "decode_b16", "PEFT 16 LoRA", "PEFT 1 LoRA"),
    ("decode b16: nora 16 NoRA / base", "decode_b16", "nora 16 NoRA", "base"),
    ("decode b16: sequential per-adapter / nora 16 NoRA = batching gain", "decode_b16", "sequential 16 NoRA (batch-1 each)", "nora 16 NoRA"),
    ("prefill 16x128: 16 distinct NoRA / 1 NoRA (target <= 1.03)", "prefill_16x128", "nora 16 NoRA", "nora 1 NoRA"),
    ("prefill 16x128: PEFT 16 LoRA / PEFT 1 LoRA (issue measured 1.085)", "prefill_16x128", "PEFT 16 LoRA", "PEFT 1 LoRA"),
    ("prefill 16x128: nora 16 NoRA / base", "prefill_16x128", "nora 16 NoRA", "base"),
    ("decode b1: nora serving 1 NoRA / merged LoRA (target <= 1.05)", "decode_b1", "nora 1 NoRA", "merged LoRA"),
    ("decode b1: nora.inject NoRA / merged LoRA", "decode_b1", "nora.inject NoRA", "merged LoRA"),
    ("decode b1: PEFT LoRA unmerged / merged LoRA (issue measured 1.09)", "decode_b1", "PEFT 1 LoRA", "merged LoRA"),
    ("decode b64: 64 distinct NoRA / 1 NoRA", "decode_b64", "nora 64 NoRA", "nora 1 NoRA"),
    ("decode b64: PEFT 64 LoRA / nora 64 LoRA = nora's throughput gain", "decode_b64", "PEFT 64 LoRA", "nora 64 LoRA"),
]  # fmt: skip


def ratios(res: dict) -> dict:
    out = {}
    for label, tab, num, den in RATIOS:
        t = res.get(tab + ("_ms" if tab.startswith("prefill") else "_ms_per_step"))
        if t is not None:
            out[label] = round(t[num] / t[den], 3)
    return out


def write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    m = res["machine"]
    lines = [
        "# Serving benchmark (issue 5)",
        "",
        f"Command: `{res['command']}` — {res['wall_s']} s.",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"Python {m['python']}. Load average at start {m['loadavg_start']}, "
        f"at end {m['loadavg_end']}. CPU share used by other processes during each table "
        f"(0 = quiet, 0.5 = one core taken): {res['other_cpu_share']}.",
        "",
        "SmolLM2-135M fp32, random adapters r=16 on q_proj, v_proj. Medians; variants interleaved.",
        "Sanity, batch 16 over 16 LoRA adapters: max |Δlogit| nora serving vs PEFT "
        f"{res['sanity_lora_b16']['max_abs_logit_diff_nora_vs_peft']:.2e} (adapters vs base: "
        f"{res['sanity_lora_b16']['max_abs_logit_diff_adapters_vs_base']:.2e}).",
        "",
        "## Ratios",
        "",
        *[f"- {k}: **{v}**" for k, v in res["ratios"].items()],
    ]
    tables = [
        ("decode_b16_ms_per_step", "Decode, batch 16", 16),
        ("prefill_16x128_ms", "Prefill 16 × 128", 16 * 128),
        ("decode_b1_ms_per_step", "Decode, batch 1", 1),
        ("decode_b64_ms_per_step", "Decode, batch 64", 64),
    ]
    for key, title, toks in tables:
        if key not in res:
            continue
        lines += ["", f"## {title}", "", "| variant | ms | tokens/s |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.1f} | {1000 * toks / v:.1f} |" for k, v in res[key].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
