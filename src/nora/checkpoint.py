"""Save and load adapters in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

A weight-level `lora` adapter is written as a plain PEFT LoRA checkpoint (PEFT loads it, and
nora loads PEFT's). Every other adapter gets its method's own `peft_type` (NORA, NOLORA,
AURORA, LORAN; module-level LoRA: LORA_MODULE) plus `nora_format_version`, so PEFT never
mistakes it for LoRA. Tensor keys follow PEFT: `base_model.model.<module path>.<param>`.
Never pickle. Writes go to temporary files renamed into place, so a failed save leaves no
half-written checkpoint; a failed load leaves the model unchanged.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nora.adapters import METHODS
from nora.config import FORMAT_VERSION, AdapterConfig, ConfigError
from nora.inject import adapter_state_dict, apply, get_config, plan

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT LoraConfig fields nora reproduces, and the value each unsupported feature must have.
_PEFT_MAPPED = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "base_model_name_or_path",
}
_PEFT_IGNORED = {
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "ensure_weight_tying",
}  # bookkeeping or init-only: the saved weights decide
_PEFT_REQUIRED = {
    "fan_in_fan_out": False,
    "bias": "none",
    "use_dora": False,
    "use_qalora": False,
    "lora_bias": False,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says exactly why."""


def nora_peft_types() -> list[str]:
    """The peft_type names nora writes for everything but plain weight-level LoRA."""
    return sorted({m.peft_type for m in METHODS.values()} - {"LORA"} | {"LORA_MODULE"})


def peft_type(cfg: AdapterConfig) -> str:
    """The method's own `peft_type`; a plain PEFT LoRA file holds weight-level LoRA only."""
    ptype = METHODS[cfg.method].peft_type
    return "LORA_MODULE" if ptype == "LORA" and cfg.placement != "weight" else ptype


def config_to_dict(cfg: AdapterConfig) -> dict[str, Any]:
    if peft_type(cfg) == "LORA":  # plain PEFT LoraConfig: no foreign keys, PEFT warns on those
        r = cfg.r
        alpha = cfg.alpha if cfg.scale is None else cfg.scale * (math.sqrt(r) if cfg.rslora else r)
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": cfg.base_model_name_or_path,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.rslora,
            "target_modules": cfg.target_modules,
            "exclude_modules": cfg.exclude_modules,
            "layers_to_transform": cfg.layers_to_transform,
            "layers_pattern": cfg.layers_pattern,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "inference_mode": True,
        }
    return {"peft_type": peft_type(cfg), "nora_format_version": FORMAT_VERSION, **cfg.to_dict()}


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """An AdapterConfig from a nora or PEFT-LoRA adapter_config.json dict; strict."""
    d = dict(d)
    ptype = d.pop("peft_type", None)
    try:
        if "nora_format_version" in d:
            version = d.pop("nora_format_version")
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise CheckpointError(
                    f"checkpoint format version {version!r} is newer than this nora understands "
                    f"({FORMAT_VERSION}); upgrade nora-adapters to load it"
                )
            cfg = AdapterConfig.from_dict(d)
            if ptype != peft_type(cfg):
                raise CheckpointError(f"peft_type {ptype!r} does not match method {cfg.method!r}")
            return cfg
        if ptype != "LORA":
            raise CheckpointError(
                f"unsupported peft_type {ptype!r}: nora loads PEFT LoRA and its own "
                f"{'/'.join(nora_peft_types())} "
                "checkpoints"
            )
        return _from_peft_lora(d)
    except ConfigError as e:
        raise CheckpointError(f"invalid adapter config: {e}") from None


def _from_peft_lora(d: dict[str, Any]) -> AdapterConfig:
    problems = [
        f"{k}={d[k]!r} (nora supports {v!r})"
        for k, v in _PEFT_REQUIRED.items()
        if k in d and d[k] != v
    ]
    problems += [
        f"{k}={v!r}"
        for k, v in d.items()
        if k not in _PEFT_MAPPED | _PEFT_IGNORED | set(_PEFT_REQUIRED) and v
    ]
    if problems:
        raise CheckpointError(
            "this PEFT LoRA uses features nora does not support: " + ", ".join(problems)
        )
    target = d.get("target_modules")
    if target is None:
        raise CheckpointError("PEFT config has no target_modules")
    ltt = d.get("layers_to_transform")
    pattern = d.get("layers_pattern")
    return AdapterConfig(
        method="lora",
        r=d.get("r", 8),
        alpha=d.get("lora_alpha", 8),
        dropout=d.get("lora_dropout", 0.0),
        rslora=bool(d.get("use_rslora", False)),
        target_modules=target if isinstance(target, str) else sorted(target),
        exclude_modules=d.get("exclude_modules") or None,
        layers_to_transform=[ltt] if isinstance(ltt, int) else ltt,
        layers_pattern="|".join(pattern) if isinstance(pattern, list) else pattern,
        base_model_name_or_path=d.get("base_model_name_or_path"),
    )


def write_json(path: str | Path, data: Any, indent: int = 1, **dumps_kw) -> None:
    """`data` as JSON (plus a newline) at `path`, atomically (`atomic_write`)."""
    text = json.dumps(data, indent=indent, **dumps_kw) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to a unique temporary file beside `path`, then rename it over `path`: a
    reader never sees half a file, a failed write leaves the old one, concurrent writers
    never share a temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    card: bool = True,
    training: Any = None,
    license: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the model's adapter to `out_dir` (created if needed); returns the folder.

    With `card` (the default) a model card goes beside it, README.md (`nora.modelcard`;
    `training` a `modelcard.TrainingInfo`, `license`/`base_model` for its header), unless the
    folder holds a README.md nora did not write: that one is kept as it is.
    """
    cfg = get_config(model)
    if cfg.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        cfg = AdapterConfig.from_dict({**cfg.to_dict(), "base_model_name_or_path": name or None})
    tensors = {}
    for k, v in adapter_state_dict(model).items():
        if v.device.type == "meta":
            raise CheckpointError(
                "the adapter lives on the meta device: there are no weights to save"
            )
        tensors[PREFIX + k] = v.detach().to("cpu").contiguous()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config_to_dict(cfg), indent=2) + "\n"
    readme = None
    if card:  # rendered before any write: a card that fails to render leaves the folder as it was
        from nora import modelcard

        n = sum(v.numel() for v in tensors.values())
        readme = modelcard.card_text(out, cfg, training, n, license, base_model)
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(text))
    if readme is not None:
        modelcard.write_text(out, readme)
    return out


def read_config(path: str | os.PathLike) -> AdapterConfig:
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        raise CheckpointError(f"{f} not found: not an adapter folder")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f} must hold a JSON object")
    return config_from_dict(d)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors keyed by module path (PEFT's 'base_model.model.' prefix removed)."""
    f = Path(path) / WEIGHTS_NAME
    if not f.is_file():
        if (Path(path) / "adapter_model.bin").exists():
            raise CheckpointError(
                f"{path} holds a pickle (adapter_model.bin); nora only loads "
                "safetensors — re-save it with safe_serialization=True"
            )
        raise CheckpointError(f"{f} not found")
    try:
        raw = load_file(f)
    except Exception as e:  # safetensors raises its own error types for bad headers/sizes
        raise CheckpointError(f"{f} is truncated or corrupted: {e}") from None
    return {k.removeprefix(PREFIX): v for k, v in raw.items()}


def first_problems(problems: list[str], n: int = 8) -> str:
    """The first `n` problems, joined, and how many more there are (errors stay readable)."""
    more = f" (and {len(problems) - n} more)" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more


def tensor_problems(wrappers: list, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every way `tensors` fails to fit the planned (name, wrapper) pairs, one line each."""
    expected = {f"{n}.{k}": v for n, w in wrappers for k, v in w.adapter.state_dict().items()}
    problems = [f"missing tensor {k}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    problems += [
        f"{k}: model expects shape {tuple(expected[k].shape)}, file has {tuple(v.shape)}"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems += [
        f"{k}: dtype {v.dtype} is not floating point"
        for k, v in tensors.items()
        if not v.dtype.is_floating_point
    ]
    return problems


def load_adapter(
    model: nn.Module, path: str | os.PathLike, is_trainable: bool = False
) -> nn.Module:
    """Inject the adapter saved in `path` (nora or PEFT LoRA) into `model` and load its weights.

    Checks every module name, tensor name and shape first and names each mismatch; on any
    error the model is left unchanged. With is_trainable=False (PEFT's default) the adapter
    parameters are frozen too.
    """
    cfg = read_config(path)
    tensors = read_weights(path)
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if cfg.base_model_name_or_path and name and name != cfg.base_model_name_or_path:
        warnings.warn(
            f"adapter was saved for {cfg.base_model_name_or_path!r}, loading into {name!r}",
            stacklevel=2,
        )
    try:
        wrappers = plan(model, cfg)
    except ValueError as e:
        raise CheckpointError(f"adapter in {path} does not fit this model: {e}") from None
    problems = tensor_problems(wrappers, tensors)
    if problems:
        raise CheckpointError(
            f"adapter in {path} does not fit this model: " + first_problems(problems)
        )
    with torch.no_grad():
        for n, w in wrappers:
            for k, p in w.adapter.state_dict().items():
                p.copy_(tensors[f"{n}.{k}"])  # casts to the adapter's dtype/device
    apply(model, cfg, wrappers)
    if not is_trainable:
        for _, w in wrappers:
            w.adapter.requires_grad_(False)
    return model
