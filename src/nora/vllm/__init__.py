"""Serve nora's non-linear adapters unmerged inside vLLM (a `vllm.general_plugins` plugin).

    pip install "nora-adapters[vllm]"     # or: bash scripts/setup.sh vllm  (.venv-vllm)
    vllm serve <base> --enable-lora --max-lora-rank 16 --lora-modules a=<nora dir> b=<lora dir>

vLLM runs every LoRA linear as shrink -> expand over per-slot stacked weights (Punica). This
plugin, loaded by vLLM in every process, inserts the method's latent map σ between the two:

    Δ(x) = expand(σ_{slot(token)}(shrink(x)))     scale (and nothing else) folded into B

- loading (`nora.vllm.loading`): adapter folders whose `peft_type` is NORA, NOLORA or AURORA
  are read with nora's own checkpoint code, checked (method, placement, rank, module names,
  shapes against the base) and packed by the method (`Adapter.pack`: A, B with s after σ, σ's
  tensors p); LoRAN, module-level adapters and unknown peft_types are refused by name.
- layers (`nora.vllm.layers`): every LoRA linear holds σ's tensors per slot for every built-in
  kind, allocated with vLLM's LoRA weights, so CUDA graphs captured at start-up serve adapters
  loaded later; each step applies each kind's σ to the whole latent and selects per token by
  its slot (torch.where: no Python branching on the batch). Row-parallel layers under tensor
  parallelism all-reduce the latent before σ (the shrink of a sharded input is a partial sum).
  NORA_VLLM_KINDS (e.g. "nora:silu,aurora") allocates only the kinds it names: fewer σs in
  each captured graph; an adapter of another kind is then refused once graphs are captured.

The plugin replaces private vLLM methods, so it fails closed: `register()` first checks the
vLLM version against TESTED_VLLM and that every method it patches exists with the parameters
it was written against, and raises `UnsupportedVllmError` (naming the version and the hook)
before patching anything. Otherwise, after an upstream rename, the patch would land on a
method nobody calls and non-linear adapters would be served as plain LoRA, silently.
`register()` is idempotent (vLLM may call it several times per process).
"""

from __future__ import annotations

import dataclasses
import inspect

TESTED_VLLM = ("0.32", "0.33")  # [low, high): pyproject's `vllm` extra pins the same range
_DONE = False


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not one nora's plugin was tested with (version or hooks)."""


@dataclasses.dataclass(frozen=True)
class Hook:
    """A vLLM method the plugin replaces, with the parameters the replacement expects."""

    owner: type
    name: str
    params: tuple[str, ...]
    # subclasses known to define it too (read: they still reach the patched one, or never
    # serve nora's adapters); any other would bypass the patch. None: any (each is patched)
    overridden_by: tuple[str, ...] | None = ()


def check(version: str, hooks: list[Hook]) -> None:
    """Raise UnsupportedVllmError unless `version` is in TESTED_VLLM and every hook fits."""
    lo, hi = TESTED_VLLM
    want = f"vllm>={lo},<{hi}"
    if not _release(lo) <= _release(version)[:2] < _release(hi):
        raise UnsupportedVllmError(
            f"nora's vLLM plugin was tested with {want}; found vllm {version}. It patches "
            f"private vLLM methods, so it refuses other versions: pip install '{want}' "
            "(CPU machines: bash scripts/setup.sh vllm)"
        )
    problems = []
    for h in hooks:
        where = f"{h.owner.__module__}.{h.owner.__qualname__}.{h.name}"
        fn = getattr(h.owner, h.name, None)
        if not callable(fn):
            problems.append(f"{where} is missing")
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got != h.params:
            problems.append(f"{where}({', '.join(got)}) changed: expected ({', '.join(h.params)})")
        for sub in _subclasses(h.owner) if h.overridden_by is not None else []:
            if h.name in sub.__dict__ and sub.__qualname__ not in h.overridden_by:
                problems.append(f"{sub.__module__}.{sub.__qualname__} overrides {h.name}")
    if problems:
        raise UnsupportedVllmError(
            f"nora's vLLM plugin cannot hook into vllm {version} (tested with {want}): "
            + "; ".join(problems)
            + ". Nothing was patched: serving nora's adapters as plain LoRA would be silently "
            f"wrong. Install {want}"
        )


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion:  # vLLM says "dev" when built without version metadata
        return ()


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def register() -> None:
    """The entry point: check, then patch vLLM's LoRA loading and linear layers (once)."""
    global _DONE
    if _DONE:
        return
    import vllm

    from nora.vllm import layers, loading

    check(vllm.__version__, [*layers.hooks(), *loading.hooks()])  # before patching anything
    layers.kinds()  # a NORA_VLLM_KINDS naming no kind stops start-up here, not in a worker
    layers.install()
    loading.install()
    _DONE = True
