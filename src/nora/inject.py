"""Put adapters into a model and take them out again: inject, merge, disable, unload.

Models are wrapped in place, never rewritten: each targeted module is replaced by a wrapper
holding the original module object, so `unload` restores it exactly. Every check runs and
every adapter is built before the first module is swapped, so a failed `inject` leaves the
model as it was.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nora.adapters import (
    METHODS,
    AdapterLinear,
    AdapterWrapper,
    NotMergeableError,
    ParallelAdapter,
)
from nora.config import AdapterConfig
from nora.fused import SharedInputGroup
from nora.quantize import is_quantized

DEFAULT_LAYERS_PATTERN = "layers|h|blocks|block|layer"


class InjectionError(ValueError):
    """The model and the config do not fit together; the message says what and where."""


@dataclass
class _State:
    config: AdapterConfig
    requires_grad: dict[str, bool]  # the base parameters' flags before freezing


def _state(model: nn.Module) -> _State:
    state = getattr(model, "_nora_state", None)
    if state is None:
        raise InjectionError("this model has no nora adapter (call nora.inject or load_adapter)")
    return state


def has_adapters(model: nn.Module) -> bool:
    """Whether `nora.inject` / `load_adapter` put adapters on this model (and `unload` has not
    taken them off)."""
    return getattr(model, "_nora_state", None) is not None


def adapter_modules(model: nn.Module) -> dict[str, AdapterWrapper]:
    """Module path -> wrapper, for every adapter in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterWrapper)}


def get_config(model: nn.Module) -> AdapterConfig:
    return _state(model).config


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, pattern: str | None) -> int | None:
    m = re.search(rf"(?:^|\.)(?:{pattern or DEFAULT_LAYERS_PATTERN})\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _linear_names(model: nn.Module) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    )


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `cfg` selects, checked; raises InjectionError otherwise."""
    found = []
    layer_ids: set[int] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        idx = _layer_index(name, cfg.layers_pattern)
        if idx is not None:
            layer_ids.add(idx)
        if not _matches(name, cfg.target_modules):
            continue
        if cfg.exclude_modules is not None and _matches(name, cfg.exclude_modules):
            continue
        if cfg.layers_to_transform is not None and idx not in cfg.layers_to_transform:
            continue
        found.append((name, module))
    if cfg.layers_to_transform is not None:
        missing = sorted(set(cfg.layers_to_transform) - layer_ids)
        if missing:
            raise InjectionError(
                f"layers_to_transform names layers {missing} that the model does not have; "
                f"its layer indices are {min(layer_ids, default=None)}..{max(layer_ids, default=None)}"
            )
    if not found:
        raise InjectionError(
            f"target_modules {cfg.target_modules!r} matched no module"
            + (
                f" (with layers_to_transform={cfg.layers_to_transform})"
                if cfg.layers_to_transform
                else ""
            )
            + f"; the model's Linear modules are named: {', '.join(_linear_names(model))}"
        )
    for name, module in found:
        kind = type(module).__name__
        if cfg.placement == "weight":
            if kind == "Conv1D":
                raise InjectionError(
                    f"{name} is a GPT-2 style Conv1D (weight stored transposed), which nora does "
                    "not adapt; target a model with nn.Linear projections"
                )
            if not isinstance(module, nn.Linear):
                raise InjectionError(
                    f"{name} is a {kind}, not an nn.Linear: weight-level placement adapts Linear "
                    "layers (use placement='module' to put an adapter parallel to a whole block)"
                )
        elif isinstance(module, nn.Linear):
            raise InjectionError(
                f"{name} is a single Linear: module-level placement wraps whole blocks such as "
                "self_attn or mlp (use placement='weight' for projections)"
            )
    names = [n for n, _ in found]
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise InjectionError(f"targets must not nest: {nested[0][1]} lies inside {nested[0][0]}")
    return found


def _build_wrapper(
    model: nn.Module, name: str, module: nn.Module, cfg: AdapterConfig
) -> AdapterWrapper:
    cls = METHODS[cfg.method]
    if cfg.placement == "weight":
        k, d = module.in_features, module.out_features
        ref = module.weight
    else:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is None:
            raise InjectionError("module-level placement needs model.get_input_embeddings()")
        k = d = emb.embedding_dim  # a block maps hidden states to hidden states
        ref = next(module.parameters(), emb.weight)
    if cfg.r > min(d, k):
        msg = f"r={cfg.r} exceeds min(out, in) = min({d}, {k}) of {name}"
        if cls.linear:
            raise InjectionError(msg + f": a {cfg.method} update cannot have a rank above that")
        warnings.warn(
            msg + "; the extra latent width only helps through the non-linearity", stacklevel=4
        )  # -> the caller of inject()/load_adapter()
    dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
    adapter = cls(k, d, cfg, device=ref.device, dtype=dtype)
    adapter.reset_parameters(cfg.init_weights)
    wrapper_cls = AdapterLinear if cfg.placement == "weight" else ParallelAdapter
    return wrapper_cls(module, adapter).train(module.training)  # follow the model's mode


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def plan(model: nn.Module, config: AdapterConfig) -> list[tuple[str, AdapterWrapper]]:
    """Check `config` against `model` and build (name, wrapper) pairs, touching nothing."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a nora.AdapterConfig, got {type(config).__name__}")
    if has_adapters(model) or adapter_modules(model):
        raise InjectionError("this model already has nora adapters; call nora.unload(model) first")
    wrappers = []
    for name, module in find_targets(model, config):
        wrappers.append((name, _build_wrapper(model, name, module, config)))
    return wrappers


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the modules `config` targets in place, freeze everything else, return the model."""
    return apply(model, config, plan(model, config))


def apply(
    model: nn.Module, config: AdapterConfig, wrappers: list[tuple[str, AdapterWrapper]]
) -> nn.Module:
    """Swap planned wrappers in and freeze the base; cannot fail for a user mistake."""
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, wrapper in wrappers:
        _swap(model, name, wrapper)
        wrapper.adapter.requires_grad_(True)
    model._nora_state = _State(config, requires_grad)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put the original modules back (merged weights stay merged) and restore requires_grad."""
    state = _state(model)
    for name, wrapper in adapter_modules(model).items():
        _swap(model, name, wrapper.base_layer)
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
    del model._nora_state
    return model


def merge(model: nn.Module, approximate_merge: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (exact for `lora` and `loran`).

    `approximate_merge=True` also allows AuroRA's approximate merge (ΔW = s·B·σ(A), the
    paper's deployment shortcut, which is *not* the trained function). Non-mergeable methods
    raise NotMergeableError before any weight changes. Adapters stay in place, inactive:
    `unload` afterwards leaves a plain model with merged weights.
    """
    wrappers = adapter_modules(model)
    _state(model)
    for name, w in wrappers.items():  # check all before changing any
        if w.merged:
            raise NotMergeableError(f"{name} is already merged")
        if is_quantized(w.base_layer):
            raise NotMergeableError(
                f"{name} wraps a quantized {type(w.base_layer).__name__} (bitsandbytes): "
                "merging needs a dense weight; load the adapter over the full-precision base "
                "and merge there"
            )
        try:
            w.check_mergeable(approximate_merge)
        except NotMergeableError as e:
            raise NotMergeableError(f"{name}: {e}") from None
    with torch.no_grad():
        for w in wrappers.values():
            w.merge(approximate_merge)
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for name, w in adapter_modules(model).items():
        if w.merged:
            raise NotMergeableError(f"{name} is merged into its base weight; it cannot be disabled")
        w.disabled = not enabled


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with nora.disable_adapters(model):` runs the base model; adapters return afterwards."""
    before = {n: w.disabled for n, w in adapter_modules(model).items()}
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        for n, w in adapter_modules(model).items():
            w.disabled = before.get(n, False)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """'<module path>.<adapter param>' -> tensor, e.g. 'model.layers.0.self_attn.q_proj.lora_A.weight'."""
    return {
        f"{name}.{k}": v
        for name, w in adapter_modules(model).items()
        for k, v in w.adapter.state_dict().items()
    }


@dataclass
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts (works on the meta device)."""
    params = list(model.parameters())
    return ParamCount(
        sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    )


def parameter_table(model: nn.Module) -> str:
    """A plain-text table: adapted module kinds, how many of each, adapter params per kind."""
    rows: dict[str, list[int]] = {}
    for name, w in adapter_modules(model).items():
        row = rows.setdefault(name.rsplit(".", 1)[-1], [0, 0])
        row[0] += 1
        row[1] += sum(p.numel() for p in w.adapter.parameters())
    cfg = get_config(model)
    lines = [
        f"method={cfg.method} r={cfg.r} scale={cfg.effective_scale:g} placement={cfg.placement}",
        f"{'module':<16}{'count':>7}{'adapter params':>16}",
    ]
    lines += [f"{k:<16}{c:>7}{n:>16,}" for k, (c, n) in sorted(rows.items())]
    lines.append(str(count_parameters(model)))
    return "\n".join(lines)


# --- one shrink GEMM for siblings that read the same input (nora.fused.SharedInputGroup) ---


DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2, …: attention reads one input
    ("gate_proj", "up_proj"),  # gated MLPs
)


def fuse_shared_inputs(model: nn.Module, groups: Sequence[Sequence[str]] = DEFAULT_GROUPS) -> int:
    """Give sibling adapted layers named in one of `groups` a shared shrink; returns #groups.

    Only weight-level adapters with a shrink (every method but loran) take part, and only
    siblings with the same input width and parameter dtype/device. Calling it again
    rebuilds the groups; `unfuse_shared_inputs` removes them.
    """
    unfuse_shared_inputs(model)
    n = 0
    for parent in model.modules():
        kids = {name: m for name, m in parent.named_children() if isinstance(m, AdapterLinear)}
        for names in groups:
            members = [kids[nm].adapter for nm in names if nm in kids]
            members = [a for a in members if a.shrinks]
            if len(members) < 2:
                continue
            w0 = members[0].lora_A.weight
            if any(
                a.in_features != members[0].in_features
                or a.lora_A.weight.dtype != w0.dtype
                or a.lora_A.weight.device != w0.device
                for a in members
            ):
                continue
            group = SharedInputGroup(members)
            for a in members:
                a.shared = group
            n += 1
    return n


def unfuse_shared_inputs(model: nn.Module) -> None:
    """Every adapter back to its own shrink."""
    for m in model.modules():
        if getattr(m, "shared", None) is not None and hasattr(m, "lora_A"):
            m.shared = None
