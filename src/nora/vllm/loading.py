"""Read a nora adapter folder into vLLM's LoRA model, or refuse it with the reason.

vLLM's own loader reads only LoRA fields and ignores `peft_type`: a NoRA folder would be
served as plain LoRA (silently wrong), or fail on its extra tensors with a parser error. So
every folder is routed here first:

- plain PEFT LoRA (peft_type LORA, no nora_format_version): vLLM's loader, then the same
  shape check against the base as below;
- NORA / NOLORA / AURORA: nora's checkpoint reader and the method's own `pack` (A; B with the
  scale folded in, after σ; σ's tensors p), handed to vLLM as a LoRA of scaling 1 plus `p`;
- anything else (LORAN, LORA_MODULE, an unknown peft_type, rank above max_lora_rank, module
  names or shapes that do not fit the base): a ValueError naming the problem. vLLM turns it
  into an API error for that request; the engine keeps serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from nora.adapters import METHODS
from nora.adapters.base import Packed
from nora.checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    first_problems,
    read_config,
    read_weights,
    tensor_problems,
)

PREFIX = "base_model.model."


class AdapterRefused(ValueError):
    """vLLM cannot serve this adapter folder; the message says why and what to do instead."""


def is_nora_folder(path: str | Path) -> bool:
    """True when the folder is not a plain PEFT LoRA (nora's reader must decide)."""
    try:
        d = json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False  # vLLM's loader reports missing or broken folders itself
    return isinstance(d, dict) and (
        "nora_format_version" in d or d.get("peft_type", "LORA") != "LORA"
    )


def pack_folder(path: str | Path, max_rank: int) -> tuple[int, dict[str, Packed]]:
    """(r, {module path: Packed}) of a nora NORA/NOLORA/AURORA folder; AdapterRefused else."""
    try:
        cfg = read_config(path)
    except CheckpointError as e:
        raise AdapterRefused(
            f"{path}: {e}; vLLM with nora serves LORA, NORA, NOLORA and AURORA"
        ) from None
    cls = METHODS[cfg.method]
    if not cls.shrinks:
        raise AdapterRefused(
            f"{path}: {cfg.method!r} is non-linear in weight space (a dense ΔW with no low-rank "
            "split), so vLLM cannot serve it unmerged. It merges exactly: `nora export "
            f"{path} <out> --model <base>` writes the merged model folder; serve that"
        )
    if cfg.placement != "weight":
        raise AdapterRefused(
            f"{path}: module-level adapters sit parallel to a whole attention/MLP block, and "
            "vLLM's LoRA hooks are per linear layer; serve it with `nora serve`"
        )
    if cfg.r > max_rank:
        raise AdapterRefused(
            f"{path}: rank {cfg.r} is greater than max_lora_rank {max_rank}; "
            f"restart vLLM with --max-lora-rank {cfg.r} or more"
        )
    try:
        tensors = read_weights(path)
    except CheckpointError as e:
        raise AdapterRefused(str(e)) from None
    names = sorted(
        k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")
    )
    if not names:
        raise AdapterRefused(f"{path}: no lora_A tensors in the weights file")
    packs, problems = {}, []
    for name in names:
        B = tensors.get(f"{name}.lora_B.weight")
        if B is None:
            problems.append(f"missing tensor {name}.lora_B.weight")
            continue
        adapter = cls(tensors[f"{name}.lora_A.weight"].shape[1], B.shape[0], cfg)
        own = {k: v for k, v in tensors.items() if k.startswith(name + ".")}
        found = tensor_problems([(name, SimpleNamespace(adapter=adapter))], own)
        if found:
            problems += found
            continue
        adapter.load_state_dict({k.removeprefix(name + "."): v for k, v in own.items()})
        packs[name] = adapter.eval().pack()
    problems += [
        f"unexpected tensor {k}" for k in tensors if not any(k.startswith(n + ".") for n in names)
    ]
    if problems:
        raise AdapterRefused(f"{path}: " + first_problems(problems))
    return cfg.r, packs


def base_shapes(manager) -> dict[str, tuple[int, int]]:
    """{module path: (in, out) of the full, unsharded base linear} for vLLM's LoRA layers."""
    shapes = {}
    for name, layer in manager.modules.items():
        base = getattr(layer, "base_layer", None)
        if base is None or not hasattr(base, "input_size"):
            continue
        subs = manager.packed_modules.get(name, [name])
        outs = getattr(base, "output_sizes", None) or [base.output_size]
        if len(outs) != len(subs):
            continue
        for sub, d in zip(subs, outs, strict=True):
            shapes[sub] = (base.input_size, d)
    return shapes


def check_fit(path, shapes: dict, got: dict, strict: bool = True) -> None:
    """Refuse modules whose (in, out) differ from the base's, and (strict) modules the base has
    no LoRA linear for; `got`: {module path: (in, out)}."""
    problems = []
    for name, (k, d) in sorted(got.items()):
        if name not in shapes:
            if strict:  # plain LoRA: vLLM's own rules for other layers (embeddings, …)
                problems.append(f"{name} is not a LoRA-capable linear layer of this model")
        elif shapes[name] != (k, d):
            problems.append(
                f"{name}: the base layer is {shapes[name][0]}->{shapes[name][1]}, "
                f"the adapter is {k}->{d}"
            )
    if problems:
        raise AdapterRefused(f"{path} does not fit this base model: " + first_problems(problems))


def hooks() -> list:
    """The vLLM method `install` replaces, as `nora.vllm.check` verifies it first."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    from nora.vllm import Hook

    return [Hook(WorkerLoRAManager, "_load_adapter", ("self", "lora_request"))]


def install() -> None:
    """Route every adapter folder vLLM loads through `_load_adapter` below (idempotent)."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    if getattr(WorkerLoRAManager, "_nora_installed", False):
        return
    WorkerLoRAManager._load_adapter = _wrap_load(WorkerLoRAManager._load_adapter)
    WorkerLoRAManager._nora_installed = True


def _wrap_load(load):
    def _load_adapter(self, lora_request):
        from vllm.lora.utils import get_adapter_absolute_path

        path = get_adapter_absolute_path(lora_request.lora_path)
        manager = self._adapter_manager
        if not is_nora_folder(path):
            lora = load(self, lora_request)
            got = {
                n: (w.lora_a.shape[1], w.lora_b.shape[0])
                for n, w in lora.loras.items()
                if not w.is_packed and w.lora_a is not None
            }
            check_fit(path, base_shapes(manager), got, strict=False)
            return lora
        return _load_nora(self, lora_request, path)

    return _load_adapter


def _load_nora(self, lora_request, path: str):
    from vllm import envs
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    from nora.vllm.layers import admit

    lc = self.lora_config
    if lc.fully_sharded_loras:
        raise AdapterRefused(
            f"{path}: nora's non-linear adapters need the whole latent on every rank; "
            "start vLLM without --fully-sharded-loras"
        )
    if envs.VLLM_LORA_ENABLE_DUAL_STREAM:
        raise AdapterRefused(f"{path}: unset VLLM_LORA_ENABLE_DUAL_STREAM to serve nora adapters")
    r, packs = pack_folder(path, lc.max_lora_rank)
    admit(packs.values())  # σ state for a new kind in every layer, or refused after capture
    manager = self._adapter_manager
    model = manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    tensors, sigma = {}, {}
    for name, pk in packs.items():
        a_key, b_key = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        tensors[a_key] = pk.A.t().contiguous()  # (r, k): vLLM's lora_a layout
        tensors[b_key] = pk.B.t().contiguous()  # (d, r), scale folded in
        sigma[parse_fine_tuned_lora_name(a_key, mapper)[0]] = pk
    check_fit(
        path, base_shapes(manager), {n: (pk.A.shape[0], pk.B.shape[1]) for n, pk in sigma.items()}
    )
    # scaling = lora_alpha / r = 1: the scale already sits in B, after σ
    helper = PEFTHelper.from_dict(
        {
            "r": r,
            "lora_alpha": r,
            "target_modules": sorted(packs),
            "vllm_max_position_embeddings": self.max_position_embeddings,
        }
    )
    helper.validate_legal(lc)
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=lora_request.lora_int_id,
        tensors=tensors,
        peft_helper=helper,
        device="cpu",
        dtype=lc.lora_dtype,
        model_vocab_size=self.vocab_size,
        weights_mapper=mapper,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    lora.nora = sigma  # read by the patched activate_adapter (nora.vllm.layers)
    return lora
