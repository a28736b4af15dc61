"""The training loop: AdamW + cosine schedule with warmup, gradient accumulation and clipping,
periodic evaluation, checkpoints that resume exactly, built on `accelerate`.

    from nora.train import TrainConfig, train
    summary = train(TrainConfig(adapter=AdapterConfig(method="nora", r=16), max_steps=100))

Exact resume: the data order is a pure function of (seed, step) — no sampler state — and a
checkpoint holds the adapter, the optimizer, the scheduler and the RNG state taken at the
start of the next step. A run killed at any point and resumed from its last checkpoint ends
with the same adapter weights as an uninterrupted run. Checkpoints are safetensors + JSON
(no pickle) written into a temporary folder and renamed into place.

Output folder:
    train_config.json  metrics.jsonl  summary.json
    checkpoints/step-000040/  (adapter + training_state.{safetensors,json})
    adapter/           the final adapter (PEFT layout)
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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import nora
from nora.config import AdapterConfig, ConfigError, TrainConfig  # noqa: F401 (re-exported)
from nora.evaluate import batch_nll, perplexity, supports_fast_nll
from nora.prefix_cache import PrefixCache


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what was kept."""


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


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer, scheduler, step: int, rng: dict[str, torch.Tensor]
) -> Path:
    """Write checkpoint `step` into `folder/step-XXXXXX` atomically (temp folder + rename)."""
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        nora.save_adapter(model, tmp)
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
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    return meta["step"], rng


# --- the loop ----------------------------------------------------------------------------------


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    f = out / "train_config.json"
    if not f.is_file():
        return
    old = json.loads(f.read_text())
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


def train(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    tokenizer=None,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int, nn.Module], None] | None = None,
    splits: tuple[list[dict], list[dict]] | None = None,
    prefix: PrefixCache | None = None,
) -> dict[str, Any]:
    """Fine-tune an adapter per `cfg`; resumes from `cfg.output_dir` when it holds checkpoints.

    `model`/`tokenizer` may be passed in (tests, notebooks); otherwise `cfg.model` is loaded.
    `on_step(step, model)` runs after every optimizer step (and its checkpoint, if any).
    `splits=(train, eval)` overrides the data `cfg` names (a sweep builds them once), and
    `prefix`, a `PrefixCache` holding those examples, skips the frozen lower layers.
    Returns the summary also written to summary.json.
    """
    from accelerate import Accelerator

    from nora.data import batches, build_splits, collate
    from nora.models import load_base_model

    try:
        cfg.validate()
    except ConfigError as e:
        raise TrainingError(str(e)) from None
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    last = latest_checkpoint(ckpt_dir) if resume and ckpt_dir.is_dir() else None
    if (out / "train_config.json").is_file():
        _check_resume_config(out, cfg)
    if not resume and (out / "train_config.json").is_file():
        raise TrainingError(f"{out} already holds a run; pass resume or use another output_dir")

    use_cuda = torch.cuda.is_available()
    accel = Accelerator(
        cpu=not use_cuda, mixed_precision="bf16" if use_cuda and cfg.dtype is None else "no"
    )
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_base_model(cfg.model, dtype=cfg.dtype, device=str(accel.device))
    if tokenizer is None:
        raise TrainingError("pass the tokenizer together with the model")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if splits is not None:
        (train_set, eval_set), stats = splits, None
    else:
        kw = {"path": cfg.data_path} if cfg.data_path else {}
        train_set, eval_set, stats = build_splits(
            tokenizer, cfg.data, cfg.n_train, cfg.n_eval, cfg.max_len, seed=cfg.seed, **kw
        )
    layers = cfg.adapter.layers_to_transform
    if prefix is not None and (layers is None or min(layers) < prefix.first):
        raise TrainingError(
            f"the prefix cache skips layers below {prefix.first}, but layers "
            f"{layers or 'all'} are adapted"
        )
    batch_of = prefix.collate if prefix is not None else collate
    ctx = prefix.top_only if prefix is not None else contextlib.nullcontext
    world = accel.num_processes
    if len(train_set) < cfg.batch_size * world:
        raise TrainingError(
            f"only {len(train_set)} training examples for a global micro-batch "
            f"of {cfg.batch_size * world}"
        )

    torch.manual_seed(cfg.seed)  # adapter init depends only on the seed
    if getattr(model, "_nora_state", None) is None:
        nora.inject(model, cfg.adapter)
    if use_cuda:  # master weights in fp32 under bf16 autocast
        for w in nora.adapter_modules(model).values():
            w.adapter.float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps
    )
    model, optimizer = accel.prepare(model, optimizer)
    raw = accel.unwrap_model(model)

    step, rng = 0, None
    if last is not None:
        weights = nora.checkpoint.read_weights(last)
        with torch.no_grad():
            for name, w in nora.adapter_modules(raw).items():
                for k, p in w.adapter.state_dict().items():
                    p.copy_(weights[f"{name}.{k}"])
        step, rng = load_training_state(last, optimizer, scheduler)
        accel.print(f"resuming from {last} (step {step})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    metrics = out / "metrics.jsonl"
    if step == 0 and metrics.exists():
        metrics.unlink()

    def micro_batch(m: int) -> dict[str, torch.Tensor]:
        idx = micro_batch_indices(len(train_set), cfg.batch_size * world, cfg.seed, m)
        mine = idx[
            accel.process_index * cfg.batch_size : (accel.process_index + 1) * cfg.batch_size
        ]
        batch = batch_of([train_set[i] for i in mine], pad_id)
        return {k: v.to(accel.device) for k, v in batch.items()}

    def eval_batches():
        return batches(eval_set, pad_id, cfg.batch_size, batch_of)

    # The head-only loss calls the backbone directly, which would bypass DDP's gradient sync.
    with ctx():
        fast = world == 1 and supports_fast_nll(raw, micro_batch(0))
    if rng is not None:
        _set_rng_state(rng)
    model.train()
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc=f"train {cfg.adapter.method}",
        disable=not (progress and accel.is_main_process),
        dynamic_ncols=True,
    )
    t0, tokens_seen, supervised_seen, history = time.perf_counter(), 0, 0, []
    try:
        while step < cfg.max_steps:
            rng = _rng_state()  # a checkpoint taken during this step restarts it from here
            micro = [micro_batch(step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]
            n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            n_in = sum(int(b["attention_mask"].sum()) for b in micro)  # all input tokens
            loss_sum = 0.0
            for b in micro:  # token-weighted over the whole accumulated batch
                with accel.autocast(), ctx():
                    nll, _ = batch_nll(model if not fast else raw, b, fast=fast)
                loss = nll / max(n_tok, 1)
                accel.backward(loss)
                loss_sum += float(nll.detach())
            loss_value = loss_sum / max(n_tok, 1)
            if not math.isfinite(loss_value):
                kept = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
                raise TrainingError(
                    f"loss is {loss_value} at step {step + 1}; stopping. "
                    + (f"Last good checkpoint: {kept}" if kept else "No checkpoint was written yet")
                    + " (lower the learning rate or check the data)"
                )
            grad_norm = accel.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rng = _rng_state()  # from here on, a checkpoint restarts at the next step
            tokens_seen += n_in
            supervised_seen += n_tok
            elapsed = time.perf_counter() - t0
            rec = {
                "step": step,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens": n_in,
                "supervised_tokens": n_tok,
                "tok_per_s": tokens_seen / elapsed,  # input tokens processed per second
                "elapsed_s": elapsed,
            }
            history.append(rec)
            if accel.is_main_process:
                _log(metrics, rec)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rec['tok_per_s']:.0f}")
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                ev = perplexity(raw, eval_batches(), fast=fast, context=ctx)
                model.train()
                if accel.is_main_process:
                    _log(metrics, {"step": step, "eval_loss": ev.nll, "eval_ppl": ev.ppl})
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                _save(accel, ckpt_dir, raw, optimizer, scheduler, step, rng, cfg)
            if on_step is not None:
                on_step(step, raw)
    except KeyboardInterrupt:
        bar.close()
        path = _save(accel, ckpt_dir, raw, optimizer, scheduler, step, rng, cfg)
        raise TrainingError(
            f"interrupted at step {step}; checkpoint saved to {path}; "
            "run the same command again to resume"
        ) from None
    bar.close()
    train_time = time.perf_counter() - t0
    ev = perplexity(raw, eval_batches(), fast=fast, context=ctx)
    _save(accel, ckpt_dir, raw, optimizer, scheduler, step, rng, cfg)
    summary = {
        "method": cfg.adapter.method,
        "r": cfg.adapter.r,
        "steps": step,
        "trainable_params": nora.count_parameters(raw).trainable,
        "eval_ppl": ev.ppl,
        "eval_loss": ev.nll,
        "eval_tokens": ev.tokens,
        "train_time_s": train_time,
        "tok_per_s": tokens_seen / train_time if tokens_seen else None,  # input tokens
        "supervised_tok_per_s": supervised_seen / train_time if supervised_seen else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "data": dataclasses.asdict(stats) if stats is not None else None,
    }
    if accel.is_main_process:
        nora.save_adapter(raw, out / "adapter")
        _log(metrics, {"step": step, "eval_loss": ev.nll, "eval_ppl": ev.ppl})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save(accel, ckpt_dir: Path, model, optimizer, scheduler, step: int, rng, cfg) -> Path | None:
    if not accel.is_main_process:
        return None
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(ckpt_dir, model, optimizer, scheduler, step, rng)
    for old in sorted(ckpt_dir.glob("step-*"))[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path
