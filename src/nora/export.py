"""Export an adapter for tools that know nothing about nora.

    merge_to_folder("runs/x/adapter", "out/merged", model, tok)   # lora, loran -> plain HF model folder
    lora_to_gguf("runs/x/adapter", "out/adapter.gguf", model.config)  # lora -> llama.cpp LoRA adapter

Only a fixed ΔW can be folded into W0: LoRA's s·B·A and LoRAN's s·Sinter(B·A). NoRA, NoLoRA,
AuroRA and module-level adapters change the function in an input-dependent way, so there is
nothing to merge; they are served unmerged (`nora serve`, or vLLM with nora's plug-in).
The GGUF file follows llama.cpp's convert_lora_to_gguf.py: general.type "adapter",
adapter.type "lora", adapter.lora.alpha, one `<base tensor>.lora_a` (r, k) and `.lora_b` (d, r)
pair per adapted weight, named as llama.cpp names the base tensors (blk.N.attn_q.weight ...).
Every file is written to a temporary path and renamed into place, so a failed export leaves no partial output file (merge_to_folder merges into the model it is given).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nora.adapters import METHODS
from nora.checkpoint import CheckpointError, load_adapter, read_config, read_weights
from nora.config import AdapterConfig
from nora.inject import merge, unload

# transformers model_type -> (llama.cpp arch, whether llama.cpp permutes q/k rows for its RoPE),
# as convert_hf_to_gguf.py maps them (Mistral converts as llama)
GGUF_ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


class ExportError(ValueError):
    """The adapter cannot be exported that way; the message says why and what to do instead."""


def _unmerged_hint(cfg: AdapterConfig) -> str:
    where = "a module-level adapter" if cfg.placement == "module" else f"method {cfg.method!r}"
    return (
        f"{where} is non-linear: its update depends on the input, so it has no weight to merge "
        "or to write as a LoRA; serve it unmerged with `nora serve` (or vLLM with nora's plug-in)"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_mergeable(cfg: AdapterConfig) -> None:
    """Raise ExportError unless the adapter folds exactly into the base weights."""
    if cfg.placement != "weight" or not METHODS[cfg.method].mergeable:
        raise ExportError(_unmerged_hint(cfg))


def merge_to_folder(
    adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, model: nn.Module, tokenizer=None
) -> Path:
    """Load the adapter into `model` (a fresh base), merge it, save a plain HF model folder.

    `model` is changed in place (merged weights, no adapter left). `out_dir` must not exist
    or be empty. The folder loads with AutoModelForCausalLM.from_pretrained, and
    llama.cpp's convert_hf_to_gguf.py turns it into a full GGUF model.
    """
    cfg = read_config(adapter_dir)
    check_mergeable(cfg)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder; choose a new path")
    load_adapter(model, adapter_dir)
    merge(model)
    unload(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a model folder is not
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():  # some writers (safetensors) create private files too
            os.chmod(f, 0o666 & ~_umask())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for RoPE (convert_hf_to_gguf.py LlamaModel.permute): (d, ...) -> (d, ...).

    Per head, HF's [first half | second half] rotary layout becomes interleaved pairs. Only
    rows move, so for a LoRA pair it applies to B: permute(B·A) = permute(B)·A.
    """
    d = w.shape[0]
    return w.reshape(n_head, 2, d // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def lora_to_gguf(adapter_dir: str | os.PathLike, out_file: str | os.PathLike, base_config) -> Path:
    """Write a weight-level LoRA adapter as a llama.cpp GGUF LoRA file (float32 tensors).

    `base_config` is the base model's transformers config (model_type, head counts).
    llama.cpp applies it as `llama-cli -m base.gguf --lora out.gguf` (scale alpha/r).
    """
    import gguf

    cfg = read_config(adapter_dir)
    if not METHODS[cfg.method].linear or cfg.placement != "weight":
        if METHODS[cfg.method].mergeable and cfg.placement == "weight":
            raise ExportError(
                f"method {cfg.method!r} has a full-rank ΔW, not a LoRA pair: export a merged model "
                "folder instead (nora export ADAPTER OUT) and convert that with convert_hf_to_gguf.py"
            )
        raise ExportError(_unmerged_hint(cfg))
    model_type = getattr(base_config, "model_type", None)
    if model_type not in GGUF_ARCHES:
        raise ExportError(
            f"GGUF LoRA export supports model types {sorted(GGUF_ARCHES)}; the base model is "
            f"{model_type!r}"
        )
    name, permutes = GGUF_ARCHES[model_type]
    n_head = base_config.num_attention_heads
    n_kv = getattr(base_config, "num_key_value_heads", None) or n_head
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)
    names = gguf.get_tensor_name_map(arch_id, base_config.num_hidden_layers)

    tensors = read_weights(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, param = key.rpartition(".lora_")
        pairs.setdefault(module, {})[param] = t.float()
    out_tensors = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A.weight", "B.weight"}:
            raise CheckpointError(
                f"{module}: expected lora_A.weight and lora_B.weight, got {sorted(ab)}"
            )
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise ExportError(f"llama.cpp has no tensor for {module} in a {name} model")
        A, B = ab["A.weight"], ab["B.weight"]  # (r, k), (d, r)
        if permutes and module.endswith("q_proj"):
            B = permute_rows(B, n_head)
        elif permutes and module.endswith("k_proj"):
            B = permute_rows(B, n_kv)
        out_tensors += [(f"{gname}.lora_a", A), (f"{gname}.lora_b", B)]

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
    try:
        w = gguf.GGUFWriter(tmp, name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by alpha / r with r read off the tensors: write the alpha that gives
        # nora's effective scale (also right for rsLoRA and a fixed `scale`)
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, cfg.effective_scale * cfg.r)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        for tname, t in out_tensors:
            w.add_tensor(tname, np.ascontiguousarray(t.numpy(), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def export(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    model: str = "smollm2-135m",
    gguf: bool = False,
) -> Path:
    """`nora export`: a merged HF model folder, or (gguf=True) a llama.cpp LoRA file.

    `model` is the base: the built-in default, a local folder or a hub id. The adapter is
    checked before the base model is loaded, so an unexportable method fails fast.
    """
    from nora.models import load_base_model

    cfg = read_config(adapter_dir)
    if gguf:
        if not METHODS[cfg.method].linear or cfg.placement != "weight":
            return lora_to_gguf(adapter_dir, out, None)  # raises the method's ExportError
        base, _ = load_base_model(model, dtype="float32", device="cpu")
        return lora_to_gguf(adapter_dir, out, base.config)
    try:
        check_mergeable(cfg)
    except ExportError as e:
        raise ExportError(f"{e}; only lora and loran merge into a model folder") from None
    base, tok = load_base_model(model, dtype="float32", device="cpu")
    return merge_to_folder(adapter_dir, out, base, tok)


__all__ = [
    "GGUF_ARCHES",
    "ExportError",
    "check_mergeable",
    "export",
    "lora_to_gguf",
    "merge_to_folder",
    "permute_rows",
]
