"""The training loop: AdamW + cosine schedule with warmup, gradient accumulation and clipping,
periodic evaluation, checkpoints that resume exactly, built on `accelerate`.

    from nora.train import TrainConfig, train
    summary = train(TrainConfig(adapter=AdapterConfig(method="nora", r=16), max_steps=100))

Exact resume: the data order is a pure function of (seed, step) — no sampler state — and a
checkpoint holds the adapter, the optimizer, the scheduler and the RNG state taken at the
start of the next step. A run killed at any point and resumed from its last checkpoint ends
with the same adapter weights as an uninterrupted run. Checkpoints are safetensors + JSON
(no pickle) written into a temporary folder and renamed into place.

Several processes (`accelerate launch --num_processes 2 -m nora.cli train ...`): each process
takes its slice of every global micro-batch (`batch_size` examples each) and the loss is the
token-weighted mean over the whole global batch, so N processes with batch_size b train the
same adapter as one process with batch_size N·b. Only the main process writes files.

FSDP (`accelerate launch --use_fsdp --fsdp_version 2 --num_processes N -m nora.cli train ...`):
the same global batch, with the model sharded by PyTorch's FSDP2 (`fully_shard`: each decoder
layer one group, the embeddings, final norm and head the root's), the frozen base and the
adapters alike, so each process holds 1/N of every weight and of the AdamW state. Checkpoints
and the final adapter hold whole tensors, gathered from the shards (adapter-sized: the base is
never gathered): the usual files, which load in one process.

Output folder:
    train_config.json  metrics.jsonl  summary.json
    checkpoints/step-000040/  (adapter + training_state.{safetensors,json})
    adapter/           the final adapter (PEFT layout)
    logs/              tracker files (--report-to tensorboard)

The code reads top-down: `_setup` (model, data, optimizer, resume) -> `_train_step` (one
optimizer step) / `_evaluate` / `_checkpoint` -> `train` (the loop) -> `TrainResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import nora
from nora import tracking
from nora.config import AdapterConfig, ConfigError, TrainConfig  # noqa: F401 (re-exported)
from nora.evaluate import batch_nll, perplexity, supports_fast_nll
from nora.prefix_cache import PrefixCache


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what was kept."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C: a checkpoint was saved and the same command resumes (callers that run many
    trainings, like the study, stop on it instead of recording a failed run)."""


# --- data order: a pure function of (seed, micro-batch index) --------------------------------


def micro_batch_indices(n: int, batch_size: int, seed: int, m: int) -> list[int]:
    """Example indices of global micro-batch `m`: epochs are seeded permutations, last partial
    batch dropped, so any step's data can be recomputed on resume without sampler state."""
    per_epoch = n // batch_size
    epoch, pos = divmod(m, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size].tolist()


# --- checkpoints: safetensors + JSON, atomic --------------------------------------------------


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor], rank: int = 0) -> None:
    """Restore this process's generators; process `rank` > 0 finds its own under 'rank{i}.'."""
    mine = {
        k.removeprefix(f"rank{rank}."): v for k, v in state.items() if k.startswith(f"rank{rank}.")
    }
    state = mine or {k: v for k, v in state.items() if not k.startswith("rank")}
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` as `like` holds it: this process's shard when `like` is an FSDP2 DTensor (every
    process has read the whole tensor, so each takes its piece without communicating)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(
        full.to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )


@contextlib.contextmanager
def _gathered(model: nn.Module, optimizer):
    """Within the block, the adapters' parameters and their optimizer state are whole tensors
    (FSDP2 shards gathered, on every process: call it on all of them); the shards are put back
    on exit. Only adapter-sized tensors are gathered, the sharded base is left alone."""
    from torch.distributed.tensor import DTensor

    places = [  # (dict, key): where a shard lives, the same order on every process
        (mod._parameters, k)
        for w in nora.adapter_modules(model).values()
        for mod in w.adapter.modules()
        for k, v in mod._parameters.items()
        if isinstance(v, DTensor)
    ]
    places += [(st, k) for st in optimizer.state.values() for k, v in st.items() if isinstance(v, DTensor)]  # fmt: skip
    shards = [d[k] for d, k in places]
    try:
        for (d, k), v in zip(places, shards, strict=True):
            whole = v.detach().full_tensor()  # an all-gather
            d[k] = nn.Parameter(whole, v.requires_grad) if isinstance(v, nn.Parameter) else whole
        yield
    finally:
        for (d, k), v in zip(places, shards, strict=True):
            d[k] = v


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer, scheduler, step: int, rng: dict[str, torch.Tensor]
) -> Path:
    """Write checkpoint `step` into `folder/step-XXXXXX` atomically (temp folder + rename)."""
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        nora.save_adapter(model, tmp, card=False)  # for resuming, not for sharing: no card
        opt = optimizer.state_dict()
        tensors = {f"rng.{k}": v for k, v in rng.items()}
        meta = {
            "step": step,
            "param_groups": opt["param_groups"],
            "scheduler": scheduler.state_dict(),
            "optimizer_scalars": {},
        }
        for pid, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    meta["optimizer_scalars"][f"{pid}.{k}"] = v
        save_file(tensors, tmp / "training_state.safetensors")
        (tmp / "training_state.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "training_state.json").is_file())
    return done[-1] if done else None


def load_training_state(ckpt: Path, optimizer, scheduler) -> tuple[int, dict[str, torch.Tensor]]:
    meta = json.loads((ckpt / "training_state.json").read_text())
    tensors = load_file(ckpt / "training_state.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["optimizer_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    params = [p for g in optimizer.param_groups for p in g["params"]]  # in state-dict id order
    for pid, st in state.items():  # under FSDP: this process's shard of each moment
        for name, v in st.items():
            if torch.is_tensor(v) and v.shape == params[pid].shape:
                st[name] = _shard_like(v, params[pid])
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    return meta["step"], rng


# --- results ---------------------------------------------------------------------------------


@dataclass
class StepLog:
    """One optimizer step, as written to metrics.jsonl (tokens summed over all processes)."""

    step: int
    loss: float  # token-weighted mean NLL over the global batch (KL to the teacher: distil)
    lr: float
    grad_norm: float
    tokens: int  # input tokens (attention_mask == 1)
    supervised_tokens: int
    tok_per_s: float  # input tokens per second since the (re)start
    elapsed_s: float


@dataclass
class EvalLog:
    step: int
    eval_loss: float
    eval_ppl: float


@dataclass
class TrainResult:
    """What `train` returns and writes to summary.json."""

    method: str
    r: int
    steps: int
    trainable_params: int
    eval_ppl: float
    eval_loss: float
    eval_tokens: int
    train_time_s: float
    tok_per_s: float | None  # input tokens per second
    supervised_tok_per_s: float | None
    final_train_loss: float | None
    data: Any = None  # nora.data.DataStats of the splits, when `train` built them
    history: list[StepLog] = field(default_factory=list, repr=False)

    def to_dict(self, data: bool = True) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "history"}
        d["data"] = dataclasses.asdict(self.data) if data and self.data is not None else None
        if not data:
            del d["data"]
        return d


# --- setup ---------------------------------------------------------------------------------------


@dataclass
class _Data:
    train: list[dict]
    eval: list[dict]
    stats: Any  # DataStats, or None when the caller passed the splits
    pad_id: int
    collate: Callable  # (examples, pad_id) -> batch dict
    context: Callable  # () -> context manager around every forward (the prefix cache's)


@dataclass
class _Run:
    """Everything a run holds between steps."""

    cfg: TrainConfig
    accel: Any  # accelerate.Accelerator
    model: nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    raw: nn.Module  # the model itself: adapters, saving, evaluation
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[nn.Parameter]
    data: _Data
    out: Path
    fsdp: bool = False  # the model is sharded with fully_shard (FSDP2)
    fast: bool = False  # head-only NLL (one process only: it bypasses DDP's gradient sync)
    teacher: Any = None  # nora.distill.Teacher: the loss is KL to it instead of the labels' NLL
    step: int = 0
    rng: dict[str, torch.Tensor] | None = None  # generators' state at the last step boundary

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def world(self) -> int:
        return self.accel.num_processes


def _check_output(cfg: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from, after checking `output_dir` may be (re)used."""
    out = Path(cfg.output_dir)
    if (out / "train_config.json").is_file():
        if not resume:
            raise TrainingError(f"{out} already holds a run; pass resume or use another output_dir")
        try:
            old = json.loads((out / "train_config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TrainingError(
                f"{out / 'train_config.json'} is not valid JSON ({e}); the run there cannot be "
                "resumed: fix the file or use another output_dir"
            ) from None
        try:  # older runs lack newer fields: compare with their defaults filled in
            old = TrainConfig.from_dict(old).to_dict()
        except ConfigError:
            pass
        new = cfg.to_dict()
        diff = sorted(
            k
            for k in set(old) | set(new)
            if k not in cfg.RESUMABLE_CHANGES and old.get(k) != new.get(k)
        )
        if diff:
            raise TrainingError(
                f"{out} holds a run with a different config (differs in {diff}); "
                "use another --output-dir, or the same settings to resume"
            )
    ckpt_dir = out / "checkpoints"
    return latest_checkpoint(ckpt_dir) if resume and ckpt_dir.is_dir() else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def _check_parallelism(cfg: TrainConfig, prefix) -> bool:
    """Whether `accelerate launch` asked for FSDP; refuses what nora cannot run, before the
    Accelerator is built (which would import DeepSpeed, and on CPU ignores the FSDP flag)."""
    for flag, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):  # fmt: skip
        if _env_flag(flag):
            raise TrainingError(
                f"nora train does not run under {name}: it is not installed on the machine nora "
                "is tested on (CPU only), so it is untested. Shard the model with FSDP2 instead: "
                "accelerate launch --use_fsdp --fsdp_version 2 ... (docs/training-stack.md)"
            )
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return False
    version = os.environ.get("FSDP_VERSION", "1")  # accelerate's default is FSDP1
    if version != "2":
        raise TrainingError(
            f"nora train shards with FSDP2 (torch's fully_shard), not FSDP version {version}: "
            "pass --fsdp_version 2 to accelerate launch (or fsdp_version: 2 in its config)"
        )
    if cfg.load_in_8bit:
        raise TrainingError(
            "--load-in-8bit cannot be sharded: bitsandbytes keeps each int8 weight's scales on "
            "the parameter object, which fully_shard replaces by a plain shard. Use "
            "--load-in-4bit (sharded) or plain data parallelism (--multi_gpu)"
        )
    if prefix is not None:
        raise TrainingError(
            "a prefix cache runs the top layers alone, outside the sharded model's forward; "
            "train without it under FSDP"
        )
    if cfg.teacher:
        raise TrainingError(
            "distillation swaps the teacher's weights into the model's layers, which under "
            "FSDP hold shards; distil under plain data parallelism (--multi_gpu)"
        )
    return True


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    if cfg.report_to != "none" and not tracking.available(cfg.report_to):
        raise TrainingError(
            f"--report-to {cfg.report_to} needs the {cfg.report_to} package "
            f"(pip install {cfg.report_to}); nothing was trained"
        )

    use_cuda = torch.cuda.is_available()
    # Under FSDP on CPU, accelerate 1.15 resolves MULTI_CPU (gloo) and ignores its FSDP plugin
    # (it sets DistributedType.FSDP for GPU-like devices only), so nora calls fully_shard
    # itself, on every device: one code path, the one tested here.
    return Accelerator(
        cpu=not use_cuda,
        mixed_precision="bf16" if use_cuda and cfg.dtype is None else "no",
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(Path(cfg.output_dir) / "logs"),
    )


def _shard(model: nn.Module) -> None:
    """FSDP2 in place: every decoder layer (the classes transformers lists in
    `_no_split_modules`) its own group, then the root (embeddings, final norm, head: tied
    weights stay in one group). Each parameter is sharded on its own (a DTensor), so a group
    mixes the frozen base and the trainable adapters; only the adapters get gradients."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for layer in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(layer)
    fully_shard(model)


def _load(
    cfg: TrainConfig, accel, model, tokenizer, splits, prefix, fsdp: bool
) -> tuple[nn.Module, _Data]:
    """The base model (quantized if asked) and the data, checked against each other."""
    from nora.data import build_splits, collate
    from nora.models import load_base_model

    if model is None:
        model, tokenizer = load_base_model(cfg.model, dtype=cfg.dtype, device=str(accel.device))
    if tokenizer is None:
        raise TrainingError("pass the tokenizer together with the model")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        from nora.quantize import quantize_base

        # under FSDP the packed 4-bit bytes are stored as float32 so fully_shard can shard them
        storage = torch.float32 if fsdp else torch.uint8
        quantize_base(model, bits=4 if cfg.load_in_4bit else 8, storage=storage)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if splits is not None:
        (train_set, eval_set), stats = splits, None
    else:
        kw = {"path": cfg.data_path} if cfg.data_path else {}
        seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        train_set, eval_set, stats = build_splits(
            tokenizer, cfg.data, cfg.n_train, cfg.n_eval, cfg.max_len, seed, cfg.n_skip, **kw
        )
    layers = cfg.adapter.layers_to_transform
    if prefix is not None and (layers is None or min(layers) < prefix.first):
        raise TrainingError(
            f"the prefix cache skips layers below {prefix.first}, but layers "
            f"{layers or 'all'} are adapted"
        )
    if len(train_set) < cfg.batch_size * accel.num_processes:
        raise TrainingError(
            f"only {len(train_set)} training examples for a global micro-batch "
            f"of {cfg.batch_size * accel.num_processes}"
        )
    data = _Data(
        train_set,
        eval_set,
        stats,
        pad_id,
        prefix.collate if prefix is not None else collate,
        prefix.top_only if prefix is not None else contextlib.nullcontext,
    )
    return model, data


def _setup(cfg, model, tokenizer, resume, splits, prefix) -> _Run:
    """Load, inject, build the optimizer, restore the last checkpoint if there is one."""
    try:
        cfg.validate()
    except ConfigError as e:
        raise TrainingError(str(e)) from None
    last = _check_output(cfg, resume)
    fsdp = _check_parallelism(cfg, prefix)
    accel = _accelerator(cfg)
    # launched, accelerate has set up the process group (one process too); run directly,
    # there is nothing to shard across: the plain one-process run
    fsdp = fsdp and torch.distributed.is_initialized()
    torch.manual_seed(cfg.seed)
    model, data = _load(cfg, accel, model, tokenizer, splits, prefix, fsdp)
    teacher = None
    if cfg.teacher:  # checked before the model is touched
        from nora.distill import DistillError, Teacher

        try:
            teacher = Teacher.load(cfg.teacher)
            teacher.check(model)
        except DistillError as e:
            raise TrainingError(str(e)) from None
    torch.manual_seed(cfg.seed)  # adapter init depends only on the seed
    if not nora.has_adapters(model):
        nora.inject(model, cfg.adapter)
    if torch.cuda.is_available():  # master weights in fp32 under bf16 autocast
        for w in nora.adapter_modules(model).values():
            w.adapter.float()
    if fsdp:
        _shard(model)  # before the optimizer, which then holds the shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps
    )
    # DDP-wrapped by accelerate; a sharded model is left as it is (it syncs its own gradients)
    prepared, optimizer = (model, optimizer) if fsdp else accel.prepare(model, optimizer)
    run = _Run(
        cfg,
        accel,
        prepared,
        accel.unwrap_model(prepared),
        optimizer,
        scheduler,
        params,
        data,
        Path(cfg.output_dir),
        teacher=teacher,
        fsdp=fsdp,
    )
    if last is not None:
        _restore(run, last)
    if accel.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        tmp = run.out / f".train_config.json.{os.getpid()}"  # other processes may be reading it
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        os.replace(tmp, run.out / "train_config.json")
        if run.step == 0 and (run.out / "metrics.jsonl").exists():
            (run.out / "metrics.jsonl").unlink()
    with data.context():
        run.fast = run.world == 1 and not fsdp and supports_fast_nll(run.raw, _micro_batch(run, 0))
    if run.rng is not None:
        _set_rng_state(run.rng, accel.process_index)
    if accel.is_main_process and cfg.report_to != "none":
        accel.init_trackers("nora", config=tracking.flat_config(cfg))
    accel.wait_for_everyone()
    return run


def _restore(run: _Run, ckpt: Path) -> None:
    weights = nora.checkpoint.read_weights(ckpt)
    with torch.no_grad():
        for name, w in nora.adapter_modules(run.raw).items():
            for k, p in w.adapter.state_dict().items():
                p.copy_(_shard_like(weights[f"{name}.{k}"], p))
    run.step, run.rng = load_training_state(ckpt, run.optimizer, run.scheduler)
    run.accel.print(f"resuming from {ckpt} (step {run.step})")


# --- one step, evaluation, checkpoints -------------------------------------------------------


def _micro_batch(run: _Run, m: int) -> dict[str, torch.Tensor]:
    """This process's share of global micro-batch `m`."""
    b, rank = run.cfg.batch_size, run.accel.process_index
    idx = micro_batch_indices(len(run.data.train), b * run.world, run.cfg.seed, m)
    batch = run.data.collate(
        [run.data.train[i] for i in idx[rank * b : (rank + 1) * b]], run.data.pad_id
    )
    return {k: v.to(run.accel.device) for k, v in batch.items()}


def _global_sum(run: _Run, *values: float) -> list[float]:
    """Sum scalars over the processes (as they are with one)."""
    if run.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=run.accel.device)
    return run.accel.reduce(t, reduction="sum").tolist()


def _train_step(run: _Run) -> tuple[float, float, int, int]:
    """One optimizer step over `grad_accum` micro-batches -> (loss, grad norm, input tokens,
    supervised tokens), the loss token-weighted over the global batch."""
    cfg, accel = run.cfg, run.accel
    micro = [_micro_batch(run, run.step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]
    if run.teacher is not None:  # distillation: every position with a real next token counts
        from nora.distill import batch_kl, positions

        counted = [int(positions(b).sum()) for b in micro]
    else:
        counted = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    n_tok, n_in = _global_sum(
        run,
        sum(counted),
        sum(int(b["attention_mask"].sum()) for b in micro),  # all input tokens
    )
    loss_sum = 0.0
    student = run.raw if run.fast else run.model
    for j, b in enumerate(micro):
        # DDP averages gradients over processes: × world makes that the global token mean.
        sync = accel.no_sync(run.model) if j < len(micro) - 1 else contextlib.nullcontext()
        with sync, accel.autocast(), run.data.context():
            if run.teacher is not None:
                nll, _ = batch_kl(student, b, run.teacher, fast=run.fast, raw=run.raw)
            else:
                nll, _ = batch_nll(student, b, fast=run.fast)
            accel.backward(nll * run.world / max(n_tok, 1))
        loss_sum += float(nll.detach())
    (loss_sum,) = _global_sum(run, loss_sum)
    loss = loss_sum / max(n_tok, 1)
    if not math.isfinite(loss):
        kept = latest_checkpoint(run.ckpt_dir) if run.ckpt_dir.is_dir() else None
        raise TrainingError(
            f"loss is {loss} at step {run.step + 1}; stopping. "
            + (f"Last good checkpoint: {kept}" if kept else "No checkpoint was written yet")
            + " (lower the learning rate or check the data)"
        )
    grad_norm = accel.clip_grad_norm_(run.params, cfg.max_grad_norm)  # over all shards
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss, float(grad_norm), int(n_in), int(n_tok)


def _evaluate(run: _Run):
    """Held-out perplexity (every process computes the same; the main one logs it)."""
    from nora.data import batches

    held = batches(run.data.eval, run.data.pad_id, run.cfg.batch_size, run.data.collate)
    if run.teacher is not None:  # eval_loss is then the mean KL to the teacher per position
        from nora.distill import kl_eval

        ev = kl_eval(run.raw, held, run.teacher, fast=run.fast, context=run.data.context)
    else:
        ev = perplexity(run.raw, held, fast=run.fast, context=run.data.context)
    run.model.train()
    rec = EvalLog(run.step, ev.nll, ev.ppl)
    if run.accel.is_main_process:
        _log(run.out / "metrics.jsonl", dataclasses.asdict(rec))
    tracking.log(run.accel, {"eval/loss": ev.nll, "eval/ppl": ev.ppl}, run.step)
    return ev


def _checkpoint(run: _Run, gather: bool = True) -> Path | None:
    """Write checkpoint `run.step` (main process), keep the newest `keep_checkpoints`.
    Every process must call it (the generators' states, and under FSDP the adapter and AdamW
    shards, are gathered) unless `gather=False`; then, under FSDP, nothing can be written."""
    if run.fsdp and not gather:
        return None
    rng = run.rng
    if gather and run.world > 1:
        from accelerate.utils import gather_object

        states = gather_object([run.rng])  # one per process, in rank order
        rng = dict(states[0])
        for i, st in enumerate(states[1:], 1):
            rng.update({f"rank{i}.{k}": v for k, v in st.items()})
    path = None
    with _gathered(run.raw, run.optimizer) if run.fsdp else contextlib.nullcontext():
        if run.accel.is_main_process:
            run.ckpt_dir.mkdir(parents=True, exist_ok=True)
            path = save_checkpoint(
                run.ckpt_dir, run.raw, run.optimizer, run.scheduler, run.step, rng
            )
            for old in sorted(run.ckpt_dir.glob("step-*"))[: -run.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    if gather:
        run.accel.wait_for_everyone()
    return path


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# --- the loop ----------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    tokenizer=None,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int, nn.Module], None] | None = None,
    splits: tuple[list[dict], list[dict]] | None = None,
    prefix: PrefixCache | None = None,
) -> TrainResult:
    """Fine-tune an adapter per `cfg`; resumes from `cfg.output_dir` when it holds checkpoints.

    `model`/`tokenizer` may be passed in (tests, notebooks); otherwise `cfg.model` is loaded.
    `on_step(step, model)` runs after every optimizer step (and its checkpoint, if any).
    `splits=(train, eval)` overrides the data `cfg` names (a sweep builds them once), and
    `prefix`, a `PrefixCache` holding those examples, skips the frozen lower layers.
    Returns the `TrainResult` also written to summary.json.
    """
    run = _setup(cfg, model, tokenizer, resume, splits, prefix)
    main = run.accel.is_main_process
    run.model.train()
    bar = tqdm(
        total=cfg.max_steps,
        initial=run.step,
        desc=f"train {cfg.adapter.method}",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    t0, tokens, supervised, history = time.perf_counter(), 0, 0, []
    try:
        while run.step < cfg.max_steps:
            run.rng = _rng_state()  # a checkpoint taken during this step restarts it from here
            loss, grad_norm, n_in, n_tok = _train_step(run)
            run.rng = _rng_state()  # from here on, a checkpoint restarts at the next step
            tokens, supervised = tokens + n_in, supervised + n_tok
            elapsed = time.perf_counter() - t0
            rec = StepLog(
                run.step,
                loss,
                run.scheduler.get_last_lr()[0],
                grad_norm,
                n_in,
                n_tok,
                tokens / elapsed,
                elapsed,
            )
            history.append(rec)
            if main:
                _log(run.out / "metrics.jsonl", dataclasses.asdict(rec))
            tracking.log_step(run.accel, rec)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec.tok_per_s:.0f}")
            bar.update(1)
            last = run.step == cfg.max_steps
            if cfg.eval_every and run.step % cfg.eval_every == 0 and not last:
                _evaluate(run)
            if cfg.save_every and run.step % cfg.save_every == 0 and not last:
                _checkpoint(run)
            if on_step is not None:
                on_step(run.step, run.raw)
    except KeyboardInterrupt:
        bar.close()
        path = _checkpoint(run, gather=False)  # no collective calls while being interrupted
        where = (
            f"checkpoint saved to {path}"
            if path
            else "no checkpoint now (under FSDP the shards cannot be gathered while interrupted)"
            if run.fsdp
            else "the main process saves the checkpoint"
        )
        raise TrainingInterrupted(
            f"interrupted at step {run.step}; {where}; run the same command again to resume"
        ) from None
    bar.close()
    return _finish(run, time.perf_counter() - t0, tokens, supervised, history)


def _card(run: _Run, ev) -> dict[str, Any]:
    """What the final adapter's model card says beyond its config (`nora.modelcard`)."""
    from nora.modelcard import TrainingInfo
    from nora.models import hub_identity

    base, license = hub_identity(getattr(getattr(run.raw, "config", None), "_name_or_path", None))
    used = {"n_train": len(run.data.train), "n_eval": len(run.data.eval)}  # what the data gave
    # distilling, ev is the KL to the teacher (its `ppl` is exp(KL), no perplexity)
    ppl = ev.ppl if run.teacher is None else None
    info = TrainingInfo.from_config(
        run.cfg, run.step, run.world, eval_ppl=ppl, eval_loss=ev.nll, **used
    )
    return {"training": info, "license": license, "base_model": base}


def _finish(run: _Run, train_time: float, tokens: int, supervised: int, history) -> TrainResult:
    """Final evaluation, checkpoint, adapter, summary.json and the trackers' closing logs."""
    ev = _evaluate(run)
    _checkpoint(run)
    cfg = run.cfg
    result = TrainResult(
        method=cfg.adapter.method,
        r=cfg.adapter.r,
        steps=run.step,
        trainable_params=nora.count_parameters(run.raw).trainable,
        eval_ppl=ev.ppl,
        eval_loss=ev.nll,
        eval_tokens=ev.tokens,
        train_time_s=train_time,
        tok_per_s=tokens / train_time if tokens else None,
        supervised_tok_per_s=supervised / train_time if supervised else None,
        final_train_loss=history[-1].loss if history else None,
        data=run.data.stats,
        history=history,
    )
    with _gathered(run.raw, run.optimizer) if run.fsdp else contextlib.nullcontext():
        if run.accel.is_main_process:
            nora.save_adapter(run.raw, run.out / "adapter", **_card(run, ev))
    if run.accel.is_main_process:
        (run.out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
    run.accel.wait_for_everyone()
    if cfg.report_to != "none":  # last: accelerate's end_training ends the process group
        tracking.finish(run, history)
    return result
