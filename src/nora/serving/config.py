"""Every setting of `nora serve`, written once (as `nora.config.TrainConfig` is for training):
the `nora serve` options, `--config file.yaml` and `--print-config` are derived from it.

    cfg = from_mapping(ServeConfig, {"base": "smollm2-135m", "max_batch": 32})
    serve(cfg)

`validate()` refuses bad values at start-up (ConfigError naming the option), before minutes
of model loading, not per request.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nora.config import ConfigError, from_mapping

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServeConfig:
    """One server: the base, the adapter directory, the engine's and the HTTP layer's limits."""

    # what is served
    base: str = field(
        default="smollm2-135m", metadata={"help": "smollm2-135m, a local folder or a hub id"}
    )
    adapters_dir: str = field(
        default="adapters",
        metadata={"help": "folder of adapter folders (PEFT layout)", "aliases": ("adapters",)},
    )
    preload: list[str] = field(
        default_factory=list, metadata={"help": "adapters made resident at start (a,b,c)"}
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "float32 | bfloat16 | float16 (unset: float32 on CPU, bf16 on GPU)"},
    )
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (unset: cuda if any)"})
    # the process
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port (0: a free one)"})
    log_level: str = field(default="info", metadata={"help": " | ".join(LOG_LEVELS)})
    api_keys: str | None = field(
        default=None,
        metadata={
            "help": "JSON key file: tenants, their adapters and rights (default: "
            "$NORA_API_KEYS, $NORA_API_KEY; none: no auth, loopback only)"
        },
    )
    grace: float = field(
        default=30.0, metadata={"help": "seconds to drain in-flight requests on SIGTERM"}
    )
    keep_alive: float = field(
        default=75.0,
        metadata={"help": "seconds idle connections are kept (above the longest Retry-After)"},
    )
    # the engine
    max_resident: int = field(default=16, metadata={"help": "adapters kept loaded at once (LRU)"})
    max_batch: int = field(default=16, metadata={"help": "requests decoded together"})
    max_prefill_tokens: int = field(
        default=4096, metadata={"help": "padded prompt tokens prefilled in one forward"}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "context length (unset: the model's)"}
    )
    max_waiting: int = field(
        default=1024, metadata={"help": "queued requests before new ones get 503 + Retry-After"}
    )
    # the HTTP layer
    max_tokens_limit: int = field(default=1024, metadata={"help": "largest max_tokens accepted"})
    default_max_tokens: int = field(
        default=256, metadata={"help": "chat's max_tokens when not given"}
    )
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "longest prompt accepted (unset: max_model_len - 1)"}
    )
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body (413)"})
    request_timeout: float | None = field(
        default=None, metadata={"help": "seconds a request may take (then 504)"}
    )
    max_n: int = field(default=16, metadata={"help": "most choices (n) per request"})
    retry_after: float = field(
        default=1.0, metadata={"help": "least Retry-After seconds of a 503 / 429"}
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeConfig:
        return from_mapping(cls, d)

    def served_name(self) -> str:
        """The base model's name in `model` fields: `base`, or its folder's name."""
        return Path(self.base).name if "/" in self.base or "\\" in self.base else self.base

    def validate(self) -> ServeConfig:
        """Raise ConfigError (a ValueError) naming the first bad option."""
        for k in _POSITIVE_INTS:
            v = getattr(self, k)
            if v is not None and (type(v) is not int or v < 1):
                raise ConfigError(f"{k} must be an integer >= 1, got {v!r}")
        for k in ("request_timeout", "retry_after"):
            v = getattr(self, k)
            if v is not None and (not _is_num(v) or not 0 < v < math.inf):
                raise ConfigError(f"{k} must be a number of seconds > 0, got {v!r}")
        for k in ("max_waiting", "grace", "keep_alive"):
            v = getattr(self, k)
            if not _is_num(v) or v < 0:
                raise ConfigError(f"{k} must be >= 0, got {v!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(f"default_max_tokens ({self.default_max_tokens}) is above "
                              f"max_tokens_limit ({self.max_tokens_limit})")  # fmt: skip
        if type(self.port) is not int or not 0 <= self.port < 65536:
            raise ConfigError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        return self


_POSITIVE_INTS = ("max_resident", "max_batch", "max_prefill_tokens", "max_model_len",
                  "max_tokens_limit", "default_max_tokens", "max_prompt_tokens",
                  "max_body_bytes", "max_n")  # fmt: skip


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
