"""Tenants and API keys: who may use which adapters, and who may load / unload them.

Keys come from a JSON file (`nora serve --api-keys keys.json`) or the environment
(`NORA_API_KEYS`: the same JSON; `NORA_API_KEY`: one admin key), never from the command
line itself, where `ps` would show them to every user of the machine:

    {"keys": [
      {"key": "sk-acme-...", "tenant": "acme", "adapters": ["acme-*"], "load": true},
      {"key": "sk-beta-...", "tenant": "beta", "adapters": ["beta-1", "shared"], "rate": 5},
      {"key": "sk-ops-...",  "tenant": "ops",  "admin": true}
    ]}

`adapters`: names or shell-style patterns (fnmatch) the key may use; `base` (default true):
whether it may use the base model alone; `load`: whether it may load / unload the adapters
it may use; `admin`: every adapter, load / unload of any, `/metrics` and the full `/health`;
`rate` / `burst`: an optional token bucket (requests per second, bucket size; default
burst = max(1, rate)). Keys are compared in constant time and only their SHA-256 is kept; a
`Tenant` prints as its name, so a key never reaches a log line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV_KEYS, ENV_ADMIN_KEY = "NORA_API_KEYS", "NORA_API_KEY"
_FIELDS = {"key", "tenant", "adapters", "base", "load", "admin", "rate", "burst"}


class KeyConfigError(ValueError):
    """The key file or variable is malformed; the message says where (never the key)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(eq=False)
class Tenant:
    name: str
    adapters: tuple[str, ...] = ()
    base: bool = True
    load: bool = False
    admin: bool = False
    rate: float | None = None  # requests per second; None: unlimited
    burst: float = 1.0
    _tokens: float = field(default=0.0, repr=False)
    _t: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self._tokens, self._t = self.burst, time.monotonic()

    def __repr__(self) -> str:
        return f"Tenant({self.name!r})"

    def may_use(self, adapter: str) -> bool:
        return self.admin or any(fnmatch.fnmatchcase(adapter, p) for p in self.adapters)

    def may_load(self, adapter: str) -> bool:
        return self.admin or (self.load and self.may_use(adapter))

    def take(self, n: int = 1) -> float:
        """Spend n requests of the bucket: 0.0 when allowed, else seconds until it would be."""
        if self.rate is None:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
            self._t = now
            if self._tokens >= n:
                self._tokens -= n
                return 0.0
            return (n - self._tokens) / self.rate


# The tenant of a server without keys: everything allowed (today's behaviour on loopback).
OPEN = Tenant("anonymous", ("*",), admin=True)


class Keys:
    """The key table: `lookup(key)` -> Tenant or None, in time independent of the key."""

    def __init__(self, entries: list[tuple[str, Tenant]]):
        self._table = [(_digest(k), t) for k, t in entries]

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"Keys({len(self)} keys)"

    def lookup(self, key: str | None) -> Tenant | None:
        # Every entry is compared (no early exit) on digests of equal length, so the time
        # says nothing about which key, or how much of one, matched.
        d = _digest(key or "")
        found = None
        for digest, tenant in self._table:
            if hmac.compare_digest(digest, d) and key:
                found = tenant
        return found

    @classmethod
    def parse(cls, data: object, where: str) -> Keys:
        if isinstance(data, dict):
            data = data.get("keys")
        if not isinstance(data, list) or not data:
            raise KeyConfigError(f"{where}: expected {{'keys': [...]}} with at least one key")
        entries, seen = [], set()
        for i, e in enumerate(data):
            at = f"{where}: keys[{i}]"
            if not isinstance(e, dict):
                raise KeyConfigError(f"{at} must be an object")
            extra = sorted(set(e) - _FIELDS)
            if extra:
                raise KeyConfigError(f"{at}: unknown fields {extra}; known: {sorted(_FIELDS)}")
            key, name = e.get("key"), e.get("tenant", f"tenant-{i}")
            if not isinstance(key, str) or len(key) < 8:
                raise KeyConfigError(f"{at}: 'key' must be a string of at least 8 characters")
            if key in seen:
                raise KeyConfigError(f"{at} (tenant {name!r}): the same key appears twice")
            seen.add(key)
            pats = e.get("adapters", [])
            if isinstance(pats, str):
                pats = [pats]
            if not isinstance(pats, list) or not all(isinstance(p, str) and p for p in pats):
                raise KeyConfigError(f"{at}: 'adapters' must be a list of names or patterns")
            flags = {k: e.get(k, k == "base") for k in ("base", "load", "admin")}
            if not all(isinstance(v, bool) for v in flags.values()):
                raise KeyConfigError(f"{at}: 'base', 'load' and 'admin' must be true or false")
            rate, burst = e.get("rate"), e.get("burst")
            for k, v in (("rate", rate), ("burst", burst)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise KeyConfigError(f"{at}: '{k}' must be a number")
                if v is not None and v <= 0:
                    raise KeyConfigError(f"{at}: '{k}' must be > 0")
            if burst is not None and burst < 1:  # a bucket smaller than one request never admits
                raise KeyConfigError(f"{at}: 'burst' must be >= 1 (one request)")
            burst = float(burst if burst is not None else max(1.0, rate or 1.0))
            tenant = Tenant(str(name), tuple(pats), rate=rate, burst=burst, **flags)
            entries.append((key, tenant))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Keys:
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except OSError as e:
            raise KeyConfigError(f"cannot read the key file {p}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:  # the message quotes no content, only the place
            raise KeyConfigError(f"{p}: not valid JSON (line {e.lineno})") from None
        return cls.parse(data, str(p))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Keys | None:
        """Keys from NORA_API_KEYS (JSON) and / or NORA_API_KEY (one admin key); None if unset."""
        env = os.environ if env is None else env
        entries: list = []
        if env.get(ENV_KEYS):
            try:
                data = json.loads(env[ENV_KEYS])
            except json.JSONDecodeError as e:
                raise KeyConfigError(f"${ENV_KEYS}: not valid JSON (line {e.lineno})") from None
            entries += cls.parse(data, f"${ENV_KEYS}")._raw(data)
        if env.get(ENV_ADMIN_KEY):
            entries += [{"key": env[ENV_ADMIN_KEY], "tenant": "admin", "admin": True}]
        return cls.parse(entries, "the environment") if entries else None

    @staticmethod
    def _raw(data) -> list:
        return list(data.get("keys") if isinstance(data, dict) else data)


def load_keys(path: str | os.PathLike | None = None) -> Keys | None:
    """The key file at `path` if given, else the environment's keys; None: no keys at all."""
    return Keys.from_file(path) if path is not None else Keys.from_env()


def bearer(headers) -> str | None:
    """The key of `Authorization: Bearer <key>` (OpenAI clients) or `x-api-key: <key>`."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key")


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def exposure_warning(keys: Keys | None, host: str) -> str | None:
    """The warning for a server without keys bound beyond loopback (None: nothing to say)."""
    if keys is not None or is_loopback(host):
        return None
    return (
        f"no API keys are configured and the server listens on {host}: anyone who reaches it "
        "may use, load and unload every adapter; set --api-keys or $NORA_API_KEYS"
    )
