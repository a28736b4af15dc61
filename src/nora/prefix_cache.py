"""Reuse what is frozen: the hidden states entering the first adapted layer, computed once.

When adapters sit only in the top layers, everything below them is a fixed function of the
input tokens. `PrefixCache` runs those lower layers once per example, keeps the hidden states
that enter the first adapted layer, and later runs only the top layers from them (by passing
them as `inputs_embeds` while the model's layer list is temporarily cut to the top layers).
Exact, not an approximation — `verify` checks it against the full model on a real example,
and it is refused where it would not hold (dropout in the lower layers, a model whose forward
rescales `inputs_embeds`). Every run of a sweep over the same data shares one cache.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from nora.data import collate
from nora.inject import DEFAULT_LAYERS_PATTERN


class PrefixCacheError(ValueError):
    """The model cannot be split at that layer; the message says why."""


class _Stop(Exception):
    pass


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder-layer ModuleList (the longest list named like `layers`, `h`, …)."""
    lists = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and re.fullmatch(DEFAULT_LAYERS_PATTERN, n.rsplit(".", 1)[-1])
    ]
    if not lists:
        raise PrefixCacheError("no decoder-layer list (layers / h / blocks) found in the model")
    return max(lists, key=lambda nm: len(nm[1]))


class PrefixCache:
    """Hidden states at the input of layer `first_layer`, one tensor (T_i, H) per example."""

    def __init__(self, model: nn.Module, first_layer: int):
        self.model = model
        self.name, self.layers = find_layer_list(model)
        if not 0 < first_layer < len(self.layers):
            raise PrefixCacheError(
                f"first_layer must be in 1..{len(self.layers) - 1}, got {first_layer}"
            )
        self.first = first_layer
        lower = self.layers[:first_layer]
        cfg = vars(getattr(model, "config", None) or object())
        config_dropout = any(  # e.g. Llama's attention_dropout, applied functionally
            "dropout" in k and isinstance(v, float) and v > 0 for k, v in cfg.items()
        )
        if config_dropout or any(isinstance(m, nn.Dropout) and m.p > 0 for m in lower.modules()):
            raise PrefixCacheError("the lower layers use dropout: their output is not fixed")
        self.hidden: dict[int, torch.Tensor] = {}  # id(feature) -> (T, H)

    @torch.no_grad()
    def encode(self, features: list[dict], pad_id: int, batch_size: int = 8) -> None:
        """Run the lower layers once for each feature (stopping before the first adapted one)."""
        device = next(self.model.parameters()).device
        captured: list[torch.Tensor] = []

        def grab(_module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        todo = [f for f in features if id(f) not in self.hidden]
        handle = self.layers[self.first].register_forward_pre_hook(grab, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                batch = collate(chunk, pad_id)
                captured.clear()
                with contextlib.suppress(_Stop):
                    self.model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        use_cache=False,
                    )
                for f, h in zip(chunk, captured[0], strict=True):
                    self.hidden[id(f)] = h[: len(f["input_ids"])].detach().clone()
        finally:
            handle.remove()
            self.model.train(was_training)

    def collate(self, features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """`collate` plus `inputs_embeds`: the cached states, right-padded with zeros."""
        batch = collate(features, pad_id)
        T = batch["input_ids"].shape[1]
        hs = [self.hidden[id(f)] for f in features]
        emb = hs[0].new_zeros(len(hs), T, hs[0].shape[-1])  # (B, T, H)
        for i, h in enumerate(hs):
            emb[i, : len(h)] = h
        batch["inputs_embeds"] = emb
        return batch

    @contextlib.contextmanager
    def top_only(self) -> Iterator[None]:
        """Within this block the model runs only layers[first:], from `inputs_embeds`."""
        parent_name, _, child = self.name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, nn.ModuleList(list(self.layers)[self.first :]))
        try:
            yield
        finally:
            setattr(parent, child, self.layers)

    @torch.no_grad()
    def verify(self, feature: dict, pad_id: int) -> bool:
        """Whether the top-only pass from the cache reproduces the full model's logits."""
        self.encode([feature], pad_id)
        batch = self.collate([feature], pad_id)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            full = self.model(input_ids=batch["input_ids"].to(device), use_cache=False).logits
            with self.top_only():
                top = self.model(
                    inputs_embeds=batch["inputs_embeds"].to(device), use_cache=False
                ).logits
        finally:
            self.model.train(was_training)
        return torch.allclose(full, top, atol=1e-4, rtol=1e-4)
