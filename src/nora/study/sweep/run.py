"""Sweeps: methods × ranks × seeds (× ablations) from one YAML/JSON file, resumable.

    nora sweep paper-mini --out results/paper-mini      # a preset, or a path to a YAML/JSON file
    nora report results/paper-mini                      # markdown + figures from what finished

Phases, each run in its own folder with `result.json` written last (present = done, skipped
on the next call; a half-finished run resumes from its checkpoint):
1. `lr/`: each variant at `lr_grid.rank`, seed 0, for every learning rate in the grid, scored
   on a validation split disjoint from the test split; the best is used for the variant
   everywhere after (fair learning rates, as in the paper's later version).
2. `runs/<data>/<variant>/r<rank>/s<seed>/`: the grid, scored on the test split, with the
   spectral analysis (`nora.analysis`) of each adapter.
3. `ablations/`: the paper's Table 2 rows at one rank.
4. `probe/`: the logistic-map case study (paper Table 1): correct steps and state collapse.
5. `efficiency.json`: params, prefill latency (interleaved, medians) per variant.
Runs that fail write `error.json` and the grid goes on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import nora
from nora.checkpoint import write_json
from nora.config import AdapterConfig, ConfigError, from_mapping
from nora.data import batches
from nora.study.context import DataContext, Runner, machine_info
from nora.study.results import SweepRun
from nora.train import TrainConfig, train

# The paper's Table 2 rows: each changes one design choice of NoRA.
TABLE2_ROWS = {
    "module-level": {"method": "nora", "placement": "module"},
    "identity": {"method": "nora", "activation": "identity"},
    "relu": {"method": "nora", "activation": "relu"},
    "no-dropout": {"method": "nora", "dropout": 0.0},
}

PRESETS: dict[str, dict[str, Any]] = {
    # The whole study on the embedded default, sized for about 2 hours on a 2-core CPU.
    "paper-mini": {
        "model": "smollm2-135m",
        "datasets": ["math", "reasoning-mix"],
        "top_layers": 4,
        "n_val": 32,
        "train": {
            "max_steps": 24,
            "batch_size": 8,
            "n_train": 192,
            "n_eval": 48,  # the test split
            "max_len": 256,
            "warmup_ratio": 0.05,
        },
        "variants": {
            "lora": {"method": "lora", "alpha": 32},  # the paper's baseline: alpha = 32 always
            "nora": {"method": "nora"},
            "lora-fixed-scale": {"method": "lora", "scale": 2.0},  # alpha/r fixed
            "lora-rslora": {"method": "lora", "alpha": 8, "rslora": True},  # alpha/sqrt(r)
            "nolora": {"method": "nolora"},
            "aurora": {"method": "aurora"},
            "loran": {"method": "loran"},
        },
        "ranks": [4, 16, 64, 128],
        "seeds": [0, 1],
        # At r=16 the three LoRA scalings coincide (s = 2), so the controls skip it; the
        # sibling methods run at one rank, to stay within the time budget.
        "variant_ranks": {
            "lora-fixed-scale": [4, 64, 128],
            "lora-rslora": [4, 64, 128],
            "nolora": [16],
            "aurora": [16],
            "loran": [16],
        },
        # LR grid at r=16, where the LoRA controls equal LoRA: they take LoRA's choice.
        "lr_grid": {
            "values": [3e-4, 1e-3, 3e-3, 1e-2],
            "rank": 16,
            "datasets": ["math"],
            "same_as": {"lora-fixed-scale": "lora", "lora-rslora": "lora"},
        },
        "ablations": {
            "rank": 64,
            "dataset": "math",
            "base": "nora",
            "variants": TABLE2_ROWS,
        },
        "probe": {
            "variants": ["lora", "nora"],
            "rank": 64,
            "n_train": 240,
            "n_test": 16,
            "steps": 30,
            "max_new_tokens": 120,
        },
        "efficiency": {"rank": 64, "batch": 4, "seq": 128, "repeats": 7},
        "analysis_tokens": 2048,
    },
    # The paper's setting, for users with GPUs (Llama-3-8B, SlimOrca and MathInstruct).
    "paper": {
        "model": "meta-llama/Meta-Llama-3-8B",
        "datasets": ["slimorca", "mathinstruct"],
        "top_layers": None,
        "n_val": 500,
        "train": {
            "max_steps": 3000,
            "batch_size": 16,
            "n_train": 48000,
            "n_eval": 2000,  # the test split
            "max_len": 1024,
            "warmup_ratio": 0.03,
        },
        "variants": {
            "lora": {"method": "lora", "alpha": 32},
            "lora-fixed-scale": {"method": "lora", "scale": 2.0},
            "lora-rslora": {"method": "lora", "alpha": 16, "rslora": True},
            "nora": {"method": "nora"},
        },
        "ranks": [16, 64, 128, 512],
        "seeds": [0, 1],
        "variant_ranks": {},
        "lr_grid": {"values": [3e-4, 5e-4, 1e-3], "rank": 64, "datasets": ["slimorca"]},
        "ablations": {
            "rank": 128,
            "dataset": "slimorca",
            "base": "nora",
            "variants": TABLE2_ROWS,
        },
        "probe": {
            "variants": ["lora", "nora"],
            "rank": 128,
            "n_train": 2000,
            "n_test": 50,
            "steps": 300,
            "max_new_tokens": 200,
        },
        "efficiency": {"rank": 64, "batch": 8, "seq": 512, "repeats": 10},
        "analysis_tokens": 4096,
    },
}


class SweepError(ValueError):
    """The sweep file or folder is not usable; the message says why."""


# TrainConfig fields a sweep sets per run (not in its `train` mapping).
PER_RUN_FIELDS = frozenset({"adapter", "model", "data", "data_path", "seed", "lr", "output_dir"})


def check_train_keys(
    train: dict[str, Any], error: type[Exception], per_run: frozenset[str] = PER_RUN_FIELDS
) -> None:
    """`train` may only hold TrainConfig's own field names (less those set per run, `per_run`);
    an unknown key is an `error` naming the nearest valid one."""
    import difflib

    allowed = sorted({f.name for f in dataclasses.fields(TrainConfig)} - per_run)
    for key in sorted(set(train) - set(allowed)):
        near = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise error(f"unknown train setting {key!r}{hint}; known: {allowed}")


@dataclass
class SweepConfig:
    model: str = "smollm2-135m"
    datasets: list[str] = field(default_factory=lambda: ["math"])
    top_layers: int | None = 4  # adapt only the top N layers (None: all)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields; n_eval = test split
    n_val: int = 0  # validation examples (for the learning-rate grid), held out before the test
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=lambda: [16])
    seeds: list[int] = field(default_factory=lambda: [0])
    variant_ranks: dict[str, list[int]] = field(default_factory=dict)
    lr_grid: dict[str, Any] | None = None
    ablations: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    efficiency: dict[str, Any] | None = None
    analysis_tokens: int = 2048
    data_path: dict[str, str] = field(default_factory=dict)  # local files for hub datasets

    @classmethod
    def load(cls, spec: str) -> SweepConfig:
        """A preset name or a YAML/JSON file."""
        if spec in PRESETS:
            d = PRESETS[spec]
        else:
            p = Path(spec)
            if not p.is_file():
                raise SweepError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
            import yaml

            try:
                d = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
            except yaml.YAMLError as e:
                raise SweepError(f"{p} is not valid YAML/JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        if not isinstance(d, dict):
            raise SweepError("a sweep file must hold a mapping")
        d = dict(d)
        train = dict(d.get("train") or {})
        d["train"] = train
        try:  # unknown fields (with the nearest name) and wrong types, as for any config file
            cfg = from_mapping(cls, d, where="sweep")
        except ConfigError as e:
            raise SweepError(str(e)) from None
        cfg.check()
        return cfg

    def check(self) -> None:
        if not self.variants:
            raise SweepError("the sweep names no variants")
        for name, kw in {**self.variants, **((self.ablations or {}).get("variants", {}))}.items():
            try:
                AdapterConfig(**{**kw, "r": 4})
            except (TypeError, ValueError) as e:
                raise SweepError(f"variant {name!r}: {e}") from None
        check_train_keys(self.train, SweepError)

    def ranks_of(self, variant: str) -> list[int]:
        return self.variant_ranks.get(variant, self.ranks)


# --- one run -------------------------------------------------------------------------------


def _context(cfg: SweepConfig, dataset: str, n_train: int | None = None, n_test: int | None = None):
    from nora.study.context import DataContext

    t = cfg.train
    return DataContext(
        cfg.model,
        dataset,
        n_train=n_train or t.get("n_train", 256),
        n_val=cfg.n_val,
        n_test=n_test or t.get("n_eval", 64),
        max_len=t.get("max_len", 256),
        top_layers=cfg.top_layers,
        data_path=cfg.data_path.get(dataset),
    )


def _train_config(
    cfg: SweepConfig,
    ctx: DataContext,
    variant: dict,
    r: int,
    seed: int,
    lr: float,
    out: Path,
    steps: int | None = None,
) -> TrainConfig:
    t = {k: v for k, v in cfg.train.items() if k not in ("max_steps", "n_eval")}
    adapter = AdapterConfig(**{**variant, "r": r, "layers_to_transform": ctx.layers})
    return TrainConfig(
        adapter=adapter,
        model=cfg.model,
        max_steps=steps or cfg.train.get("max_steps", 30),
        n_eval=len(ctx.test_set),
        seed=seed,
        **{**t, "lr": lr},
        output_dir=str(out),
    )


def _run(
    cfg: SweepConfig,
    ctx: DataContext,
    tcfg: TrainConfig,
    eval_set: list[dict],
    names: tuple[str, str, str],
    analyze: bool,
) -> SweepRun:
    """Train one adapter (resuming if a checkpoint exists), score it, analyse it. `names`:
    (variant, dataset, split) of the record."""
    out = Path(tcfg.output_dir)
    summary = train(
        tcfg,
        model=ctx.model,
        tokenizer=ctx.tok,
        progress=False,
        splits=(ctx.train_set, eval_set),
        prefix=ctx.prefix,
    )
    spectra = None
    if analyze:
        from nora.analysis import analyze as spectral

        token_batches = batches(eval_set, ctx.tok.pad_token_id, 8)  # tokens, not cached states
        spectra = spectral(
            ctx.model, token_batches, max_tokens=cfg.analysis_tokens, keep_singular_values=256
        )
    nora.unload(ctx.model)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # keep the final adapter only
    return SweepRun(
        *names,
        method=tcfg.adapter.method,
        r=tcfg.adapter.r,
        seed=tcfg.seed,
        lr=tcfg.lr,
        ppl=summary.eval_ppl,
        nll=summary.eval_loss,
        trainable_params=summary.trainable_params,
        train_time_s=summary.train_time_s,
        tok_per_s=summary.tok_per_s,
        steps=summary.steps,
        analysis=spectra,
    )


# --- the sweep -----------------------------------------------------------------------------


class _Sweep(Runner):
    """One call of `run_sweep`: walks the phases, skipping runs that are already done."""

    def __init__(self, cfg: SweepConfig, out: Path, log):
        super().__init__(out, log)
        self.cfg = cfg

    def build_context(self, dataset: str) -> DataContext:
        """Model, data and prefix cache for `dataset`, and the base model's PPL (once)."""
        c = _context(self.cfg, dataset)
        base = self.out / "runs" / dataset / "base" / "result.json"
        if not base.is_file():
            from nora.evaluate import perplexity

            ppl = perplexity(c.model, c.batches(c.test_set), context=c.forward_context).ppl
            base.parent.mkdir(parents=True, exist_ok=True)
            write_json(base, {"method": "base", "dataset": dataset, "ppl": ppl})
        return c

    def run(
        self,
        run_dir: Path,
        dataset: str,
        variant: str,
        kw: dict,
        r: int,
        seed: int,
        lr: float,
        split: str = "test",
        analyze: bool = False,
    ) -> SweepRun | None:
        def job() -> SweepRun:
            c = self.context(dataset)
            tcfg = _train_config(self.cfg, c, kw, r, seed, lr, run_dir)
            eval_set = c.val_set if split == "validation" and c.val_set else c.test_set
            return _run(
                self.cfg,
                c,
                tcfg,
                eval_set,
                (variant, dataset, split),
                analyze,
            )

        return self.guarded(
            run_dir, run_dir / "result.json", job, str(run_dir), parse=SweepRun.from_dict
        )

    def choose_lrs(self, dataset: str) -> dict[str, float]:
        """Best learning rate per variant on the validation split (seed 0, one rank)."""
        grid = self.cfg.lr_grid
        if not grid:
            return {}
        on = grid.get("datasets", self.cfg.datasets)
        source = dataset if dataset in on else on[0]
        chosen = {}
        same_as = grid.get("same_as", {})
        for name, kw in self.cfg.variants.items():
            if name in same_as:
                continue
            scores = {}
            for lr in grid["values"]:
                run_dir = self.out / "lr" / source / name / f"lr{lr:g}"
                if source != dataset and not (run_dir / "result.json").is_file():
                    continue  # chosen on another dataset that has not run yet
                res = self.run(run_dir, source, name, kw, grid["rank"], 0, lr, "validation")
                if res is not None:
                    scores[lr] = res.ppl
            if scores:
                chosen[name] = min(scores, key=scores.get)
        for name, other in same_as.items():
            if other in chosen:
                chosen[name] = chosen[other]
        if chosen:
            (self.out / "lr" / f"chosen-{dataset}.json").write_text(
                json.dumps({"chosen_on": source, "lr": chosen}, indent=1)
            )
        return chosen


def run_sweep(
    spec: str,
    out_dir: str | Path,
    log=print,
    only: list[str] | None = None,
    command: str | None = None,
) -> dict:
    """Run (or continue) a sweep; `only` restricts to phases lr/runs/ablations/probe/efficiency."""
    cfg = SweepConfig.load(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "sweep.json"
    if saved.is_file() and _saved_config(saved) != dataclasses.asdict(cfg):
        raise SweepError(f"{out} holds a sweep with another config; use another --out")
    if not saved.is_file():
        saved.write_text(
            json.dumps(
                {
                    "spec": spec,
                    "config": dataclasses.asdict(cfg),
                    "command": command,
                    "machine": machine_info(),
                },
                indent=1,
            )
        )
    phases = only or ["lr", "runs", "ablations", "probe", "efficiency"]
    sweep = _Sweep(cfg, out, log)
    default_lr = cfg.train.get("lr", 5e-4)
    t_start = time.perf_counter()
    for dataset in cfg.datasets:
        lrs = sweep.choose_lrs(dataset) if "lr" in phases else _chosen_lrs(out, dataset)
        if "runs" in phases:  # seed-major: a partial sweep still covers every cell once
            for seed in cfg.seeds:
                for name, kw in cfg.variants.items():
                    for r in cfg.ranks_of(name):
                        run_dir = out / "runs" / dataset / name / f"r{r}" / f"s{seed}"
                        sweep.run(
                            run_dir,
                            dataset,
                            name,
                            kw,
                            r,
                            seed,
                            lrs.get(name, default_lr),
                            analyze=True,
                        )
        ab = cfg.ablations
        if "ablations" in phases and ab and ab.get("dataset", cfg.datasets[0]) == dataset:
            lr = lrs.get(ab.get("base", "nora"), default_lr)
            for seed in cfg.seeds:
                for name, kw in ab["variants"].items():
                    run_dir = out / "ablations" / dataset / name / f"s{seed}"
                    sweep.run(run_dir, dataset, name, kw, ab["rank"], seed, lr)
        if dataset == cfg.datasets[0] and "probe" in phases and cfg.probe:
            sweep.ctx = None
            _probe_phase(cfg, out, sweep)
    sweep.ctx = None
    if "efficiency" in phases and cfg.efficiency:
        eff = out / "efficiency"
        sweep.guarded(eff, eff / "result.json", lambda: measure_efficiency(cfg), "efficiency")
    total = time.perf_counter() - t_start
    log(f"sweep phase(s) {phases} finished in {total / 60:.1f} min, {sweep.failed} failed run(s)")
    with (out / "timing.jsonl").open("a") as f:
        f.write(json.dumps({"phases": phases, "seconds": total, "failed": sweep.failed}) + "\n")
    return {"failed": sweep.failed, "seconds": total}


def _saved_config(saved: Path) -> dict:
    """The config a sweep folder was started with, in today's field names."""
    try:
        return dataclasses.asdict(SweepConfig.from_dict(json.loads(saved.read_text())["config"]))
    except (SweepError, TypeError, ValueError):
        return {}


def _chosen_lrs(out: Path, dataset: str) -> dict[str, float]:
    f = out / "lr" / f"chosen-{dataset}.json"
    return json.loads(f.read_text())["lr"] if f.is_file() else {}


# --- the logistic-map case study (paper Table 1) -------------------------------------------


def _probe_phase(cfg: SweepConfig, out: Path, sweep: Runner) -> None:
    from nora.data import load_examples, probe_logistic
    from nora.data.tokenization import prompt_ids
    from nora.evaluate import generate

    p = cfg.probe
    ctx = None
    for name in p["variants"]:
        for seed in cfg.seeds:
            run_dir = out / "probe" / name / f"s{seed}"

            def job(name=name, seed=seed, run_dir=run_dir):
                nonlocal ctx
                if ctx is None:
                    ctx = _context(cfg, "logistic-map", n_train=p["n_train"], n_test=p["n_test"])
                lr = _chosen_lr(out, name, cfg)
                tcfg = _train_config(
                    cfg, ctx, cfg.variants[name], p["rank"], seed, lr, run_dir, steps=p["steps"]
                )
                train(
                    tcfg,
                    model=ctx.model,
                    tokenizer=ctx.tok,
                    progress=False,
                    splits=(ctx.train_set, ctx.test_set),
                    prefix=ctx.prefix,
                )
                n_val = cfg.n_val
                examples = load_examples("logistic-map", n_val + p["n_test"] + p["n_train"], 0)
                examples = examples[n_val : n_val + p["n_test"]]
                outs = generate(
                    ctx.model,
                    ctx.tok,
                    [prompt_ids(ctx.tok, e.messages) for e in examples],
                    max_new_tokens=p["max_new_tokens"],
                    batch_size=8,
                )
                nora.unload(ctx.model)
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                probes = [
                    probe_logistic(o, e.meta["r"], e.meta["x0"], e.meta["steps"])
                    for o, e in zip(outs, examples, strict=True)
                ]
                (run_dir / "samples.jsonl").write_text(
                    "".join(
                        json.dumps({"prompt": e.messages[-1]["content"], "completion": o, **pr})
                        + "\n"
                        for e, o, pr in zip(examples, outs, probes, strict=True)
                    )
                )
                return {
                    "variant": name,
                    "seed": seed,
                    "r": p["rank"],
                    "correct_steps": statistics.mean(x["correct_steps"] for x in probes),
                    "all_correct": statistics.mean(x["all_correct"] for x in probes),
                    "collapse": statistics.mean(x["collapse"] for x in probes),
                    "steps": statistics.mean(x["steps"] for x in probes),
                    "n": len(probes),
                }

            sweep.guarded(run_dir, run_dir / "result.json", job, str(run_dir))


def _chosen_lr(out: Path, name: str, cfg: SweepConfig) -> float:
    for f in sorted((out / "lr").glob("chosen-*.json")):
        lr = json.loads(f.read_text())["lr"].get(name)
        if lr is not None:
            return lr
    return cfg.train.get("lr", 5e-4)


# --- efficiency (paper Table 3) -------------------------------------------------------------


@torch.no_grad()
def measure_efficiency(cfg: SweepConfig) -> dict:
    """Params and prefill latency per variant at one rank, all variants interleaved, medians."""
    from nora.models import load_base_model

    e = cfg.efficiency
    model, _ = load_base_model(cfg.model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (e["batch"], e["seq"]), generator=g)
    # A merged LoRA has the base model's shapes, so its time *is* the base model's time.
    names = ["base", *cfg.variants]

    def setup(name):
        if name != "base":
            variant = cfg.variants[name]
            nora.inject(model, AdapterConfig(**{**variant, "r": e["rank"], "init_weights": False}))

    times: dict[str, list[float]] = {n: [] for n in names}
    params: dict[str, int] = {}
    for rep in range(e["repeats"] + 1):  # the first round warms up and is dropped
        for name in names:
            setup(name)
            if name not in params:
                params[name] = nora.count_parameters(model).trainable if name != "base" else 0
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            if name != "base":
                nora.unload(model)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "rank": e["rank"],
        "batch": e["batch"],
        "seq": e["seq"],
        "repeats": e["repeats"],
        "rows": [
            {
                "variant": n,
                "params": params[n],
                "prefill_ms": 1000 * med[n],
                "relative_to_merged_lora": med[n] / med["base"],
                "tok_per_s": e["batch"] * e["seq"] / med[n],
            }
            for n in names
        ],
        "note": "q,v of every layer adapted, unmerged; merged LoRA = base model time; "
        "variants interleaved round by round, first round dropped",
    }


# --- dry run (the `paper` preset without its GPUs) -------------------------------------------


def dry_run(cfg: SweepConfig, model_config) -> list[dict]:
    """Every (variant, rank) of the grid built on the meta device: no weights, no data.

    Checks that each variant's AdapterConfig injects into the model `model_config` describes
    (a transformers config; the real checkpoint is not downloaded), that the training config
    validates, that the datasets are known, and that every adapted module maps a batch to
    the right shape. Returns the trainable parameters per run.
    """
    from transformers import AutoModelForCausalLM

    from nora.data import DATASETS

    if unknown := [d for d in cfg.datasets if d not in DATASETS]:
        raise SweepError(f"unknown datasets {unknown}; known: {sorted(DATASETS)}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    n_layers = model_config.num_hidden_layers
    layers = list(range(n_layers - cfg.top_layers, n_layers)) if cfg.top_layers else None
    rows = []
    for name, kw in cfg.variants.items():
        for r in cfg.ranks_of(name):
            adapter = AdapterConfig(**{**kw, "r": r, "layers_to_transform": layers})
            TrainConfig(adapter=adapter, model=cfg.model, **cfg.train).validate()
            with torch.device("meta"):
                nora.inject(model, adapter)
            try:
                for module, w in nora.adapter_modules(model).items():
                    a = w.adapter
                    x = torch.empty(2, 8, a.in_features, device="meta")
                    y = w(x)
                    if y.shape != (2, 8, a.out_features):
                        raise SweepError(f"{name} r={r}: {module} gives {tuple(y.shape)}")
                rows.append(
                    {
                        "variant": name,
                        "r": r,
                        "trainable_params": nora.count_parameters(model).trainable,
                        "modules": len(nora.adapter_modules(model)),
                    }
                )
            finally:
                nora.unload(model)
    return rows
