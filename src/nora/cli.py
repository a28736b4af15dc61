"""`nora` command line: each subcommand is a thin call into the library.

nora demo                        LoRA vs NoRA on the embedded default (the main job)
nora train --method nora --r 16  fine-tune an adapter (resumable; --config file.yaml)
nora eval --adapter runs/x/adapter --accuracy 32
nora analyze runs/x/adapter      spectra and effective rank of a trained adapter
nora sweep paper-mini            methods x ranks x seeds (resumable)
nora report results/sweep        markdown report with figures from a sweep folder
nora report STUDY --pilots P1 P2  a study's report with study v2's pilot table
nora serve --adapters adapters/  OpenAI-compatible server, many adapters over one base
nora params --method nora --r 64 --target-modules q_proj,v_proj
nora inspect runs/x/adapter      what an adapter folder holds
nora export runs/x/adapter out/  merged HF model (lora, loran) or --gguf (lora, llama.cpp)
nora methods                     the registered methods and their defaults

The options of `train`, `params` and `serve` are generated from the fields of `AdapterConfig`,
`TrainConfig` (nora.config) and `ServeConfig` (nora.serving.config): one option per field, named after it (`max_steps` is
`--max-steps`), with the field's help text and default.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect as pyinspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any

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


Rank = Annotated[int, typer.Option("--r", help="rank")]


# --- options derived from the config dataclasses ---------------------------------------------


def _field_options(cls: type, panel: str, defaults: dict[str, Any]) -> list[pyinspect.Parameter]:
    """One keyword option per field of `cls`: `--field-name` (plus the field's `aliases`),
    its help text and default from the dataclass. Every option defaults to None ("not given"),
    so a value from --config is only overridden by options actually typed."""
    from nora.config import field_types

    types_ = field_types(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            continue  # nested configs (TrainConfig.adapter) get their own group
        dashed = f.name.replace("_", "-")
        default = defaults.get(f.name)
        help_ = f.metadata.get("help", "") + (
            f"  (default: {default})" if default not in (None, False) else ""
        )
        aliases = [f"--{a}" for a in f.metadata.get("aliases", ())]
        if tp is bool:
            decls, ann = [f"--{dashed}/--no-{dashed}"], bool | None
        else:
            decls, ann = [f"--{dashed}", *aliases], str | None
        option = typer.Option(
            *decls,
            help=help_,
            show_default=False,
            rich_help_panel=panel,
            metavar=_metavar(tp),
        )
        out.append(
            pyinspect.Parameter(
                f.name,
                pyinspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[ann, option],
            )
        )
    return out


def _metavar(tp: Any) -> str | None:
    """INT, FLOAT, TEXT, A,B (a comma list), LO,HI (a pair); None for flags."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is bool:
        return None
    if typing.get_origin(tp) is tuple:
        return "LO,HI"
    if typing.get_origin(tp) is list and args == [str]:
        return "A,B"
    if typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in args):
        return "A,B|REGEX" if str in args else "A,B|A-B"
    base = args[0] if args else tp
    return {int: "INT", float: "FLOAT"}.get(base, "TEXT")


def _with_config_options(*groups: tuple[type, str, dict[str, Any]]):
    """Decorator: give the command one option per config field of each (class, panel,
    shown defaults) group; the command gets `given={cls: {field: parsed value}}` holding only
    the options that were typed."""
    from nora.config import field_types, parse_text

    def deco(fn):
        own = pyinspect.signature(fn, eval_str=True).parameters.values()
        extra, owner, short = [], {}, {}
        for cls, panel, defaults in groups:
            for p in _field_options(cls, panel, defaults):
                extra.append(p)
                owner[p.name] = cls
                info = p.annotation.__metadata__[0]  # in Annotated, the 1st name sits in .default
                short[p.name] = min([info.default, *info.param_decls], key=len)

        @functools.wraps(fn)
        def wrapper(**kw):
            given: dict[type, dict[str, Any]] = {cls: {} for cls, _, _ in groups}
            for name, cls in owner.items():
                v = kw.pop(name)
                if isinstance(v, str):  # typed ('none' too: it unsets a file's value);
                    # errors name the option's shortest spelling
                    given[cls][name] = parse_text(field_types(cls)[name], v, short[name])
                elif v is not None:
                    given[cls][name] = v
            return fn(given=given, **kw)

        wrapper.__signature__ = pyinspect.Signature([p for p in own if p.name != "given"] + extra)
        wrapper.__annotations__ = {}
        return wrapper

    return deco


def _adapter_groups():
    from nora.config import TRAIN_ADAPTER, AdapterConfig

    shown = {f.name: f.default for f in dataclasses.fields(AdapterConfig)} | TRAIN_ADAPTER
    return (AdapterConfig, "Adapter (AdapterConfig)", shown)


def _train_groups():
    from nora.config import TrainConfig

    shown = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "adapter"}
    return (TrainConfig, "Training (TrainConfig)", shown)


def resolve_train_config(file: Path | None, given: dict[type, dict[str, Any]]):
    """TrainConfig from the defaults, then `file` (YAML or JSON, the layout of
    train_config.json: training fields plus an `adapter:` mapping), then the typed options."""
    from nora.config import AdapterConfig, ConfigError, TrainConfig, from_mapping

    d = _read_config_file(file)
    adapter = {**(d.get("adapter") or {}), **given.get(AdapterConfig, {})}
    d = {**d, **given.get(TrainConfig, {}), "adapter": adapter}
    try:
        return from_mapping(TrainConfig, d)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}" if file is not None else str(e)) from None


def _read_config_file(file: Path | None) -> dict[str, Any]:
    """A YAML/JSON mapping of config fields ({} without a file)."""
    import yaml

    from nora.config import ConfigError

    if file is None:
        return {}
    try:
        d = yaml.safe_load(Path(file).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file} is not valid YAML/JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file} must hold a mapping of config fields")
    return d


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
@_with_config_options(_adapter_groups())
def params(
    model: Annotated[
        str, typer.Option(help="smollm2-135m, a local folder or a hub id")
    ] = "smollm2-135m",
    given: dict | None = None,
) -> None:
    """Trainable-parameter table of an adapter on a model (built on the meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import nora
    from nora.config import TRAIN_ADAPTER, AdapterConfig, from_mapping

    cfg = from_mapping(AdapterConfig, {**TRAIN_ADAPTER, **given[AdapterConfig]})
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
@_with_config_options(_adapter_groups(), _train_groups())
def train_cmd(
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML/JSON config (the layout of train_config.json); options override it"
        ),
    ] = None,
    print_config: Annotated[
        bool, typer.Option(help="print the resolved config (YAML; --config reads it) and exit")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="with --print-config: as JSON")] = False,
    given: dict | None = None,
) -> None:
    """Fine-tune an adapter. Rerunning the same command resumes from the last checkpoint."""
    cfg = resolve_train_config(config, given)
    if print_config:
        typer.echo(_dump(cfg.to_dict(), "json" if json_ else "yaml"))
        return
    from accelerate import PartialState

    from nora.train import train

    summary = train(cfg)
    if PartialState().is_main_process:  # once, under `accelerate launch` too
        typer.echo(json.dumps(summary.to_dict(data=False), indent=2))


def _dump(d: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(d, indent=2)
    import yaml

    return yaml.safe_dump(d, sort_keys=False).rstrip()


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
    tasks: Annotated[
        str | None,
        typer.Option(help="lm-evaluation-harness tasks instead, e.g. gsm8k,arc_easy"),
    ] = None,
    limit: Annotated[float | None, typer.Option(help="lm-eval: examples per task")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval: few-shot examples")] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="lm-eval: a folder of your own task YAMLs")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="lm-eval: folder for lm_eval_results.json (default: the adapter's)"),
    ] = None,
) -> None:
    """Held-out perplexity (token-weighted) and optional greedy accuracy, base or adapter; or
    with --tasks, lm-evaluation-harness's benchmarks (its table, its results JSON)."""
    import nora
    from nora.data import batches, build_splits, load_examples
    from nora.evaluate import accuracy as score
    from nora.evaluate import perplexity
    from nora.models import load_base_model

    base, tok = load_base_model(model)
    if adapter is not None:
        nora.load_adapter(base, adapter)
    if tasks:
        from nora.lmeval import format_table, run_tasks, write_results

        n = int(limit) if limit is not None and limit >= 1 else limit  # lm-eval: count or share
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        res = run_tasks(base, tok, names, n, num_fewshot, batch_size, include_path)
        typer.echo(format_table(res))
        dest = out or adapter or Path("lm-eval-out")
        typer.echo(f"written: {write_results(res, dest)}")
        if (dest / nora.checkpoint.CONFIG_NAME).is_file():  # an adapter folder: its card's numbers
            from nora.modelcard import write_card

            card = write_card(dest)
            typer.echo(f"written: {card}" if card else f"kept {dest / 'README.md'} (not nora's)")
        return
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
    max_steps: Annotated[
        int, typer.Option("--max-steps", "--steps", help="optimizer steps per method")
    ] = 96,
    r: Rank = 16,
    lr: Annotated[
        float | None, typer.Option(help="one rate for both methods (default: each one's tuned)")
    ] = None,
    seed: int = 0,
    quick: Annotated[bool, typer.Option(help="a 1-minute smoke run (tiny numbers)")] = False,
) -> None:
    """LoRA vs NoRA at the same rank on the embedded default (offline): table + figures."""
    from nora.study.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out_dir=out_dir, max_steps=max_steps, r=r, lr=lr, seed=seed, n_train=max_steps * 8
    )
    if quick:
        cfg = DemoConfig(
            out_dir=out_dir,
            max_steps=3,
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
    from nora.analysis import VIEWS, SpectralSummary, analyze_adapter
    from nora.checkpoint import write_json
    from nora.data import batches, build_splits
    from nora.models import load_base_model
    from nora.study.plots import plot_run  # matplotlib only when plotting

    base, tok = load_base_model(model)
    kw = {"path": data_path} if data_path else {}
    _, eval_set, _ = build_splits(tok, data, 0, n_eval, max_len, **kw)
    eval_batches = batches(eval_set, tok.pad_token_id, 8)
    out = out or adapter_dir / "analysis"
    summary = analyze_adapter(adapter_dir, base, eval_batches, max_tokens=max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    summary["plots"] = {k: p.name for k, p in plot_run(summary, out).items()}
    write_json(out / "analysis.json", summary, allow_nan=False)
    agg = SpectralSummary.of(summary)
    for view in VIEWS:
        stats = agg.view(view)
        er, auc = stats.effective_rank.mean, stats.auc90.mean
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
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="study only: run only this dataset's steps (repeatable); "
            "one worker per dataset can share --out"
        ),
    ] = None,
) -> None:
    """Methods × ranks × seeds (× ablations); resumable: finished runs are skipped."""
    import torch

    from nora.study.runner import load_study, run_study
    from nora.study.sweep.run import run_sweep

    if threads:
        torch.set_num_threads(threads)
    command = "nora sweep " + " ".join(sys.argv[2:])
    study = load_study(spec)
    if study is not None:
        result = run_study(study, out, log=typer.echo, command=command, datasets=dataset)
    else:
        if dataset:
            raise typer.BadParameter("--dataset is for studies (a preset or file with study: true)")
        result = run_sweep(spec, out, log=typer.echo, only=_split(only), command=command)
    if result["failed"]:
        typer.echo(f"{result['failed']} run(s) failed: see error.json files under {out}", err=True)


@app.command()
@_user_errors
def report(
    sweep_dir: Path,
    folders: Annotated[
        list[Path] | None,
        typer.Argument(help="the pilot folders, after --pilots", show_default=False),
    ] = None,
    pilots: Annotated[
        bool,
        typer.Option(
            "--pilots",
            help="a study's report with study v2's pilot table, from the pilot folders that "
            "follow: nora report STUDY_DIR --pilots P1 P2",
        ),
    ] = False,
) -> None:
    """Markdown report with the paper's figures and tables, from a sweep or study folder."""
    from nora.study.report import build_study_report
    from nora.study.sweep.report import build_report

    # click takes no variadic option: --pilots is a flag, the folders after it are arguments
    if bool(folders) != pilots:
        raise typer.BadParameter("pilot folders go after --pilots: --pilots P1 P2 ...")
    study = (sweep_dir / "study.json").is_file()
    if pilots and not study:
        raise typer.BadParameter(f"--pilots is for a study's report; {sweep_dir} is not a study")
    written = build_study_report(sweep_dir, folders or ()) if study else build_report(sweep_dir)
    typer.echo(f"written: {written}")


def _serve_groups():
    from nora.serving.config import ServeConfig

    shown = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    shown["preload"] = None
    return (ServeConfig, "Serving (ServeConfig)", shown)


def resolve_serve_config(file: Path | None, given: dict[type, dict[str, Any]]):
    """ServeConfig from the defaults, then `file` (YAML or JSON: ServeConfig's fields, the
    layout --print-config writes), then the typed options."""
    from nora.config import ConfigError, from_mapping
    from nora.serving.config import ServeConfig

    d = {**_read_config_file(file), **given.get(ServeConfig, {})}
    try:
        return from_mapping(ServeConfig, d)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}" if file is not None else str(e)) from None


@app.command()
@_user_errors
@_with_config_options(_serve_groups())
def serve(
    config: Annotated[
        Path | None,
        typer.Option(help="YAML/JSON config (ServeConfig's fields); options override it"),
    ] = None,
    print_config: Annotated[
        bool, typer.Option(help="print the resolved config (YAML; --config reads it) and exit")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="with --print-config: as JSON")] = False,
    given: dict | None = None,
) -> None:
    """OpenAI-compatible server: many unmerged adapters over one base model, batched together."""
    cfg = resolve_serve_config(config, given)
    if print_config:
        typer.echo(_dump(cfg.to_dict(), "json" if json_ else "yaml"))
        return
    from nora.serving import serve as run_server
    from nora.serving.tenants import KeyConfigError

    try:
        run_server(cfg)
    except KeyConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


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


if __name__ == "__main__":  # `python -m nora.cli` (accelerate launch -m nora.cli); keep last
    main()
