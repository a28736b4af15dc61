"""σ between vLLM's LoRA shrink and expand, per token by its adapter slot.

vLLM's linear LoRA layers hold every resident adapter in a slot of stacked buffers
(lora_a_stacked (slots, 1, R, k), lora_b_stacked (slots, 1, d, R), R = max_lora_rank, one pair
per output slice: q/k/v of qkv_proj, gate/up of gate_up_proj) and compute, for a token whose
request uses slot s, Δ = (x·A_sᵀ)·B_sᵀ with the scale already folded into B. Here:

    z = shrink(x)                    (N, R) per slice, vLLM's own kernel
    z = all_reduce(z)                row-parallel layers under TP: x is sharded, z a partial sum
    z = σ_{slot(token)}(z)           every resident kind's σ on all N rows, torch.where per row
    out += expand(z)                 vLLM's own kernel; row-parallel TP: on rank 0 only, since
                                     the layer all-reduces its output afterwards

σ's tensors live per slot: for each slice and each resident kind, `Adapter.stack` over that
kind's slots (plus one zero adapter of rank R, so everything is padded to R) and a `row` map
slot -> stack row. A token gathers its σ tensors by its slot (the stacked layout with n = tokens
and L = 1). Padded rank channels are inert: their A columns and B rows are zero. The slot state
changes only when vLLM activates an adapter; the per-step path branches on that state (which
kinds are resident), never on the batch. σ runs inside one custom op, so torch.compile treats it
as opaque and reads the live slot state.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Hashable

import torch

from nora.adapters import METHODS
from nora.adapters.base import Packed

# layer name -> layer: the custom op finds its layer here (weak: engines come and go)
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_CAPTURED = False  # a CUDA graph was captured with the σ op in it: kinds are frozen since


class GraphCapturedError(RuntimeError):
    """A non-linear adapter arrived after vLLM captured CUDA graphs without its σ."""


@dataclasses.dataclass
class _Group:
    """The slots of one kind in one slice."""

    kind: Hashable
    cls: type
    p: dict[str, torch.Tensor]  # σ's tensors stacked: rows = that kind's slots + the zero pad
    row: torch.Tensor  # (slots,) long: slot -> row of p (the pad row for other slots)


class SlotSigma:
    """σ's per-slot state of one LoRA linear layer (all its output slices)."""

    def __init__(self, n_slices: int, slots: int, rank: int, device):
        self.slots, self.rank, self.device = slots, rank, device
        self.packs: list[list[Packed | None]] = [[None] * slots for _ in range(n_slices)]
        self.groups: list[list[_Group]] = [[] for _ in range(n_slices)]
        self.kind_id = [torch.zeros(slots, dtype=torch.long, device=device)] * n_slices

    def set(self, slot: int, packs: list[Packed | None]) -> None:
        """Slot `slot` now holds these packs (one per slice; None: linear or absent)."""
        for i, pk in enumerate(packs):
            self.packs[i][slot] = None if pk is None or is_linear(pk) else pk
            self._rebuild(i)

    def _rebuild(self, i: int) -> None:
        kinds: dict[Hashable, list[int]] = {}
        for s, pk in enumerate(self.packs[i]):
            if pk is not None:
                kinds.setdefault(pk.kind, []).append(s)
        kind_id = torch.zeros(self.slots, dtype=torch.long)  # 0: identity (LoRA / no adapter)
        groups = []
        for j, (kind, slots) in enumerate(kinds.items()):
            cls = METHODS[kind[0]]
            packs = [_tiny(self.packs[i][s]) for s in slots]
            packs.append(_zero_pack(packs[0], cls, self.rank))  # pads every rank dim to R
            p = {k: v.to(self.device, torch.float32) for k, v in cls.stack(packs).p.items()}
            row = torch.full((self.slots,), len(slots), dtype=torch.long)
            row[slots] = torch.arange(len(slots))
            kind_id[slots] = j + 1
            groups.append(_Group(kind, cls, p, row.to(self.device)))
        self.groups[i] = groups
        self.kind_id = [*self.kind_id]
        self.kind_id[i] = kind_id.to(self.device)

    def apply_(self, i: int, z: torch.Tensor, slot: torch.Tensor) -> None:
        """z (N, R) of slice i in place <- σ_{slot[t]}(z[t]) for each row t; slot (N,) long."""
        groups = self.groups[i]
        if not groups:  # only linear adapters resident in this slice
            return
        kid = self.kind_id[i][slot]  # (N,)
        zz = z.unsqueeze(1)  # (N, 1, R): a stack of N one-token "adapters"
        out = z
        for j, g in enumerate(groups):
            rows = g.row[slot]  # (N,)
            p = {k: v[rows] for k, v in g.p.items()}  # (N, 1, R, ...) / (N, R, R) / (N, 1, 1)
            y = g.cls.sigma(g.kind, zz, p).squeeze(1)  # (N, R)
            out = torch.where((kid == j + 1).unsqueeze(1), y.to(z.dtype), out)
        z.copy_(out)


def is_linear(pk: Packed) -> bool:
    """σ is the identity (LoRA, or a method that keeps Adapter.sigma): nothing to apply."""
    return METHODS[pk.kind[0]].identity_sigma()


def check_not_captured() -> None:
    """Refuse non-linear adapters once CUDA graphs were captured without their σ."""
    if _CAPTURED:
        raise GraphCapturedError(
            "vLLM captured CUDA graphs before this non-linear adapter was loaded, so its "
            "activation is not in them: serve nora's NoRA/NoLoRA/AuroRA adapters with "
            "--enforce-eager"
        )


def _tiny(pk: Packed) -> Packed:
    """The pack with dummy A/B: `stack` reads them only for shapes; σ's tensors are kept."""
    return dataclasses.replace(pk, A=torch.zeros(1, pk.r), B=torch.zeros(pk.r, 1), W=None)


def _zero_pack(like: Packed, cls, R: int) -> Packed:
    """An adapter of rank R with every σ tensor zero: the padding row of a stack."""
    p = {}
    for key, v in like.p.items():
        dims = cls.sigma_rank_dims.get(key, 0)
        p[key] = v.new_zeros(*([R] * dims), *v.shape[dims:])
    return Packed(like.kind, R, torch.zeros(1, R), torch.zeros(R, 1), p=p)


# ----------------------------------------------------------------------------- the custom op


def _sigma_op(z: torch.Tensor, layer: str) -> None:
    """z (slices, N, R) in place: σ of each token's adapter, slice by slice."""
    global _CAPTURED
    lay = _LAYERS[layer]
    if z.is_cuda and torch.cuda.is_current_stream_capturing():
        _CAPTURED = True
    slot = _token_slots(lay.punica_wrapper, z.shape[1])
    for i in range(z.shape[0]):
        lay.nora_sigma.apply_(i, z[i], slot)


def _sigma_fake(z: torch.Tensor, layer: str) -> None:
    return None


def _token_slots(punica, n: int) -> torch.Tensor:
    """(n,) the slot of each token, indexed exactly as vLLM's shrink/expand index their weights."""
    idx = punica.token_lora_indices[:n]
    if idx.shape[0] < n:  # padded rows (never read back)
        idx = torch.cat([idx, idx.new_full((n - idx.shape[0],), -1)])
    return idx


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    if hasattr(torch.ops.vllm, "nora_sigma_"):
        return
    direct_register_custom_op(
        op_name="nora_sigma_", op_func=_sigma_op, mutates_args=["z"], fake_impl=_sigma_fake
    )


# ----------------------------------------------------------------------------- the patches


def _attach(layer, RowParallelLinear) -> None:
    """Per-slot σ state for a freshly created LoRA layer."""
    rank = layer.lora_a_stacked[0].shape[2]
    layer.nora_sigma = SlotSigma(
        len(layer.lora_a_stacked), len(layer.lora_a_stacked[0]), rank, layer.device
    )
    layer.nora_name = f"{type(layer).__name__}:{id(layer)}"
    _LAYERS[layer.nora_name] = layer
    # a sharded input makes the shrink a partial sum: σ needs the full latent first
    layer.nora_reduce = isinstance(layer.base_layer, RowParallelLinear) and layer.tp_size > 1


def _wrap_create(create, RowParallelLinear):
    def create_lora_weights(self, max_loras, lora_config, model_config=None):
        create(self, max_loras, lora_config, model_config)
        _attach(self, RowParallelLinear)

    return create_lora_weights


def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """vLLM's shrink -> expand with σ between (replaces BaseLinearLayerWithLoRA's)."""
    shape = output.shape if output.ndim == 3 else None
    if x.ndim == 3 and output.ndim == 3:  # transformers backend: (1, L, k)
        output, x = output.flatten(0, 1), x.flatten(0, 1)
    n, R = x.shape[0], self.lora_a_stacked[0].shape[2]
    z = torch.zeros(len(self.lora_a_stacked), n, R, dtype=torch.float32, device=x.device)
    self.punica_wrapper.add_shrink(z, x, self.lora_a_stacked, 1.0)  # (slices, N, R)
    if self.nora_reduce:
        from vllm.distributed import tensor_model_parallel_all_reduce

        z = tensor_model_parallel_all_reduce(z)
    torch.ops.vllm.nora_sigma_(z, self.nora_name)
    if not self.nora_reduce or self.tp_rank == 0:  # static: the rank, not the batch
        self.punica_wrapper.add_expand(
            output, z, self.lora_b_stacked, self.output_slices, add_inputs=True
        )
    return output.reshape(shape) if shape is not None else output


def _activate_adapter(activate):
    def activate_adapter(self, lora_id: int) -> bool:
        """vLLM's activation (A, B into the slot), then σ's tensors into the same slot."""
        packs = getattr(self._registered_adapters.get(lora_id), "nora", {})
        if any(not is_linear(pk) for pk in packs.values()):
            check_not_captured()  # before vLLM fills the slot: never served without σ
        if not activate(self, lora_id):
            return False
        slot = self.lora_index_to_id.index(lora_id)
        for name, module in self.modules.items():
            state = getattr(module, "nora_sigma", None)
            if state is not None:
                subs = self.packed_modules.get(name, [name])
                state.set(slot, [packs.get(s) for s in subs])
        return True

    return activate_adapter


def install() -> None:
    """Give vLLM's linear LoRA layers σ between shrink and expand (idempotent)."""
    import vllm.lora.layers as L
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.model_executor.layers.linear import RowParallelLinear

    if getattr(BaseLinearLayerWithLoRA, "_nora_installed", False):
        return
    _register_op()
    # every class that defines create_lora_weights (the base and the merged/packed ones)
    classes = {
        id(c): c for c in [BaseLinearLayerWithLoRA, *vars(L).values()] if isinstance(c, type)
    }
    for cls in classes.values():
        if issubclass(cls, BaseLinearLayerWithLoRA) and "create_lora_weights" in cls.__dict__:
            cls.create_lora_weights = _wrap_create(
                cls.__dict__["create_lora_weights"], RowParallelLinear
            )
    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output
    LoRAModelManager.activate_adapter = _activate_adapter(LoRAModelManager.activate_adapter)
    BaseLinearLayerWithLoRA._nora_installed = True
