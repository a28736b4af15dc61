"""Memory per process, FSDP2 against data parallelism: the same 2-process `nora train` run on
the embedded default (SmolLM2-135M), once under `accelerate launch --multi_gpu` (DDP: every
process holds the whole model) and once under `--use_fsdp --fsdp_version 2` (each holds a
half of every weight and of the AdamW state).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/fsdp_memory.py
        # writes benchmarks/results/fsdp_memory.{json,md}
    ... benchmarks/fsdp_memory.py --steps 2 --max-len 128    # a smoke run
    ... benchmarks/fsdp_memory.py --mmap-threshold 65536     # -> fsdp_memory_mmap65536.*

Each process reports: the bytes of the model's parameters it holds (its shards under FSDP;
of which the trainable adapters), of its AdamW state, its resident set once the model
is set up (after the first step, freed memory handed back to the OS), its peak resident set
over the whole run (VmHWM: loading included, which FSDP does not shard: every process loads
the whole base, then shards it), and its peak over the training steps after the first (VmHWM
reset once the first step is done). The two runs go one after the other (each uses both
cores). A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"ddp": ["--multi_gpu"], "fsdp": ["--use_fsdp", "--fsdp_version", "2"]}
MIB = 2**20


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _local_bytes(tensors) -> int:
    """Bytes this process holds: a DTensor's local shard, a plain tensor whole."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def worker(args) -> None:
    """One process of the launched run: train, measure, write rank<i>.json into --out."""
    import torch

    from nora.config import AdapterConfig, TrainConfig
    from nora.train import train

    optimizers = []  # the AdamW `train` builds, to measure its state

    class Recorded(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            optimizers.append(self)

    torch.optim.AdamW = Recorded
    rec: dict = {}

    def on_step(step: int, model) -> None:
        if step != 1:
            return
        params = list(model.parameters())
        rec["param_mib"] = _local_bytes(params) / MIB
        rec["trainable_mib"] = _local_bytes(p for p in params if p.requires_grad) / MIB
        state = optimizers[0].state.values()
        rec["adamw_mib"] = _local_bytes(v for st in state for v in st.values()) / MIB
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the unsharded base's pages back to the OS
        rec["rss_after_step1_mib"] = _kib("VmRSS") / 1024
        rec["peak_load_and_step1_mib"] = _kib("VmHWM") / 1024
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on

    cfg = TrainConfig(
        adapter=AdapterConfig(method="nora", r=16),
        data="math",
        n_train=16,
        n_eval=4,
        max_len=args.max_len,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        output_dir=str(args.out / "run"),
    )
    result = train(cfg, progress=False, on_step=on_step)
    rec["peak_steps_mib"] = _kib("VmHWM") / 1024
    rec["step_s"] = (result.history[-1].elapsed_s - result.history[0].elapsed_s) / max(
        len(result.history) - 1, 1
    )
    rec["final_train_loss"] = result.final_train_loss
    rank = int(os.environ.get("RANK", "0"))
    (args.out / f"rank{rank}.json").write_text(json.dumps(rec))


def launch(mode: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *MODES[mode],
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", __file__, "--worker", "--out", tmp,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-len", str(args.max_len)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        if args.mmap_threshold:  # glibc: larger blocks are mmapped, unmapped when freed
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{mode} run failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        return [
            {"mode": mode, "rank": r, **json.loads((Path(tmp) / f"rank{r}.json").read_text())}
            for r in range(2)
        ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2, help="per process")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="per process")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the launched processes, so freed "
        "large buffers leave the resident set at once (RSS then tracks live memory)",
    )
    ap.add_argument("--worker", action="store_true", help="(internal) one launched process")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [row for mode in MODES for row in launch(mode, args)]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.machine(),
    )  # fmt: skip
    import torch

    meta = {"command": "benchmarks/fsdp_memory.py " + " ".join(sys.argv[1:]), "cpu": cpu,
            "cores": os.cpu_count(), "threads_per_process": args.threads,
            "torch": torch.__version__, "malloc_mmap_threshold": args.mmap_threshold}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "fsdp_memory" + (f"_mmap{args.mmap_threshold}" if args.mmap_threshold else "")
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| run | rank | parameters held (MiB) | of which adapters | AdamW state (MiB) "
        "| RSS after step 1 (MiB) | peak RSS, load + step 1 (MiB) | peak RSS, later steps (MiB) "
        "| s / step | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['rank']} | {r['param_mib']:.1f} | {r['trainable_mib']:.2f} | "
            f"{r['adamw_mib']:.2f} | {r['rss_after_step1_mib']:.0f} | "
            f"{r['peak_load_and_step1_mib']:.0f} | {r['peak_steps_mib']:.0f} | "
            f"{r['step_s']:.1f} | {r['final_train_loss']:.4f} |"
        )
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
