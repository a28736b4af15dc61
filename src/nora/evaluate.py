"""Evaluation: token-weighted perplexity (the paper's metric) and generation accuracy.

Perplexity = exp(Σ NLL over every supervised token / number of supervised tokens), the same
for base models and adapters. Logits are computed only at supervised positions: the LM head
over a 49k vocabulary at every position is a large share of the cost on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _inputs(batch: dict) -> dict:
    # Cached hidden states (nora.prefix_cache) replace the token ids when present.
    key = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
    return {key: batch[key], "attention_mask": batch["attention_mask"], "use_cache": False}


def _full_logits(model: nn.Module, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    return model(**_inputs(batch)).logits[:, :-1][mask]


def _head_logits(model: nn.Module, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    out = model.base_model(**_inputs(batch))
    hidden = out.last_hidden_state[:, :-1][mask]  # (N, H): supervised positions only
    return model.get_output_embeddings()(hidden)  # (N, V)


def supports_fast_nll(model: nn.Module, batch: dict) -> bool:
    """Whether lm_head(backbone(x)) reproduces the model's own logits (no soft-capping etc.).

    Checked once on a real batch rather than assumed per architecture.
    """
    batch = {k: v[:1] for k, v in batch.items()}  # one row is enough, and full logits are big
    mask = batch["labels"][:, 1:] != -100
    if not hasattr(model, "base_model") or model.get_output_embeddings() is None:
        return False
    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    try:
        with torch.no_grad():
            fast, full = _head_logits(model, batch, mask), _full_logits(model, batch, mask)
    except (AttributeError, TypeError):
        return False
    finally:
        model.train(was_training)
    return fast.shape == full.shape and torch.allclose(
        fast.float(), full.float(), atol=1e-4, rtol=1e-4
    )


def position_logits(model: nn.Module, batch: dict, mask: torch.Tensor, fast: bool = True):
    """(N, V) next-token logits at the N positions where `mask` (B, T-1) is set; `fast`: the LM
    head runs on those positions only (see `supports_fast_nll`)."""
    return (_head_logits if fast else _full_logits)(model, batch, mask)


def batch_nll(model: nn.Module, batch: dict, fast: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL over supervised tokens, number of those tokens) for one batch."""
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = labels != -100
    logits = position_logits(model, batch, mask, fast)  # (N, V)
    nll = F.cross_entropy(logits.float(), labels[mask], reduction="sum")
    return nll, int(mask.sum())


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per token (nats)
    tokens: int

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens}


@torch.no_grad()
def perplexity(
    model: nn.Module,
    batches: Iterable[dict],
    progress: bool = False,
    fast: bool | None = None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    score: Callable[..., tuple[torch.Tensor, int]] | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity over `batches` (collated dicts with labels = -100 masked).

    `context()` wraps each forward (e.g. `PrefixCache.top_only` for cached batches);
    `score(model, batch, fast) -> (sum, count)` replaces the NLL (`batch_nll`), e.g. the KL
    to a teacher (`nora.distill.kl_eval`).
    """
    score = score or batch_nll
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in tqdm(list(batches), desc="eval ppl", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            with context():
                if fast is None:
                    fast = supports_fast_nll(model, batch)
                nll, n = score(model, batch, fast=fast)
            total, count = total + float(nll), count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no supervised tokens to evaluate (every label is masked)")
    return PerplexityResult(math.exp(total / count), total / count, count)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy completions for tokenized prompts, batched with left padding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    try:
        for i in tqdm(
            range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False
        ):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
            mask = torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device
            )
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            outs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outs


def accuracy(
    model: nn.Module,
    tokenizer,
    examples: Sequence,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    samples_path: str | Path | None = None,
    n_samples: int = 20,
    progress: bool = False,
) -> dict:
    """Greedy pass@1 with the data source's own scorer; writes a sample of outputs as JSONL."""
    from nora.data import score_answer
    from nora.data.tokenization import prompt_ids

    prompts = [prompt_ids(tokenizer, ex.messages) for ex in examples]
    completions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    scores = [score_answer(ex, c) for ex, c in zip(examples, completions, strict=True)]
    if samples_path is not None:
        path = Path(samples_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for ex, c, s in list(zip(examples, completions, scores, strict=True))[:n_samples]:
                f.write(
                    json.dumps(
                        {
                            "prompt": ex.messages[-1]["content"],
                            "gold": ex.answer,
                            "completion": c,
                            "score": s,
                        }
                    )
                    + "\n"
                )
    return {"accuracy": sum(scores) / max(len(scores), 1), "n": len(scores)}
