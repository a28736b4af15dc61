"""nora: non-linear low-rank adaptation (NoRA, NoLoRA, AuroRA, LoRAN, and LoRA) for
Hugging Face causal language models.

    import nora
    cfg = nora.AdapterConfig(method="nora", r=64, target_modules=["q_proj", "v_proj"])
    model = nora.inject(model, cfg)          # wraps in place, freezes the base
    nora.save_adapter(model, "out/")         # adapter_config.json + adapter_model.safetensors
    nora.load_adapter(base_model, "out/")    # nora or PEFT LoRA folders
    nora.merge(model); nora.unload(model)
"""

import logging

from nora.adapters import METHODS, NotMergeableError
from nora.checkpoint import CheckpointError, load_adapter, read_config, save_adapter
from nora.config import AdapterConfig, ConfigError
from nora.fused import set_fused
from nora.inject import (
    InjectionError,
    ParamCount,
    adapter_modules,
    adapter_state_dict,
    count_parameters,
    disable_adapters,
    fuse_shared_inputs,
    get_config,
    has_adapters,
    inject,
    merge,
    parameter_table,
    set_adapters_enabled,
    unfuse_shared_inputs,
    unload,
)

# bitsandbytes' CPU backend (imported by peft, later, when installed) logs a warning on
# AVX-512-bf16 machines when the optional `kernels` package, which fetches kernels from the hub
# at run time, is missing; nora never uses it, so keep it quiet for every entry point.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdapterConfig",
    "CheckpointError",
    "ConfigError",
    "InjectionError",
    "NotMergeableError",
    "ParamCount",
    "adapter_modules",
    "adapter_state_dict",
    "count_parameters",
    "disable_adapters",
    "fuse_shared_inputs",
    "get_config",
    "has_adapters",
    "inject",
    "load_adapter",
    "merge",
    "parameter_table",
    "read_config",
    "save_adapter",
    "set_adapters_enabled",
    "set_fused",
    "unfuse_shared_inputs",
    "unload",
]
