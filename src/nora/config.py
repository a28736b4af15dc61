"""Every setting nora has, written once: `AdapterConfig` (what to adapt and how) and
`TrainConfig` (one fine-tuning run). Each field's name, default and help text live here only;
the `nora train` / `nora params` options, YAML/JSON config files, sweep files and the demo are
derived from these dataclasses through `from_mapping` and `parse_text`.

    from nora.config import TrainConfig, from_mapping
    cfg = from_mapping(TrainConfig, {"max_steps": 50, "adapter": {"method": "nora", "r": 8}})

AdapterConfig fields left as `None` are filled from the chosen method's defaults (see each
method's docstring in `nora.adapters`), so a saved config always holds the values that were used.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

FORMAT_VERSION = 1  # bump when the JSON layout changes incompatibly
PLACEMENTS = ("weight", "module")
DEFAULT_TARGETS = {"weight": ["q_proj", "v_proj"], "module": ["self_attn", "mlp"]}


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


@dataclass
class AdapterConfig:
    """Configuration of one adapter (one method, one rank) over a set of modules."""

    method: str = field(default="lora", metadata={"help": "lora | nora | nolora | aurora | loran"})
    r: int = field(default=8, metadata={"help": "rank: width of the low-rank bottleneck"})
    alpha: float | None = field(
        default=None, metadata={"help": "scale = alpha/r (alpha/sqrt(r) with rslora)"}
    )
    scale: float | None = field(
        default=None, metadata={"help": "a fixed scale s; overrides alpha (NoRA's default: 1.0)"}
    )
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha/sqrt(r)"})
    dropout: float | None = field(
        default=None, metadata={"help": "dropout p, applied where the method puts it"}
    )
    activation: str | None = field(
        default=None,
        metadata={"help": "identity | relu | silu | gelu | tanh | sinter | learnable"},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "module-name suffixes (list; on the command line a,b,c) or a regex matched "
            "against full names (a string with regex characters)",
            "aliases": ("targets",),
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "suffixes or regex of modules never adapted"}
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={
            "help": "only these layer indices, e.g. 22-29 or 1,3,5",
            "aliases": ("layers",),
        },
    )
    layers_pattern: str | None = field(
        default=None,
        metadata={
            "help": "name of the layer list holding the index (default: any of "
            "layers|h|blocks|block|layer)"
        },
    )
    placement: str = field(
        default="weight",
        metadata={"help": "weight: inside each targeted Linear; module: parallel to a block"},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "B = 0 so the adapted model starts equal to the base"}
    )
    sinter_a: float = field(default=5e-4, metadata={"help": "Sinter amplitude a"})
    sinter_omega: float = field(default=1e3, metadata={"help": "Sinter frequency omega"})
    spline_grid_size: int = field(default=5, metadata={"help": "AuroRA B-spline grid intervals"})
    spline_order: int = field(default=3, metadata={"help": "AuroRA B-spline order"})
    spline_range: tuple[float, float] = field(
        default=(-1.0, 1.0), metadata={"help": "AuroRA B-spline grid range"}
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "recorded on save; informational"}
    )

    def __post_init__(self) -> None:
        from nora.adapters import METHODS  # late import: adapters import this module

        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        cls = METHODS[self.method]
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise ConfigError(f"r must be a positive int, got {self.r!r}")
        if self.r <= 0:
            raise ConfigError(f"r must be a positive int, got {self.r}")
        if self.alpha is None and self.scale is None:
            self.alpha, self.scale = cls.default_alpha, cls.default_scale
        for name in ("alpha", "scale"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.dropout is None:
            self.dropout = cls.default_dropout
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation is None:
            self.activation = cls.default_activation
        if self.activation not in cls.activations:
            raise ConfigError(
                f"activation {self.activation!r} is not available for method {self.method!r}; "
                f"choose one of {list(cls.activations)}"
                + ("  (for a non-linear LoRA use method='nora')" if cls.linear else "")
            )
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGETS[self.placement])
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(
            self.layers_to_transform, bool
        ):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            ok = isinstance(self.layers_to_transform, (list, tuple)) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for i in self.layers_to_transform
            )
            if not ok or not self.layers_to_transform:
                raise ConfigError(
                    "layers_to_transform must be a non-empty list of layer indices >= 0, "
                    f"got {self.layers_to_transform!r}"
                )
            self.layers_to_transform = sorted(set(self.layers_to_transform))
        self.spline_range = tuple(float(v) for v in self.spline_range)
        if len(self.spline_range) != 2 or not self.spline_range[0] < self.spline_range[1]:
            raise ConfigError(f"spline_range must be (low, high), got {self.spline_range}")
        if self.spline_grid_size < 1 or self.spline_order < 0:
            raise ConfigError("spline_grid_size must be >= 1 and spline_order >= 0")

    @property
    def effective_scale(self) -> float:
        """s in Δ(x) = s·…: the fixed `scale` if set, else alpha/r (alpha/√r with rslora)."""
        if self.scale is not None:
            return float(self.scale)
        return float(self.alpha) / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spline_range"] = list(self.spline_range)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig:
        return from_mapping(cls, d)


def _names_or_regex(what: str, value: Any) -> list[str] | str:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{what} regex {value!r} does not compile: {e}") from None
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) for v in value):
        return sorted(set(value)) if isinstance(value, set) else list(value)
    raise ConfigError(f"{what} must be a non-empty list of names or a regex string, got {value!r}")


TRAIN_ADAPTER = {"method": "nora", "r": 16}  # what `nora train` trains unless told otherwise


@dataclass
class TrainConfig:
    """One fine-tuning run. Everything that changes the result is here and saved as JSON."""

    adapter: AdapterConfig = field(
        default_factory=lambda: AdapterConfig(**TRAIN_ADAPTER),
        # a partial `adapter:` mapping is laid over these, so leaving out the method still means
        # NoRA at rank 16 wherever the config comes from (file, command line, sweep)
        metadata={"help": "the adapter to train (an AdapterConfig)", "defaults": TRAIN_ADAPTER},
    )
    model: str = field(
        default="smollm2-135m", metadata={"help": "smollm2-135m, a local folder or a hub id"}
    )
    data: str = field(
        default="math",
        metadata={"help": "math | reasoning-mix | logistic-map | slimorca | mathinstruct | a file"},
    )
    data_path: str | None = field(
        default=None, metadata={"help": "local file for slimorca / mathinstruct"}
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "distil: match this teacher's next-token distributions (KL) instead of "
            "the labels (a safetensors file of fine-tuned base weights, nora.distill)"
        },
    )
    n_train: int = field(default=512, metadata={"help": "training examples"})
    n_skip: int = field(
        default=0,
        metadata={"help": "examples left out between the eval and train splits (a test split)"},
    )
    data_seed: int | None = field(
        default=None, metadata={"help": "seed of the data order (unset: the run's seed)"}
    )
    n_eval: int = field(
        default=64,
        metadata={"help": "held-out examples for perplexity", "formerly": ("n_test",)},
    )
    max_len: int = field(default=256, metadata={"help": "tokens per example (longer: cut)"})
    max_steps: int = field(
        default=100,
        metadata={"help": "optimizer steps", "aliases": ("steps",), "formerly": ("steps",)},
    )
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "share of max_steps with linear warmup (then cosine)"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    seed: int = field(default=0, metadata={"help": "adapter init and data order"})
    dtype: str | None = field(
        default=None,
        metadata={"help": "float32 | bfloat16 | float16 (unset: float32 on CPU, bf16 on GPU)"},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "quantize the base's Linear layers to 4 bit (NF4)"}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "quantize the base's Linear layers to 8 bit (LLM.int8)"}
    )
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations; 0: at end"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints; 0: at end"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    report_to: str = field(
        default="none", metadata={"help": "tracker: none | tensorboard | wandb | mlflow"}
    )
    output_dir: str = field(
        default="runs/nora", metadata={"help": "run folder; rerun the same command to resume"}
    )

    # Fields that may differ between a run and its resumption (they do not change the result).
    RESUMABLE_CHANGES = ("eval_every", "save_every", "keep_checkpoints", "output_dir", "report_to")
    TRACKERS = ("none", "tensorboard", "wandb", "mlflow")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adapter"] = self.adapter.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return from_mapping(cls, d)

    def validate(self) -> None:
        """Raise ConfigError on values no run can use (checked before any work starts)."""
        for name in ("max_steps", "batch_size", "grad_accum", "max_len", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_train", "n_eval", "n_skip", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit exclude each other")
        if self.report_to not in self.TRACKERS:
            raise ConfigError(f"report_to must be one of {self.TRACKERS}, got {self.report_to!r}")


# --- one reader for every source: files, sweep blocks, the command line ----------------------


def from_mapping(cls: type[T], d: Mapping[str, Any], *, where: str = "") -> T:
    """Build the config dataclass `cls` (AdapterConfig, TrainConfig, ...) from a mapping: a
    parsed YAML/JSON file, a sweep's `train:` block, a saved train_config.json.

    Keys are the field names; a nested dataclass field (TrainConfig.adapter) takes a mapping.
    Values are checked against the field's type; strings are parsed as on the command line, so
    YAML's `lr: 1e-3` (a string to YAML 1.1) is the float 0.001. An unknown key raises
    ConfigError naming it and the nearest valid name; `validate()` runs when `cls` has one.
    """
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of fields, got {d!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in d if k not in names]
    if unknown:
        hints = [f"{k!r}: did you mean {m[0]!r}?" for k in unknown if (m := nearest(k, cls))]
        raise ConfigError(
            f"unknown config fields {unknown}{' in ' + where if where else ''}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f"; valid: {names}"
        )
    types_ = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            if "defaults" in f.metadata and isinstance(v, Mapping):
                v = {**f.metadata["defaults"], **v}
            kw[f.name] = _convert(types_[f.name], v, _join(where, f.name))
    obj = cls(**kw)
    if callable(getattr(obj, "validate", None)):
        obj.validate()
    return obj


def nearest(key: str, cls: type) -> list[str]:
    """The field of `cls` meant by an unknown `key`: one it was formerly called (metadata
    "formerly", e.g. n_test -> n_eval), else the closest spelling; empty if none is close."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    renamed = [f.name for f in fields if key in f.metadata.get("formerly", ())]
    return renamed or difflib.get_close_matches(str(key), [f.name for f in fields], n=1, cutoff=0.6)


def parse_text(tp: Any, text: str, name: str) -> Any:
    """A command-line string as a value of type `tp`: lists are comma-separated ('q_proj,v_proj';
    layer ranges '22-29'), 'none' is None where a field may be None, and a string holding regex
    characters stays one regex where the field takes a list or a regex (target_modules)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_union(tp):
        if text.strip().lower() in ("none", "null") and len(args) < len(typing.get_args(tp)):
            return None
        if str in args and any(typing.get_origin(a) is list for a in args):
            return text if set(text) & set("*+?[](){}|^$\\") else _items(text)
        return parse_text(args[0], text, name)
    origin = typing.get_origin(tp)
    if origin is list and args == [int]:
        return _int_ranges(text, name)
    if origin in (list, tuple):
        return _convert(tp, _items(text), name)
    return _convert(tp, text, name)


def _convert(tp: Any, value: Any, name: str) -> Any:
    """`value` as type `tp`, or ConfigError naming the field and what it takes."""
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where=name)
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return _convert(arg, value, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        if isinstance(value, str) and args == (int,):
            return _int_ranges(value, name)
        if isinstance(value, int) and not isinstance(value, bool) and args == (int,):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}")
        return [_convert(args[0], v, name) for v in value]
    if origin is dict:  # a study's `variants`, `lr_search.start` per variant, ...
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}")
        return {
            _convert(args[0], k, name): _convert(args[1], v, _join(name, str(k)))
            for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}")
        return tuple(_convert(a, v, name) for a, v in zip(args, value, strict=True))
    return _scalar(tp, value, name)


def _scalar(tp: type, value: Any, name: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            with _quiet():
                return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with _quiet():
                return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}")


class _quiet:
    """Swallow the ValueError of a failed int()/float() so the caller's ConfigError follows."""

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, ValueError)


def _int_ranges(text: str, name: str) -> list[int]:
    """'20-29' or '20,21,22' -> list of ints."""
    out: list[int] = []
    try:
        for part in _items(text):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ConfigError(f"{name} must look like '20-29' or '1,3,5', got {text!r}") from None
    return out


def _items(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    """A field type in words, for error messages and --help metavars."""
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return f"a list of {_describe(args[0])}s"
    if origin is tuple:
        return f"({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {type(None): "none", bool: "true/false", int: "an int", float: "a number"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (annotations are strings under `from __future__`)."""
    return typing.get_type_hints(cls)
