"""The main-job demo: LoRA vs NoRA at the same rank on the embedded default, offline.

Fine-tunes both on `math` (GSM8K-style problems with worked solutions, generated offline by
reasoning-gym), evaluates them and the base model on the same held-out split (token-weighted
perplexity; greedy pass@1 accuracy), prints a table and writes `loss_curves.png` and
`demo_results.json`. Sized for a 2-core CPU: only the top layers are adapted (the backward
stops there) and the loss is computed at response positions only.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import nora
from nora.config import AdapterConfig
from nora.train import TrainConfig, train


@dataclass
class DemoConfig:
    out_dir: str = "demo-out"
    model: str = "smollm2-135m"
    data: str = "math"
    r: int = 16
    top_layers: int = 8  # adapt only the top N decoder layers
    steps: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    lora_alpha: float = 32.0  # the paper's LoRA baseline: alpha = 32 at every rank
    n_train: int = 240
    n_eval: int = 64
    n_accuracy: int = 16  # held-out problems answered by greedy generation
    max_new_tokens: int = 192
    max_len: int = 320
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["lora", "nora"])


def _adapter_config(method: str, cfg: DemoConfig, n_layers: int) -> AdapterConfig:
    layers = list(range(max(n_layers - cfg.top_layers, 0), n_layers))
    kw = {"alpha": cfg.lora_alpha} if method == "lora" else {}
    return AdapterConfig(method=method, r=cfg.r, layers_to_transform=layers, **kw)


def plot_losses(runs: dict[str, Path], path: Path, base_loss: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in recs if "loss" in r]
        ax.plot(steps, [r["loss"] for r in recs if "loss" in r], label=f"{name} (train)", alpha=0.8)
        ev = [r for r in recs if "eval_loss" in r]
        ax.plot(
            [r["step"] for r in ev], [r["eval_loss"] for r in ev], "o--", label=f"{name} (held-out)"
        )
    if base_loss is not None:
        ax.axhline(base_loss, color="gray", ls=":", label="base model (held-out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / response token)")
    ax.set_title("LoRA vs NoRA on the embedded default")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<14}{'trainable':>12}{'held-out PPL':>14}{'accuracy':>10}{'train s':>9}{'tok/s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{r['accuracy']:.1%}" if r.get("accuracy") is not None else "-"
        t = f"{r['train_time_s']:.0f}" if r.get("train_time_s") else "-"
        tps = f"{r['tok_per_s']:.0f}" if r.get("tok_per_s") else "-"
        lines.append(
            f"{r['name']:<14}{r['trainable_params']:>12,}{r['ppl']:>14.3f}{acc:>10}{t:>9}{tps:>7}"
        )
    return "\n".join(lines)


def run_demo(cfg: DemoConfig | None = None, progress: bool = True, log=print) -> dict:
    """Run the demo; returns (and writes) the results. Each call starts from scratch."""
    from nora.data import batches, build_splits, load_examples
    from nora.evaluate import accuracy, perplexity
    from nora.models import describe_model, load_base_model

    cfg = cfg or DemoConfig()
    out = Path(cfg.out_dir)
    t_start = time.perf_counter()
    model, tok = load_base_model(cfg.model)
    info = describe_model(model)
    log(f"base model: {cfg.model} ({info['params'] / 1e6:.1f}M params, {info['layers']} layers)")
    _, eval_set, stats = build_splits(tok, cfg.data, cfg.n_train, cfg.n_eval, cfg.max_len, cfg.seed)
    log(
        f"data: {cfg.data}, {cfg.n_train} train / {cfg.n_eval} held-out examples, "
        f"max_len {cfg.max_len} ({stats.truncated} truncated, {stats.dropped_too_long} dropped)"
    )
    eval_batches = batches(eval_set, tok.pad_token_id, cfg.batch_size)
    acc_examples = load_examples(cfg.data, cfg.n_eval + cfg.n_train, cfg.seed)[: cfg.n_accuracy]
    acc_examples = [e for e in acc_examples if e.answer is not None]

    def score(name: str) -> dict:
        if not acc_examples:
            return {"accuracy": None}
        return accuracy(
            model,
            tok,
            acc_examples,
            cfg.max_new_tokens,
            cfg.batch_size,
            samples_path=out / f"samples_{name}.jsonl",
            progress=progress,
        )

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = [
        {
            "name": "base",
            "trainable_params": 0,
            "ppl": perplexity(model, eval_batches, progress=progress).ppl,
            **score("base"),
        }
    ]
    log(f"base model: held-out PPL {rows[0]['ppl']:.3f}")
    runs = {}
    for method in cfg.methods:
        tcfg = TrainConfig(
            adapter=_adapter_config(method, cfg, info["layers"]),
            model=cfg.model,
            data=cfg.data,
            n_train=cfg.n_train,
            n_eval=cfg.n_eval,
            max_len=cfg.max_len,
            max_steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            eval_every=max(cfg.steps // 3, 1),
            output_dir=str(out / method),
        )
        summary = train(tcfg, model=model, tokenizer=tok, progress=progress, resume=False)
        name = f"{method} r{cfg.r}"
        rows.append(
            {
                "name": name,
                "trainable_params": summary["trainable_params"],
                "ppl": summary["eval_ppl"],
                "train_time_s": summary["train_time_s"],
                "tok_per_s": summary["tok_per_s"],
                **score(method),
            }
        )
        log(
            f"{name}: held-out PPL {summary['eval_ppl']:.3f} after {cfg.steps} steps "
            f"({summary['train_time_s']:.0f} s)"
        )
        runs[name] = out / method
        nora.unload(model)  # back to the exact base model for the next method
    plot_losses(runs, out / "loss_curves.png", base_loss=math.log(rows[0]["ppl"]))
    results = {"config": cfg.__dict__, "rows": rows, "wall_time_s": time.perf_counter() - t_start}
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    log("\n" + format_table(rows))
    log(
        f"\nloss curves: {out / 'loss_curves.png'}   results: {out / 'demo_results.json'}   "
        f"wall time: {results['wall_time_s'] / 60:.1f} min"
    )
    return results
