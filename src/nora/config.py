"""`AdapterConfig`: what to adapt and how, validated on construction, saved as JSON.

Fields left as `None` are filled from the chosen method's defaults (see each method's
docstring in `nora.adapters`), so a saved config always holds the values that were used.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

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
        metadata={"help": "module-name suffixes (list) or a regex matched against full names"},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "suffixes or regex of modules never adapted"}
    )
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "only these layer indices (e.g. the top ones)"}
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
                + ("  (for a non-linear LoRA use method='nora')" if self.method == "lora" else "")
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
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


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
