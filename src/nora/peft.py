"""The PEFT bridge: after `import nora.peft`, stock PEFT creates, trains, saves and loads nora's methods.

    import nora.peft
    from peft import PeftModel, get_peft_model
    model = get_peft_model(base, nora.peft.NoraConfig(method="nora", r=16))
    model.save_pretrained("out/")                    # nora's checkpoint format: nora.load_adapter reads it
    model = PeftModel.from_pretrained(base, "out/")  # folders written by PEFT or by nora.save_adapter
    with model.disable_adapter(): ...                # the base model
    model.merge_and_unload()                         # loran; NotMergeableError for the non-linear ones

How: nora's checkpoints already carry their own `peft_type` (NORA, NOLORA, AURORA, LORAN, LORA_MODULE).
This module adds those names as keys of PEFT's three method tables (config class, tuner class,
prefix) -- what `peft.utils.register_peft_method` does, minus its check that the name is a
member of the closed `PeftType` enum. The tuner places adapters with nora's own `plan`/`apply`
(so σ, init, dropout and the fused paths are nora's, not a copy), and the tuner-class hooks PEFT
delegates save/load to (`_remove_adapter_name_from_key`) map PEFT's state-dict keys onto nora's
checkpoint keys. Why this route and not LoRA variants or `_register_custom_module`:
docs/peft-bridge.md. Plain weight-level LoRA is PEFT's own `LoraConfig` (same folders both ways).
Tested with peft 0.21.2; needs the tuner save/load hooks that PEFT 0.21 introduced.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import peft
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from torch import nn

from nora import checkpoint, modelcard
from nora.adapters import AdapterLinear, AdapterWrapper, NotMergeableError, ParallelAdapter
from nora.config import FORMAT_VERSION, AdapterConfig, ConfigError
from nora.inject import adapter_modules, apply, plan, set_adapters_enabled
from nora.inject import merge as merge_adapters
from nora.inject import unload as unload_adapters

TESTED_PEFT = "0.21.2"
if not hasattr(BaseTuner, "_remove_adapter_name_from_key"):
    raise ImportError(
        f"nora.peft needs peft>=0.21 (tested with {TESTED_PEFT}); found peft {peft.__version__}: "
        "pip install 'peft>=0.21,<0.22'"
    )


# ----------------------------------------------------------------------------- the config


class NoraPeftType(str):
    """A peft_type name outside PEFT's enum; `.value` as on a PeftType member (PEFT reads it)."""

    @property
    def value(self) -> str:
        return str(self)


class _NoraConfigBase(PeftConfig):
    """Methods of `NoraConfig`; its fields are AdapterConfig's, added below."""

    def __post_init__(self) -> None:
        super().__post_init__()  # PEFT's own checks (task_type) and peft_version
        cfg = self.to_nora()  # every nora check, with nora's messages (ConfigError)
        ptype = checkpoint.peft_type(cfg)
        if ptype == "LORA":
            raise ConfigError(
                "weight-level method='lora' is PEFT's own LoRA: use peft.LoraConfig (nora.load_adapter "
                "reads its folders, and PEFT reads nora's LoRA folders)"
            )
        # the same version and type checks nora.load_adapter applies to a folder
        checkpoint.config_from_dict(
            {
                "peft_type": str(self.peft_type or ptype),
                "nora_format_version": self.nora_format_version,
                **cfg.to_dict(),
            }
        )
        for k, v in cfg.to_dict().items():  # method defaults filled in, as nora saves them
            setattr(self, k, tuple(v) if k == "spline_range" else v)
        self.peft_type = NoraPeftType(ptype)
        _register(ptype)

    def to_nora(self) -> AdapterConfig:
        """The equivalent nora.AdapterConfig (validated)."""
        return AdapterConfig.from_dict({f: getattr(self, f) for f in _ADAPTER_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """Exactly what nora.save_adapter writes, so either library reads the folder."""
        return checkpoint.config_to_dict(self.to_nora())

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        # PEFT's version adds PEFT-only keys (auto_mapping, ...) that nora's strict reader refuses
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        checkpoint.atomic_write(out / checkpoint.CONFIG_NAME, lambda p: Path(p).write_text(text))
        # PeftModel.save_pretrained wrote its stock card (or updated a README) before calling
        # this: nora's card replaces the stock one; a README someone wrote stays (modelcard).
        modelcard.write_card(out, self.to_nora(), keep=False)  # new weights: nothing carried over


def _field(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


# base_model_name_or_path is PeftConfig's field already; the rest come from AdapterConfig so the
# two never drift apart. task_type defaults to CAUSAL_LM (PeftModelForCausalLM: generate, TRL).
_ADAPTER_FIELDS = [f.name for f in dataclasses.fields(AdapterConfig)]
NoraConfig = dataclasses.make_dataclass(
    "NoraConfig",
    [
        (f.name, f.type, _field(f))
        for f in dataclasses.fields(AdapterConfig)
        if f.name != "base_model_name_or_path"
    ]
    + [
        ("nora_format_version", int, dataclasses.field(default=FORMAT_VERSION)),
        ("task_type", "str | None", dataclasses.field(default="CAUSAL_LM")),
    ],
    bases=(_NoraConfigBase,),
    namespace={"__module__": __name__},
)
NoraConfig.__doc__ = """A PEFT config for a nora method: `NoraConfig(method="nora", r=16, ...)`.

Takes nora.AdapterConfig's fields (same defaults and checks) plus PEFT's (task_type,
inference_mode, ...); `peft_type` follows from the method (NORA, NOLORA, AURORA, LORAN, or
LORA_MODULE for module-level LoRA). `to_nora()` gives the AdapterConfig.
"""


# ----------------------------------------------------------------------------- the layers


class _PeftLayer(BaseTunerLayer):
    """What PEFT reads from a tuner layer (status, enable/disable), answered from nora's wrapper.

    nora keeps one adapter per model, so the layer's single adapter is named after the PEFT
    adapter it was created for. The adapter weights live in `self.adapter`, as in nora.
    """

    adapter_layer_names = ("adapter",)

    @property
    def merged(self) -> bool:  # nora's wrapper sets `merged`; BaseTunerLayer derives it
        return self.__dict__.get("_nora_merged", False)

    @merged.setter
    def merged(self, value: bool) -> None:
        self.__dict__["_nora_merged"] = value

    @property
    def merged_adapters(self) -> list[str]:
        return [self._active_adapter] if self.merged else []

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    def _get_available_adapters(self) -> set[str]:
        return {self._active_adapter}

    def unmerge(self) -> None:
        raise NotMergeableError("nora does not unmerge: reload the base model instead")


class PeftAdapterLinear(AdapterLinear, _PeftLayer):
    """nora's weight-level wrapper, visible to PEFT as a tuner layer."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, adapter_name: str):
        super().__init__(base_layer, adapter)
        self._active_adapter = adapter_name


class PeftParallelAdapter(ParallelAdapter, _PeftLayer):
    """nora's module-level wrapper, visible to PEFT as a tuner layer."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, adapter_name: str):
        super().__init__(base_layer, adapter)
        self._active_adapter = adapter_name


_PEFT_WRAPPERS = {AdapterLinear: PeftAdapterLinear, ParallelAdapter: PeftParallelAdapter}


# ----------------------------------------------------------------------------- the tuner


class NoraTuner(BaseTuner):
    """PEFT's `base_model` for nora methods: injection, merge, disable and unload are nora's."""

    prefix = "nora_"
    tuner_layer_cls = _PeftLayer

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        if adapter_modules(model):
            raise ValueError(
                "this model already holds a nora adapter: the nora PEFT bridge keeps one adapter per "
                "model (unload() it first, or use a fresh base model)"
            )
        cfg = config.to_nora()
        pairs = [
            (name, _PEFT_WRAPPERS[type(w)](w.base_layer, w.adapter, adapter_name).train(w.training))
            for name, w in plan(model, cfg)  # every check before any module changes
        ]
        apply(model, cfg, pairs)
        self.targeted_module_names = [name for name, _ in pairs]
        if config.inference_mode:
            for _, w in pairs:
                w.adapter.requires_grad_(False)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("nora places its adapters in inject_adapter")  # never called

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # model key '<module>.adapter.lora_A.weight' <-> checkpoint key '<module>.lora_A.weight'
        # (nora's keys carry no adapter name). Save and load both go through this mapping.
        head, sep, tail = key.rpartition(".adapter.")
        return f"{head}.{tail}" if sep else key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # Refuse a checkpoint that does not fit, naming every mismatch (as nora.load_adapter does),
        # instead of PEFT's partial load_state_dict(strict=False).
        pre = checkpoint.PREFIX
        wrappers = [
            (n.removeprefix(pre), m)
            for n, m in model.named_modules()
            if isinstance(m, AdapterWrapper)
        ]
        problems = checkpoint.tensor_problems(
            wrappers, {k.removeprefix(pre): v for k, v in state_dict.items()}
        )
        if problems:
            raise checkpoint.CheckpointError(
                "adapter does not fit this model: " + checkpoint.first_problems(problems)
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        set_adapters_enabled(self.model, enabled)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        for w in adapter_modules(self.model).values():
            w.adapter.requires_grad_(requires_grad)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        merge_adapters(
            self.model
        )  # NotMergeableError, before any weight changes, for non-linear methods

    def unmerge_adapter(self) -> None:
        raise NotMergeableError("nora does not unmerge: reload the base model instead")

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError("the nora PEFT bridge keeps one adapter per model: use unload() instead")

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names=None,
    ) -> nn.Module:
        if merge:
            merge_adapters(self.model)  # checks every layer first: nothing changes on error
        unload_adapters(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model


# ----------------------------------------------------------------------------- registration


def _register(ptype: str) -> None:
    """Make PEFT map `ptype` to nora's config and tuner (idempotent)."""
    from peft import mapping

    if ptype in list(PeftType):  # PEFT itself has (or one day adds) a method of that name
        raise RuntimeError(
            f"peft {peft.__version__} has its own method {ptype!r}; nora's bridge cannot take the name"
        )
    for table, value in (
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, NoraConfig),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, NoraTuner),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, NoraTuner.prefix),
    ):
        if table.setdefault(ptype, value) is not value:
            raise RuntimeError(f"PEFT already maps {ptype!r} to {table[ptype]!r}")


def peft_types() -> list[str]:
    """The peft_type names nora writes for everything but plain weight-level LoRA."""
    from nora.checkpoint import nora_peft_types

    return nora_peft_types()


def register_methods() -> list[str]:
    """Register every method in nora.adapters.METHODS with PEFT; returns their peft_types.

    Runs on import. Call it again after registering a method of your own, so that
    PeftModel.from_pretrained finds its folders (a NoraConfig registers its own type anyway).
    """
    types = peft_types()
    for t in types:
        _register(t)
    return types


register_methods()

__all__ = [
    "NoraConfig",
    "NoraTuner",
    "PeftAdapterLinear",
    "PeftParallelAdapter",
    "peft_types",
    "register_methods",
]
