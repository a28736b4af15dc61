"""One base model serving many adapters in one forward: `MultiAdapterModel`.

    mm = MultiAdapterModel(model)                  # the base model, shared by every adapter
    mm.add("math", "adapters/math")                # validated against the base, packed
    out = mm(input_ids, adapters=["math", None])   # row 0 with "math", row 1 the base alone

Adding an adapter replaces each Linear it targets (once, whichever adapter comes first) by a
`MultiAdapterLinear` sharing the original weight and bias, and files the adapter's packed
weights there under a fresh uid. Validation runs before anything changes and fails closed:
the config must parse, the method and activation must be known to serving, every target must
exist and every tensor must be present with the shape the base implies (each mismatch is
named), and no value may be NaN or infinite. `remove` drops the weights; `close` puts the
original Linear modules back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from nora.adapters import Packed
from nora.checkpoint import (
    CheckpointError,
    first_problems,
    read_config,
    read_weights,
    tensor_problems,
)
from nora.config import AdapterConfig, ConfigError
from nora.inject import InjectionError, plan
from nora.serving.layers import MultiAdapterLinear, ServingContext
from nora.serving.plan import BASE_UID, BatchPlan


@dataclass
class AdapterInfo:
    """A resident adapter."""

    name: str
    uid: int
    method: str
    r: int
    kind: Hashable
    config: AdapterConfig
    targets: list[str] = field(default_factory=list)
    nbytes: int = 0
    source: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "r": self.r,
            "activation": self.config.activation,
            "scale": self.config.effective_scale,
            "targets": len(self.targets),
            "bytes": self.nbytes,
        }


@dataclass
class PreparedAdapter:
    """An adapter read, validated and packed, not yet live (`MultiAdapterModel.install`)."""

    name: str
    config: AdapterConfig
    packed: dict[str, Packed]
    kind: Hashable
    source: str = ""


class UnknownAdapterError(KeyError):
    """The named adapter is not resident (or does not exist); `known` lists what is."""

    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(name)
        self.name, self.known = name, sorted(known)

    def __str__(self) -> str:
        return f"unknown adapter {self.name!r}; known: {', '.join(self.known) or '(none)'}"


class MultiAdapterModel(nn.Module):
    """A causal LM whose rows each run with their own adapter (or none)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.ctx = ServingContext()
        self.adapters: dict[str, AdapterInfo] = {}
        self.lock = threading.RLock()  # held for a forward and for every add/remove
        self._next_uid = BASE_UID + 1

    # ------------------------------------------------------------------ adapters

    def add(self, name: str, path: str | os.PathLike) -> AdapterInfo:
        """Load the adapter folder `path` (PEFT layout) under `name`; fails closed."""
        return self.install(self.prepare(name, path))

    def add_weights(
        self, name: str, cfg: AdapterConfig, tensors: dict[str, torch.Tensor], source: str = ""
    ) -> AdapterInfo:
        """Add an adapter from its config and tensors keyed '<module path>.<param>'."""
        return self.install(self.prepare_weights(name, cfg, tensors, source))

    def prepare(self, name: str, path: str | os.PathLike) -> PreparedAdapter:
        """Read, validate and pack the adapter folder `path` without taking the lock (the
        slow part of a load: the engine keeps decoding meanwhile); `install` makes it live."""
        try:
            cfg = read_config(path)
            tensors = read_weights(path)
        except CheckpointError as e:
            raise CheckpointError(f"adapter {name!r}: {e}") from None
        return self.prepare_weights(name, cfg, tensors, source=str(path))

    def prepare_weights(
        self, name: str, cfg: AdapterConfig, tensors: dict[str, torch.Tensor], source: str = ""
    ) -> PreparedAdapter:
        bad = f"adapter {name!r} is refused: "
        if cfg.placement != "weight":
            raise CheckpointError(
                bad + f"placement {cfg.placement!r} is not served (only weight-level adapters)"
            )
        try:
            wrappers = plan(self.model, cfg)
        except (InjectionError, ConfigError) as e:
            raise CheckpointError(bad + f"it does not fit the base model: {e}") from None
        problems = tensor_problems(wrappers, tensors)
        if not problems:
            problems += [
                f"{k}: has NaN or infinite values"
                for k, v in tensors.items()
                if not torch.isfinite(v).all()
            ]
        if problems:
            raise CheckpointError(bad + first_problems(problems))
        packed: dict[str, Packed] = {}
        with torch.no_grad():
            for n, w in wrappers:
                for k, p in w.adapter.state_dict().items():
                    p.copy_(tensors[f"{n}.{k}"])
                packed[n] = w.adapter.eval().pack()
        kinds = {lw.kind for lw in packed.values()}
        assert len(kinds) == 1, kinds  # one method and one activation per adapter
        return PreparedAdapter(name, cfg, packed, kinds.pop(), source)

    def install(self, p: PreparedAdapter) -> AdapterInfo:
        """Make a prepared adapter live (under the lock: between two forwards)."""
        with self.lock:
            if p.name in self.adapters:
                raise ValueError(f"adapter {p.name!r} is refused: an adapter of that name is "
                                 "already loaded")  # fmt: skip
            uid, self._next_uid = self._next_uid, self._next_uid + 1
            for n, lw in p.packed.items():
                self._wrap(n).adapters[uid] = lw
            info = AdapterInfo(
                p.name,
                uid,
                p.config.method,
                p.config.r,
                p.kind,
                p.config,
                targets=list(p.packed),
                nbytes=sum(lw.nbytes for lw in p.packed.values()),
                source=p.source,
            )
            self.adapters[p.name] = info
        return info

    def remove(self, name: str) -> None:
        with self.lock:
            info = self.adapters.pop(name, None)
            if info is None:
                raise UnknownAdapterError(name, self.adapters)
            for layer in self.layers().values():
                layer.drop(info.uid)

    def close(self) -> nn.Module:
        """Remove every adapter and put the original Linear modules back; returns the base."""
        with self.lock:
            self.adapters.clear()
            for n, layer in self.layers().items():
                _swap(self.model, n, layer.original)
        return self.model

    def layers(self) -> dict[str, MultiAdapterLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MultiAdapterLinear)}

    def _wrap(self, name: str) -> MultiAdapterLinear:
        module = self.model.get_submodule(name)
        if not isinstance(module, MultiAdapterLinear):
            module = MultiAdapterLinear(module, self.ctx)
            _swap(self.model, name, module)
        return module

    # ------------------------------------------------------------------ forward

    def uid(self, name: str | None) -> int:
        if name is None:
            return BASE_UID
        info = self.adapters.get(name)
        if info is None:
            raise UnknownAdapterError(name, self.adapters)
        return info.uid

    def plan(self, row_uids: Sequence[int], seq_len: int) -> BatchPlan | None:
        """The step's metadata for rows (B,) of `seq_len` tokens each; None if no adapter."""
        if all(u == BASE_UID for u in row_uids):
            return None
        device = next(self.model.parameters()).device
        tok = torch.tensor(list(row_uids), dtype=torch.long, device=device)
        tok = tok.repeat_interleave(seq_len)  # (B·T,)
        kinds = {i.uid: i.kind for i in self.adapters.values()}
        return BatchPlan.build(tok, kinds)

    def forward(
        self,
        input_ids: torch.Tensor,
        adapters: Sequence[str | None] | None = None,
        row_uids: Sequence[int] | None = None,
        **kwargs,
    ):
        """The base model's forward, row b with adapter `adapters[b]` (None: the base).

        `row_uids` may replace `adapters` (uids from `uid()`); other keyword arguments
        (attention_mask, position_ids, cache, logits_to_keep, …) go to the model.
        """
        B, T = input_ids.shape
        if row_uids is None:
            row_uids = [self.uid(a) for a in (adapters if adapters is not None else [None] * B)]
        if len(row_uids) != B:
            raise ValueError(f"{len(row_uids)} adapters given for a batch of {B} rows")
        with self.lock:
            self.ctx.plan = self.plan(row_uids, T)
            try:
                return self.model(input_ids=input_ids, **kwargs)
            finally:
                self.ctx.plan = None


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
