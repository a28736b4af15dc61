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
- layers (`nora.vllm.layers`): every LoRA linear keeps σ's tensors per slot; each step applies
  every resident kind's σ to the whole latent and selects per token by its slot (torch.where:
  no Python branching on the batch). Row-parallel layers under tensor parallelism all-reduce
  the latent before σ (the shrink of a sharded input is a partial sum).

`register()` is idempotent (vLLM may call it several times per process).
"""

from __future__ import annotations

_DONE = False


def register() -> None:
    """The entry point: patch vLLM's LoRA loading and linear layers (once per process)."""
    global _DONE
    if _DONE:
        return
    from nora.vllm import layers, loading

    layers.install()
    loading.install()
    _DONE = True
