"""Distillation from a fully fine-tuned teacher: a task whose difficulty is a high-rank update.

Why (study v2, issue 21): on the study's tasks an adapter's rank does not matter — the data, not
the adapter, is the limit. Here the target is a function, not labels:

- **Teacher**: the base model with every weight of the adapted modules (e.g. `q_proj` and
  `v_proj` of the top layers) fine-tuned on a task (`fit_teacher`): a full-rank ΔW per module.
  Saved as a safetensors file holding only those weights, named as in the base model.
- **Student**: an adapter on the same modules trained to match the teacher's next-token
  distributions (`TrainConfig.teacher`):

      loss = Σ_t KL(p_teacher(· | x≤t) ‖ p_student(· | x≤t)) / #positions

  over every position whose next token is real (prompt and response alike). A LoRA adapter of
  rank r expresses at most a rank-r ΔW per module, so how close it gets says how much the rank
  limits it, on as many prompts as one asks for (the generators are unlimited).

`random_delta` makes a teacher whose update is high-rank by construction (a Gaussian ΔW of a
multiple of the fitted one's norm). `batch_kl` is the training objective, `kl_eval` its
held-out mean (what `train` logs as `eval_loss` when distilling) and `example_kl` the
per-example values a bootstrap resamples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nora.evaluate import PerplexityResult, perplexity, position_logits


class DistillError(ValueError):
    """The teacher does not fit the model; the message says why."""


def positions(batch: dict) -> torch.Tensor:
    """(B, T-1) bool: position t predicts a real token t+1 (both inside the attention mask)."""
    m = batch["attention_mask"].bool()  # (B, T)
    return m[:, 1:] & m[:, :-1]


def _linear(model: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear called `name` in the base model (inside a nora wrapper if adapted)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise DistillError(f"the teacher names {name!r}, which the model does not have") from None
    mod = getattr(mod, "base_layer", mod)  # adapted: the wrapper's original module
    if not isinstance(mod, nn.Linear):
        raise DistillError(f"{name} is a {type(mod).__name__}, not a Linear")
    return mod


class Teacher:
    """Replacement weights for some of the base model's Linear layers: name -> (out, in)."""

    def __init__(self, weights: dict[str, torch.Tensor], meta: dict | None = None):
        if not weights:
            raise DistillError("a teacher needs at least one weight")
        self.weights, self.meta = weights, dict(meta or {})
        # the Linear modules found by `check`: model code may rename them later (the prefix
        # cache runs the top layers as a shorter list), the objects stay the same
        self._bound: tuple[int, dict[str, nn.Linear]] | None = None

    @classmethod
    def load(cls, path: str | Path) -> Teacher:
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"no teacher file at {path}")
        w = load_file(path)
        side = path.with_suffix(".json")
        meta = json.loads(side.read_text()) if side.is_file() else {}
        return cls({k.removesuffix(".weight"): v for k, v in w.items()}, meta)

    def save(self, path: str | Path) -> None:
        from nora.checkpoint import atomic_write, write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.weight": v.contiguous() for k, v in self.weights.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
        write_json(path.with_suffix(".json"), self.meta)

    def check(self, model: nn.Module) -> Teacher:
        """Every weight names a Linear of the model with the same shape; binds the teacher to
        those modules (call it on the whole model, before any layer-list surgery)."""
        lins = {}
        for name, w in self.weights.items():
            lins[name] = lin = _linear(model, name)
            if lin.weight.shape != w.shape:
                raise DistillError(
                    f"teacher weight {name} has shape {tuple(w.shape)}, "
                    f"the model's {tuple(lin.weight.shape)}"
                )
        self._bound = (id(model), lins)
        return self

    def _modules(self, model: nn.Module) -> dict[str, nn.Linear]:
        if self._bound is None or self._bound[0] != id(model):
            self.check(model)
        return self._bound[1]

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within this block `model` is the teacher: its weights swapped in, adapters off."""
        import nora

        swapped = []
        off = nora.disable_adapters(model) if nora.adapter_modules(model) else None
        with torch.no_grad(), off or contextlib.nullcontext():
            try:
                for name, lin in self._modules(model).items():
                    w = self.weights[name]
                    swapped.append((lin, lin.weight.data))
                    lin.weight.data = w.to(lin.weight.device, lin.weight.dtype)
                yield model
            finally:
                for lin, orig in swapped:
                    lin.weight.data = orig

    def delta_spectra(self, model: nn.Module) -> dict[str, dict]:
        """Per weight: effective rank (exp of the entropy of σ²/Σσ²) of ΔW = W_teacher − W0,
        its Frobenius norm, and how many singular values hold 90 % of its energy."""
        out = {}
        for name, lin in self._modules(model).items():
            dw = (self.weights[name].float() - lin.weight.float()).detach()  # (out, in)
            s2 = torch.linalg.svdvals(dw) ** 2  # (min(out, in),)
            p = s2 / s2.sum()
            k90 = int((torch.cumsum(p, 0) < 0.9).sum()) + 1
            erank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))
            out[name] = {"effective_rank": erank, "fro": float(s2.sum().sqrt()), "rank90": k90}
        return out


def random_delta(teacher: Teacher, model: nn.Module, seed: int = 0, scale: float = 1.0) -> Teacher:
    """The teacher with each update ΔW = W_teacher − W0 replaced by a Gaussian matrix of
    `scale` times its Frobenius norm: a change with its energy spread over every singular
    direction (a fine-tune's ΔW is low-rank: `delta_spectra`), so that how much of it a rank-r
    adapter can express grows with r up to min(d, k). At scale 1 it barely moves the model
    (measured on pilot-distill's teacher: KL to the base 0.001 against the fine-tune's 0.45,
    0.33 at 16x, 0.55 at 19x; results/study-v2/random_teacher_scale.py), so a study sets the
    scale that moves the model about as far as the fine-tune did. Seeded per module name:
    the same seed gives the same teacher on any machine. The meta says so (`delta_kind:
    random`, `delta_scale`)."""
    weights = {}
    for name, lin in teacher._modules(model).items():
        w0 = lin.weight.detach().float()  # (out, in)
        fro = (teacher.weights[name].float() - w0).norm()
        # a generator per module, seeded from a digest of (seed, name): layers.12 and layers.21
        # differ; 32 bits, all that torch's CPU generator (mt19937) takes from a seed
        digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:4], "big"))
        noise = torch.randn(w0.shape, generator=g)  # (out, in)
        weights[name] = (w0 + noise * (scale * fro / noise.norm())).to(teacher.weights[name].dtype)
    meta = {**teacher.meta, "delta_kind": "random", "delta_seed": seed, "delta_scale": scale}
    return Teacher(weights, meta).check(model)


def batch_kl(
    student: nn.Module, batch: dict, teacher: Teacher, fast: bool = True, raw: nn.Module = None
) -> tuple[torch.Tensor, int]:
    """(Σ over positions of KL(teacher ‖ student), number of positions) for one batch.

    `raw` is the unwrapped model when `student` is (e.g.) DDP-wrapped: the teacher runs on it.
    """
    mask = positions(batch)  # (B, T-1)
    with teacher.active(raw if raw is not None else student) as t_model:
        t_logp = F.log_softmax(position_logits(t_model, batch, mask, fast).float(), -1)  # (N, V)
    s_logp = F.log_softmax(position_logits(student, batch, mask, fast).float(), -1)  # (N, V)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")  # Σ p_t (log p_t − log p_s)
    return kl, int(mask.sum())


def kl_eval(
    model: nn.Module,
    batches: Iterable[dict],
    teacher: Teacher,
    fast: bool = True,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> PerplexityResult:
    """Mean KL(teacher ‖ model) per position over `batches`; `ppl` is exp of it (the ratio of
    the model's perplexity on the teacher's distribution to the teacher's own)."""

    def score(m: nn.Module, batch: dict, fast: bool) -> tuple[torch.Tensor, int]:
        return batch_kl(m, batch, teacher, fast)

    return perplexity(model, batches, fast=fast, context=context, score=score)


def fit_teacher(
    model: nn.Module,
    batches: Callable[[int], dict],
    modules: list[str],
    steps: int,
    lr: float,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    fast: bool = True,
    log: Callable[[str], None] | None = None,
) -> Teacher:
    """Fine-tune every weight of `modules` (names of Linear layers) by next-token NLL on
    `batches(step)`, AdamW at constant `lr` after a 5 % warm-up; returns the teacher and leaves
    the model exactly as it was (weights, requires_grad, mode)."""
    from nora.evaluate import batch_nll

    lins = {name: _linear(model, name) for name in modules}
    orig = {n: lin.weight.data.clone() for n, lin in lins.items()}
    grads = {p: p.requires_grad for p in model.parameters()}  # restored afterwards
    was_training = model.training
    params = [lin.weight for lin in lins.values()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    losses = []
    try:
        for p in grads:  # only the teacher's weights get gradients
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.train()
        for step in range(steps):
            with context():
                nll, n = batch_nll(model, batches(step), fast=fast)
            (nll / max(n, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(nll.detach()) / max(n, 1))
            if log and (step + 1) % 24 == 0:
                log(f"teacher step {step + 1}/{steps}: loss {sum(losses[-24:]) / 24:.4f}")
        fitted = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    finally:
        for n, lin in lins.items():
            lin.weight.data = orig[n]
            lin.weight.grad = None
        for p, g in grads.items():
            p.requires_grad_(g)
        model.train(was_training)
    meta = {"modules": modules, "steps": steps, "lr": lr, "train_loss": losses}
    return Teacher(fitted, meta)
