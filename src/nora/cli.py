"""`nora` command line: each subcommand is a thin call into the library.

nora demo                        LoRA vs NoRA on the embedded default (the main job)
nora train --method nora --r 16  fine-tune an adapter (resumable)
nora eval --adapter runs/x/adapter --accuracy 32
nora params --method nora --r 64 --targets q_proj,v_proj
nora inspect runs/x/adapter      what an adapter folder holds
nora methods                     the registered methods and their defaults
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="nora: non-linear low-rank adaptation of language models.",
)


def _user_errors(fn):
    """User mistakes (bad values, files, configs) print one line and exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nora.models import ModelError
        from nora.train import TrainingError

        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, ModelError, TrainingError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _split(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _layers(s: str | None) -> list[int] | None:
    """'20-29' or '20,21,22' -> list of ints."""
    if not s:
        return None
    out: list[int] = []
    for part in s.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def _adapter_config(
    method, r, alpha, scale, rslora, dropout, activation, targets, layers, placement
):
    from nora import AdapterConfig

    try:
        layer_list = _layers(layers)
    except ValueError:
        raise ValueError(f"--layers must look like '20-29' or '1,3,5', got {layers!r}") from None
    return AdapterConfig(
        method=method,
        r=r,
        alpha=alpha,
        scale=scale,
        rslora=rslora,
        dropout=dropout,
        activation=activation,
        target_modules=_split(targets),
        layers_to_transform=layer_list,
        placement=placement,
    )


Method = Annotated[str, typer.Option(help="lora | nora | nolora | aurora | loran")]
Rank = Annotated[int, typer.Option("--r", help="rank")]
Alpha = Annotated[float | None, typer.Option(help="scale = alpha/r (method default if unset)")]
Scale = Annotated[float | None, typer.Option(help="fixed scale s (overrides alpha)")]
RsLora = Annotated[bool, typer.Option(help="scale = alpha/sqrt(r)")]
Dropout = Annotated[float | None, typer.Option(help="dropout p (method default if unset)")]
Activation = Annotated[
    str | None, typer.Option(help="identity|relu|silu|gelu|tanh|sinter|learnable")
]
Targets = Annotated[
    str | None, typer.Option(help="comma-separated module names, e.g. q_proj,v_proj")
]
Layers = Annotated[str | None, typer.Option(help="layer indices to adapt, e.g. 22-29")]
Placement = Annotated[str, typer.Option(help="weight | module")]


@app.command()
@_user_errors
def methods() -> None:
    """List the registered adapter methods and their defaults."""
    from nora import METHODS, AdapterConfig

    typer.echo(f"{'method':<8}{'mergeable':<11}{'scale':<12}{'dropout':<9}activation")
    for name, cls in sorted(METHODS.items()):
        c = AdapterConfig(method=name)
        scale = f"{c.scale:g}" if c.scale is not None else f"{c.alpha:g}/r"
        merge = "yes" if cls.mergeable else ("approx." if cls.approximately_mergeable else "no")
        typer.echo(f"{name:<8}{merge:<11}{scale:<12}{c.dropout:<9g}{c.activation}")


@app.command()
@_user_errors
def params(
    model: Annotated[
        str, typer.Option(help="smollm2-135m, a local folder or a hub id")
    ] = "smollm2-135m",
    method: Method = "nora",
    r: Rank = 16,
    alpha: Alpha = None,
    scale: Scale = None,
    rslora: RsLora = False,
    dropout: Dropout = None,
    activation: Activation = None,
    targets: Targets = None,
    layers: Layers = None,
    placement: Placement = "weight",
) -> None:
    """Trainable-parameter table of an adapter on a model (built on the meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import nora

    cfg = _adapter_config(
        method, r, alpha, scale, rslora, dropout, activation, targets, layers, placement
    )
    if model == "smollm2-135m":
        from nora.models import load_base_model

        base, _ = load_base_model(model)
    else:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    nora.inject(base, cfg)
    typer.echo(nora.parameter_table(base))


@app.command()
@_user_errors
def inspect(adapter_dir: Path) -> None:
    """Show an adapter folder's config and tensors."""
    from nora.checkpoint import read_config, read_weights

    cfg = read_config(adapter_dir)
    tensors = read_weights(adapter_dir)
    typer.echo(json.dumps(cfg.to_dict(), indent=2))
    n = sum(t.numel() for t in tensors.values())
    typer.echo(f"{len(tensors)} tensors, {n:,} parameters, effective scale {cfg.effective_scale:g}")


@app.command("train")
@_user_errors
def train_cmd(
    method: Method = "nora",
    r: Rank = 16,
    alpha: Alpha = None,
    scale: Scale = None,
    rslora: RsLora = False,
    dropout: Dropout = None,
    activation: Activation = None,
    targets: Targets = None,
    layers: Layers = None,
    placement: Placement = "weight",
    model: Annotated[
        str, typer.Option(help="smollm2-135m, a local folder or a hub id")
    ] = "smollm2-135m",
    data: Annotated[
        str,
        typer.Option(help="math | reasoning-mix | logistic-map | slimorca | mathinstruct | a file"),
    ] = "math",
    data_path: Annotated[
        str | None, typer.Option(help="local file for slimorca/mathinstruct")
    ] = None,
    n_train: int = 512,
    n_eval: int = 64,
    max_len: int = 256,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 100,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 5e-4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.05,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    dtype: Annotated[
        str | None, typer.Option(help="float32 | bfloat16 | float16 (auto if unset)")
    ] = None,
    eval_every: int = 0,
    save_every: int = 0,
    output_dir: Annotated[
        str, typer.Option(help="run folder; rerun the same command to resume")
    ] = "runs/nora",
    config: Annotated[
        Path | None, typer.Option(help="a train_config.json to run instead of the options")
    ] = None,
) -> None:
    """Fine-tune an adapter. Rerunning the same command resumes from the last checkpoint."""
    from nora.train import TrainConfig, train

    if config is not None:
        cfg = TrainConfig.from_dict(json.loads(config.read_text()))
    else:
        adapter = _adapter_config(
            method, r, alpha, scale, rslora, dropout, activation, targets, layers, placement
        )
        cfg = TrainConfig(
            adapter=adapter,
            model=model,
            data=data,
            data_path=data_path,
            n_train=n_train,
            n_eval=n_eval,
            max_len=max_len,
            max_steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            max_grad_norm=max_grad_norm,
            seed=seed,
            dtype=dtype,
            eval_every=eval_every,
            save_every=save_every,
            output_dir=output_dir,
        )
    summary = train(cfg)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))


@app.command("eval")
@_user_errors
def eval_cmd(
    adapter: Annotated[
        Path | None, typer.Option(help="adapter folder (omit for the base model)")
    ] = None,
    model: Annotated[
        str, typer.Option(help="smollm2-135m, a local folder or a hub id")
    ] = "smollm2-135m",
    data: str = "math",
    data_path: str | None = None,
    n_eval: int = 64,
    max_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    accuracy: Annotated[
        int, typer.Option(help="also score greedy answers on this many problems")
    ] = 0,
    max_new_tokens: int = 256,
    samples: Annotated[Path | None, typer.Option(help="JSONL file for sample outputs")] = None,
) -> None:
    """Held-out perplexity (token-weighted) and optional greedy accuracy, base or adapter."""
    import nora
    from nora.data import batches, build_splits, load_examples
    from nora.evaluate import accuracy as score
    from nora.evaluate import perplexity
    from nora.models import load_base_model

    base, tok = load_base_model(model)
    if adapter is not None:
        nora.load_adapter(base, adapter)
    kw = {"path": data_path} if data_path else {}
    _, eval_set, _ = build_splits(tok, data, 0, n_eval, max_len, seed=seed, **kw)
    result = perplexity(base, batches(eval_set, tok.pad_token_id, batch_size), progress=True)
    result = result.to_dict()
    if accuracy:
        examples = load_examples(data, n_eval, seed, **kw)[:accuracy]
        result.update(
            score(base, tok, examples, max_new_tokens, batch_size, samples, progress=True)
        )
    typer.echo(json.dumps(result, indent=2))


@app.command()
@_user_errors
def demo(
    out_dir: str = "demo-out",
    steps: Annotated[int, typer.Option(help="optimizer steps per method")] = 96,
    r: Rank = 16,
    lr: Annotated[
        float | None, typer.Option(help="one rate for both methods (default: each one's tuned)")
    ] = None,
    seed: int = 0,
    quick: Annotated[bool, typer.Option(help="a 1-minute smoke run (tiny numbers)")] = False,
) -> None:
    """LoRA vs NoRA at the same rank on the embedded default (offline): table + figures."""
    from nora.study.demo import DemoConfig, run_demo

    cfg = DemoConfig(out_dir=out_dir, steps=steps, r=r, lr=lr, seed=seed, n_train=steps * 8)
    if quick:
        cfg = DemoConfig(
            out_dir=out_dir,
            steps=3,
            r=r,
            lr=lr,
            seed=seed,
            n_train=24,
            n_eval=8,
            n_accuracy=2,
            max_new_tokens=8,
            top_layers=2,
        )
    run_demo(cfg)


@app.command()
@_user_errors
def analyze(
    adapter_dir: Path,
    model: Annotated[str, typer.Option(help="the adapter's base model")] = "smollm2-135m",
    data: str = "math",
    data_path: str | None = None,
    n_eval: int = 64,
    max_len: int = 256,
    max_tokens: Annotated[int, typer.Option(help="tokens sampled per layer")] = 4096,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: ADAPTER_DIR/analysis)")
    ] = None,
) -> None:
    """Spectra, effective rank and AUC-90 of a trained adapter: JSON summary + plots."""
    from nora.analysis import analyze_adapter
    from nora.data import batches, build_splits
    from nora.models import load_base_model

    base, tok = load_base_model(model)
    kw = {"path": data_path} if data_path else {}
    _, eval_set, _ = build_splits(tok, data, 0, n_eval, max_len, **kw)
    eval_batches = batches(eval_set, tok.pad_token_id, 8)
    out = out or adapter_dir / "analysis"
    summary = analyze_adapter(adapter_dir, base, eval_batches, out, max_tokens=max_tokens)
    agg = summary["aggregate"]
    for view in ("latent", "output", "weight"):
        er, auc = agg[view]["effective_rank"]["mean"], agg[view]["auc90"]["mean"]
        typer.echo(f"{view:<7} effective rank {er:8.2f}   AUC-90 {auc:7.1f} of r={summary['r']}")
    typer.echo(f"written: {out}")


@app.command()
@_user_errors
def sweep(
    spec: Annotated[
        str, typer.Argument(help="a preset (study, paper-mini, paper) or a YAML/JSON file")
    ],
    out: Annotated[Path, typer.Option(help="sweep folder; rerun to continue")] = Path(
        "results/sweep"
    ),
    only: Annotated[
        str | None, typer.Option(help="phases: lr,runs,ablations,probe,efficiency")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch")] = None,
) -> None:
    """Methods × ranks × seeds (× ablations); resumable: finished runs are skipped."""
    import torch

    from nora.study.runner import load_study, run_study
    from nora.study.sweep import run_sweep

    if threads:
        torch.set_num_threads(threads)
    command = "nora sweep " + " ".join(sys.argv[2:])
    study = load_study(spec)
    if study is not None:
        result = run_study(study, out, log=typer.echo, command=command)
    else:
        result = run_sweep(spec, out, log=typer.echo, only=_split(only), command=command)
    if result["failed"]:
        typer.echo(f"{result['failed']} run(s) failed: see error.json files under {out}", err=True)


@app.command()
@_user_errors
def report(sweep_dir: Path) -> None:
    """Markdown report with the paper's figures and tables, from a sweep or study folder."""
    from nora.study.report import build_report
    from nora.study.study_report import build_study_report

    study = (sweep_dir / "study.json").is_file()
    typer.echo(f"written: {(build_study_report if study else build_report)(sweep_dir)}")


@app.command()
@_user_errors
def serve(
    adapters: Annotated[Path, typer.Option(help="folder of adapter folders (PEFT layout)")] = Path(
        "adapters"
    ),
    base: Annotated[
        str, typer.Option(help="smollm2-135m, a local folder or a hub id")
    ] = "smollm2-135m",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_resident: Annotated[int, typer.Option(help="adapters kept loaded at once (LRU)")] = 16,
    max_batch: Annotated[int, typer.Option(help="requests decoded together")] = 16,
) -> None:
    """OpenAI-compatible server: many unmerged adapters over one base model, batched together."""
    from nora.serving import serve as run_server

    run_server(
        base, str(adapters), host=host, port=port, max_resident=max_resident, max_batch=max_batch
    )


@app.command("export")
@_user_errors
def export_cmd(
    adapter_dir: Path,
    out: Path,
    model: Annotated[
        str, typer.Option(help="the base: smollm2-135m, a local folder or a hub id")
    ] = "smollm2-135m",
    gguf: Annotated[
        bool, typer.Option("--gguf", help="write a llama.cpp GGUF LoRA adapter file (lora only)")
    ] = False,
) -> None:
    """Merged HF model folder (lora, loran), or --gguf: a llama.cpp LoRA adapter (lora)."""
    from nora.export import export

    typer.echo(f"written: {export(adapter_dir, out, model, gguf=gguf)}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
