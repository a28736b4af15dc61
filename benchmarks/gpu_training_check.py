"""A prepared GPU check of nora's training stack (run on a lent CUDA machine; CI has none).

    PYTHONPATH=src python benchmarks/gpu_training_check.py --out $OUT/gpu_training.json

On the embedded default, 6 NoRA steps each, bf16 autocast with float32 adapter weights:
1. float32-stored base: trains, finite loss, the adapter moves.
2. 4-bit (NF4) base through bitsandbytes' CUDA kernels: trains; the adapter reloads over a
   fresh 4-bit base with the trained model's logits, and loads over the dense base.
3. 8-bit base: trains; reloads exactly.
4. --report-to tensorboard on CUDA: the event file holds train/loss for every step.
Prints one line per check ("ok"/"FAIL") with peak CUDA memory and s/step, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import nora
from nora.config import AdapterConfig, TrainConfig
from nora.models import load_base_model
from nora.quantize import quantize_base
from nora.train import train


def run(bits: int | None, out: Path, report_to: str = "none") -> dict:
    model, tok = load_base_model(device="cuda")
    if bits:
        quantize_base(model, bits)
    torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(
        adapter=AdapterConfig(method="nora", r=16),
        n_train=64, n_eval=16, max_steps=6, batch_size=8, lr=1e-3,
        load_in_4bit=bits == 4, load_in_8bit=bits == 8, report_to=report_to, output_dir=str(out),
    )  # fmt: skip
    t = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tok, progress=False)
    row = {
        "bits": bits or 16,
        "s_per_step": (time.perf_counter() - t) / cfg.max_steps,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20,
        "eval_ppl": result.eval_ppl,
        "finite": all(torch.isfinite(torch.tensor(r.loss)) for r in result.history),
    }
    ids = tok("The answer is 42 because", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        row["_logits"] = model.eval()(input_ids=ids).logits.float().cpu()
    row["_ids"] = ids
    return row


def reload_matches(bits: int, folder: Path, row: dict) -> bool:
    base, _ = load_base_model(device="cuda")
    quantize_base(base, bits)
    nora.load_adapter(base, folder / "adapter")
    with torch.no_grad():
        again = base.eval()(input_ids=row["_ids"]).logits.float().cpu()
    return torch.allclose(again, row["_logits"], atol=1e-3, rtol=1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu_training.json"))
    args = ap.parse_args()
    checks, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for bits in (None, 4, 8):
            folder = tmp / f"b{bits}"
            row = run(bits, folder)
            ok = row["finite"] and (bits is None or reload_matches(bits, folder, row))
            if bits == 4:  # and over the dense base
                dense, _ = load_base_model(device="cuda")
                nora.load_adapter(dense, folder / "adapter")
            checks[f"train_{row['bits']}bit"] = ok
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
            print(("ok  " if ok else "FAIL"), rows[-1], flush=True)
        run(None, tmp / "tb", report_to="tensorboard")
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ev = next((tmp / "tb" / "logs").rglob("events.out.tfevents.*"))
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        checks["tensorboard"] = len(acc.Scalars("train/loss")) == 6
        print(("ok  " if checks["tensorboard"] else "FAIL"), "tensorboard train/loss x6")
    args.out.write_text(json.dumps({"checks": checks, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
