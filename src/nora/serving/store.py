"""The adapter store: a directory of adapter folders, a bounded LRU set of resident ones.

    store = AdapterStore(MultiAdapterModel(model), "adapters/", max_resident=16)
    uid = store.acquire("math")   # loads on first use (evicting the least recently used
    ...                           # adapter no request holds), pins it while a request runs
    store.release("math")

`root/<name>/` holds `adapter_config.json` + `adapter_model.safetensors` (PEFT layout, nora or
PEFT LoRA). Folders added to the directory while serving are found by name on first use; an
adapter is dropped with `unload`. Names are single path components from [A-Za-z0-9._-], never
containing '..'; a folder, or a file in it, that resolves outside `root` (a symlink) is
refused, so no request can make the server read outside the adapter directory.

`FixedStore(multi)` is the store of an engine built without a directory: the adapters
already added to `multi`, resident for good (nothing is loaded, evicted or unloaded).
"""

from __future__ import annotations

import os
import re
from collections import Counter, OrderedDict
from pathlib import Path

from nora.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from nora.serving.multi import AdapterInfo, MultiAdapterModel, UnknownAdapterError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterNameError(ValueError):
    """An adapter name that could address a path other than `root/<name>`."""


class AdapterBusyError(RuntimeError):
    """The adapter is in use by running requests and cannot be unloaded now."""


class StoreFullError(RuntimeError):
    """Every resident slot is pinned by a running request; try again when one finishes."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"adapter name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or ".." in name or not NAME_RE.fullmatch(name):
        raise AdapterNameError(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-' (no path "
            "separators, no '..', at most 128 characters)"
        )
    return name


class AdapterStore:
    """Adapters of one directory over one MultiAdapterModel, at most `max_resident` loaded."""

    mutable = True  # adapters can be loaded and unloaded (the HTTP load / unload endpoints)

    def __init__(self, multi: MultiAdapterModel, root: str | os.PathLike, max_resident: int = 16):
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapter directory {self.root} does not exist")
        self.multi, self.max_resident = multi, max_resident
        self.lock = multi.lock
        self._lru: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._pins: Counter[str] = Counter()
        self.loads = self.evictions = 0

    def _inside(self, p: Path) -> bool:
        return p == self.root or self.root in p.parents

    def path(self, name: str) -> Path:
        """root/<name>, checked; UnknownAdapterError when there is no such adapter folder."""
        folder = self.root / check_name(name)
        real = folder.resolve()
        if not self._inside(real) or real == self.root:
            raise AdapterNameError(f"adapter {name!r} resolves outside the adapter directory")
        if not (real / CONFIG_NAME).is_file():
            raise UnknownAdapterError(name, self.available())
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            if (real / f).exists() and not self._inside((real / f).resolve()):
                raise AdapterNameError(f"adapter {name!r}: {f} resolves outside the directory")
        return real

    def available(self) -> list[str]:
        """Names of the adapter folders in the directory, and of the resident adapters."""
        names = set(self.multi.adapters)
        for p in self.root.iterdir():
            if NAME_RE.fullmatch(p.name) and ".." not in p.name and (p / CONFIG_NAME).is_file():
                names.add(p.name)
        return sorted(names)

    def resident(self) -> list[str]:
        """Resident adapter names, least recently used first."""
        return list(self._lru)

    def is_resident(self, name: str) -> bool:
        return name in self._lru

    def info(self, name: str) -> AdapterInfo | None:
        return self.multi.adapters.get(name)

    def load(self, name: str) -> AdapterInfo:
        """Make `name` resident (most recently used); evicts an unpinned one if full.

        Fails closed: the adapter is read and validated before anything is evicted, so a
        folder that is missing, corrupted or unreadable (deleted mid-load, a full or failing
        disk) leaves the resident set exactly as it was. The read and validation run without
        the model lock (unless the caller holds it), so running requests keep decoding; the
        evicted adapter leaves before the new one comes in, so at most `max_resident` are
        ever resident.
        """
        with self.lock:
            if name in self._lru:
                self._lru.move_to_end(name)
                return self.multi.adapters[name]
            path = self.path(name)
            self._check_room(name)
        prepared = self.multi.prepare(name, path)  # raises before touching the resident set
        with self.lock:
            if name in self._lru:  # another thread loaded it meanwhile
                self._lru.move_to_end(name)
                return self.multi.adapters[name]
            self._check_room(name)  # requests may have pinned the rest meanwhile
            while len(self._lru) >= self.max_resident:
                self._drop(self._victim())
                self.evictions += 1
            info = self.multi.install(prepared)
            self._lru[name] = None
            self.loads += 1
            return info

    def _check_room(self, name: str) -> None:
        if len(self._lru) >= self.max_resident and self._victim() is None:
            raise StoreFullError(
                f"all {self.max_resident} resident adapters are in use; cannot load {name!r}"
            )

    def _victim(self) -> str | None:
        """The least recently used adapter no request holds."""
        return next((n for n in self._lru if not self._pins[n]), None)

    def acquire(self, name: str) -> int:
        """Load if needed and pin `name` for a request; returns its uid."""
        with self.lock:
            info = self.load(name)
            self._pins[name] += 1
            return info.uid

    def release(self, name: str) -> None:
        with self.lock:
            if self._pins[name] > 0:
                self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]

    def pins(self, name: str) -> int:
        return self._pins[name]

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self._lru:
                raise UnknownAdapterError(name, self.resident())
            if self._pins[name]:
                raise AdapterBusyError(
                    f"adapter {name!r} is in use by {self._pins[name]} running request(s)"
                )
            self._drop(name)

    def _drop(self, name: str) -> None:
        self.multi.remove(name)
        del self._lru[name]


class FixedStore:
    """The adapters of `multi` as they are, behind AdapterStore's interface: `load` and
    `acquire` find a resident adapter (UnknownAdapterError otherwise); nothing is evicted."""

    mutable = False
    root = None

    def __init__(self, multi: MultiAdapterModel):
        self.multi, self.lock = multi, multi.lock
        self.loads = self.evictions = 0

    def available(self) -> list[str]:
        return sorted(self.multi.adapters)

    resident = available

    def is_resident(self, name: str) -> bool:
        return name in self.multi.adapters

    def info(self, name: str) -> AdapterInfo | None:
        return self.multi.adapters.get(name)

    def load(self, name: str) -> AdapterInfo:
        info = self.multi.adapters.get(name)
        if info is None:
            raise UnknownAdapterError(name, self.available())
        return info

    def acquire(self, name: str) -> int:
        return self.multi.uid(name)

    def release(self, name: str) -> None:
        pass

    def pins(self, name: str) -> int:
        return 0

    def unload(self, name: str) -> None:
        raise AdapterBusyError(f"adapter {name!r} is fixed: this server has no adapter directory")
