"""Experiment trackers for `nora train --report-to tensorboard|wandb|mlflow`, through
accelerate's trackers (the Accelerator is built with `log_with=cfg.report_to`).

Logged per step: train/loss, train/lr, train/grad_norm, train/tok_per_s; per evaluation:
eval/loss, eval/ppl; at the end: the spectral summary (effective rank of each adapted layer's
latent, `spectral/effective_rank/<layer>`, and their mean) and the loss-curve figure.
TensorBoard writes under `<output_dir>/logs/nora/`. Only the main process logs.
"""

from __future__ import annotations

import json
from typing import Any


def available(name: str) -> bool:
    """Whether the tracker's package is installed (accelerate would skip it with a warning)."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    check = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    return bool(check.get(name, is_mlflow_available)())


def flat_config(cfg) -> dict[str, Any]:
    """The run's config as flat scalars (TensorBoard's hparams take no lists or nesting)."""
    d = cfg.to_dict()
    flat = {f"adapter.{k}": v for k, v in d.pop("adapter").items()}
    flat.update(d)
    return {
        k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items()
    }


def log(accel, values: dict[str, float], step: int) -> None:
    if accel.trackers:  # none unless --report-to names one (accelerate logs on main only)
        accel.log(values, step=step)


def log_step(accel, rec) -> None:
    values = {"train/loss": rec.loss, "train/lr": rec.lr, "train/grad_norm": rec.grad_norm}
    log(accel, {**values, "train/tok_per_s": rec.tok_per_s}, rec.step)


def spectral_summary(run) -> dict[str, float]:
    """Effective rank of every adapted layer's latent over the held-out split (nora.analysis)."""
    from nora.analysis import SpectralSummary, analyze
    from nora.data import batches

    # plain batches through the whole model (a prefix cache's batches skip the lower layers)
    eval_batches = batches(run.data.eval, run.data.pad_id, run.cfg.batch_size)
    summary = analyze(run.raw, eval_batches, max_tokens=1024, keep_singular_values=0)
    ranks = {
        f"spectral/effective_rank/{name}": layer["latent"]["effective_rank"]
        for name, layer in summary["layers"].items()
    }
    ranks["spectral/effective_rank/mean"] = SpectralSummary.of(summary).latent.effective_rank.mean
    return ranks


def loss_figure(history):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r.step for r in history], [r.loss for r in history], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL per supervised token")
    ax.legend()
    fig.tight_layout()
    return fig


def finish(run, history) -> None:
    """Log the spectral summary (not under FSDP) and the loss curve, then close the trackers."""
    accel = run.accel
    if accel.is_main_process and accel.trackers:
        if not run.fsdp:  # sharded, the model runs only with every process: no summary then
            log(accel, spectral_summary(run), run.step)
        fig = loss_figure(history)
        for tracker in accel.trackers:
            _log_figure(tracker.name, accel.get_tracker(tracker.name, unwrap=True), fig, run.step)
        import matplotlib.pyplot as plt

        plt.close(fig)
    accel.end_training()


def _log_figure(name: str, backend, fig, step: int) -> None:
    if name == "tensorboard":  # backend: a torch SummaryWriter
        backend.add_figure("loss_curve", fig, global_step=step)
        backend.flush()
    elif name == "wandb":  # backend: the wandb run
        import wandb

        backend.log({"loss_curve": wandb.Image(fig)}, step=step)
    elif name == "mlflow":  # backend: the active run id; figures go through the module API
        import mlflow

        mlflow.log_figure(fig, "loss_curve.png")
