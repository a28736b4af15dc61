"""σ between vLLM's LoRA shrink and expand, per token by its adapter slot.

vLLM's linear LoRA layers hold every resident adapter in a slot of stacked buffers
(lora_a_stacked (slots, 1, R, k), lora_b_stacked (slots, 1, d, R), R = max_lora_rank, one pair
per output slice: q/k/v of qkv_proj, gate/up of gate_up_proj) and compute, for a token whose
request uses slot s, Δ = (x·A_sᵀ)·B_sᵀ with the scale already folded into B. Here:

    z = shrink(x)                    (slices, N, R), vLLM's own kernel
    z = all_reduce(z)                row-parallel layers under TP: x is sharded, z a partial sum
    z = σ_{slot(token)}(z)           each kind's σ on all rows, torch.where per row
    out += expand(z)                 vLLM's own kernel; row-parallel TP: on rank 0 only, since
                                     the layer all-reduces its output afterwards

σ's state is allocated with vLLM's LoRA weights (`create_lora_weights`) and never changes
shape: for every kind of the registered non-linear methods at their default settings (NoRA
and NoLoRA with each activation, AuroRA on its default spline grid), σ's tensors of every
(slice, slot) in `Adapter.stack`'s layout padded to R (a token is a stack of one: n = rows,
L = 1), and `kind_id` (slices·slots,): which kind's σ a slot runs, 0 the identity (LoRA, no
adapter). Loading an adapter only copies into these buffers, so CUDA graphs captured at
start-up serve a NoRA loaded later: the per-step op has fixed shapes, no host sync and no
branch on the batch. While a graph is captured it runs every kind; eagerly only the resident
ones (the same result: a kind selects no row where it is not resident). A kind outside that
set (another AuroRA grid, a user-registered method) gets its buffers in every layer on first
load; once graphs were captured it is refused, since they would replay without it. Padded
rank channels are inert: their A columns and B rows are zero. σ runs inside one custom op,
so torch.compile treats it as opaque and reads the live slot state.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Hashable, Iterable

import torch

from nora.adapters import METHODS
from nora.adapters.base import Packed
from nora.config import AdapterConfig

# layer name -> layer: the custom op finds its layer here (weak: engines come and go)
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# kind -> a pack of it: every layer has σ state for each (None: not built yet, see `kinds`)
_KINDS: dict[Hashable, Packed] | None = None
_CAPTURED = False  # a CUDA graph was captured with the σ op in it: no new kinds since


class GraphCapturedError(RuntimeError):
    """An adapter of a kind without σ state arrived after vLLM captured CUDA graphs."""


@dataclasses.dataclass
class _Group:
    """σ's tensors of one kind for every (slice, slot)."""

    kind: Hashable
    cls: type
    p: dict[str, torch.Tensor]  # (slices·slots, ...) each: `Adapter.stack`'s layout at rank R


class SlotSigma:
    """σ's per-slot state of one LoRA linear layer (all its output slices), fixed shapes."""

    def __init__(self, n_slices: int, slots: int, rank: int, device):
        self.n_slices, self.slots, self.rank, self.device = n_slices, slots, rank, device
        self.groups: list[_Group] = []
        self.index: dict[Hashable, int] = {}  # kind -> its group's position (kind_id - 1)
        self.kind_id = torch.zeros(n_slices * slots, dtype=torch.long, device=device)
        self.resident = [0] * (n_slices * slots)  # kind_id on the host: no device reads
        self.live: set[int] = set()  # the kind ids resident in some slot
        for kind, pk in kinds().items():
            self.add_kind(kind, pk)

    def add_kind(self, kind: Hashable, like: Packed) -> None:
        """Zeroed σ state for one more kind (`like`: any pack of it, for the shapes)."""
        cls = METHODS[kind[0]]
        one = cls.stack([_tiny(_zero_pack(like, cls, self.rank))]).p  # (1, ...) at rank R
        rows = self.n_slices * self.slots
        p = {k: torch.zeros(rows, *v.shape[1:], device=self.device) for k, v in one.items()}
        self.index[kind] = len(self.groups)
        self.groups.append(_Group(kind, cls, p))

    def set(self, slot: int, packs: list[Packed | None]) -> None:
        """Slot `slot` now holds these packs (one per slice; None: linear or absent).

        Copies into the existing buffers only (the state captured graphs read)."""
        for i, pk in enumerate(packs):
            row, j = i * self.slots + slot, 0
            if pk is not None and not is_linear(pk):
                if pk.kind not in self.index:
                    self.add_kind(pk.kind, pk)
                g = self.groups[self.index[pk.kind]]
                st = g.cls.stack([_tiny(pk), _zero_pack(pk, g.cls, self.rank)]).p  # pad to R
                for k, buf in g.p.items():
                    buf[row].copy_(st[k][0])
                j = self.index[pk.kind] + 1
            self.kind_id[row] = j
            self.resident[row] = j
        self.live = set(self.resident) - {0}

    def apply_(self, z: torch.Tensor, slot: torch.Tensor, every: bool = False) -> None:
        """z (slices, N, R) in place <- σ_{slot[t]}(z[i, t]) for every slice i and row t.

        slot (N,) long, -1 (no adapter) read as the last slot, as vLLM's kernels index it.
        every: run every kind (graph capture), else only the resident ones."""
        if not every and not self.live:  # only linear adapters resident
            return
        S, N, R = z.shape
        base = torch.arange(S, device=z.device).unsqueeze(1) * self.slots  # (S, 1)
        rows = (base + slot.remainder(self.slots)).flatten()  # (S·N,) rows of the state
        kid = self.kind_id[rows]  # (S·N,)
        zz = z.reshape(S * N, 1, R)  # a stack of S·N one-token "adapters"
        out = z.reshape(S * N, R)
        for j, g in enumerate(self.groups, 1):
            if not every and j not in self.live:
                continue
            p = {k: v[rows] for k, v in g.p.items()}  # (S·N, 1, R, ...) / (S·N, R, R) / (S·N, 1, 1)
            y = g.cls.sigma(g.kind, zz, p).squeeze(1)  # (S·N, R)
            out = torch.where((kid == j).unsqueeze(1), y.to(z.dtype), out)
        z.copy_(out.view(S, N, R))


def is_linear(pk: Packed) -> bool:
    """σ is the identity (LoRA, or a method that keeps Adapter.sigma): nothing to apply."""
    return METHODS[pk.kind[0]].identity_sigma()


def builtin_packs(select: str | None = None) -> list[Packed]:
    """A pack of each kind of the registered non-linear methods at their default settings.

    select (NORA_VLLM_KINDS): comma-separated "method" or "method:activation" entries, to keep
    only those kinds (fewer σs in captured graphs); None: all."""
    out = {}  # "method:activation" -> pack
    for name, cls in METHODS.items():
        if not cls.shrinks or cls.identity_sigma():  # dense (refused by loading) or linear
            continue
        for act in cls.activations:
            out[f"{name}:{act}"] = cls(1, 1, AdapterConfig(method=name, r=1, activation=act)).pack()
    if select is None:
        return list(out.values())
    want = {w.strip() for w in select.split(",") if w.strip()}
    keep = {k for k in out for w in want if w in (k, k.split(":")[0])}
    if unknown := sorted(w for w in want if not any(w in (k, k.split(":")[0]) for k in out)):
        raise ValueError(
            f"NORA_VLLM_KINDS: {', '.join(unknown)} names no built-in kind; use a method or "
            f"method:activation of {', '.join(out)}"
        )
    return [pk for k, pk in out.items() if k in keep]


def kinds() -> dict[Hashable, Packed]:
    """Every kind each layer holds σ state for: the built-in ones (those NORA_VLLM_KINDS
    names, when set), then any admitted since."""
    global _KINDS
    if _KINDS is None:
        _KINDS = {pk.kind: pk for pk in builtin_packs(os.environ.get("NORA_VLLM_KINDS"))}
    return _KINDS


def admit(packs: Iterable[Packed]) -> None:
    """Give these packs' kinds σ state in every layer; refuse a new kind once graphs exist."""
    for pk in packs:
        if is_linear(pk) or pk.kind in kinds():
            continue
        if _CAPTURED:
            raise GraphCapturedError(
                f"vLLM captured CUDA graphs before an adapter of kind {pk.kind} was loaded, and "
                "only the kinds allocated at start-up have σ state in them (the built-in ones: "
                "NoRA/NoLoRA with each activation, AuroRA on its default spline grid; or those "
                "NORA_VLLM_KINDS names): serve this adapter with --enforce-eager"
            )
        kinds()[pk.kind] = pk
        for layer in list(_LAYERS.values()):
            layer.nora_sigma.add_kind(pk.kind, pk)


def _tiny(pk: Packed) -> Packed:
    """The pack with dummy A/B: `stack` reads them only for shapes; σ's tensors are kept."""
    return dataclasses.replace(pk, A=torch.zeros(1, pk.r), B=torch.zeros(pk.r, 1), W=None)


def _zero_pack(like: Packed, cls, R: int) -> Packed:
    """An adapter of rank R with every σ tensor zero: the padding row of a stack."""
    p = {}
    for key, v in like.p.items():
        dims = cls.sigma_rank_dims.get(key, 0)
        p[key] = v.new_zeros((*([R] * dims), *v.shape[dims:]))  # a tuple: 0-d (sinter) too
    return Packed(like.kind, R, torch.zeros(1, R), torch.zeros(R, 1), p=p)


# ----------------------------------------------------------------------------- the custom op


def _sigma_op(z: torch.Tensor, layer: str) -> None:
    """z (slices, N, R) in place: σ of each token's adapter (vLLM's per-step path)."""
    global _CAPTURED
    lay = _LAYERS[layer]
    capturing = z.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing:  # the graph holds every kind's σ: adapters loaded later replay correctly
        _CAPTURED = True
    sigma_step_(lay.nora_sigma, z, lay.punica_wrapper.token_lora_indices, every=capturing)


def sigma_step_(state: SlotSigma, z: torch.Tensor, token_idx: torch.Tensor, every: bool) -> None:
    """The op's work on tensors only (what tests compile with fullgraph=True)."""
    state.apply_(z, _token_slots(token_idx, z.shape[1]), every)


def _sigma_fake(z: torch.Tensor, layer: str) -> None:
    return None


def _token_slots(token_idx: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the slot of each token, indexed exactly as vLLM's shrink/expand index their weights."""
    idx = token_idx[:n]
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
    """Per-slot σ state for a freshly created LoRA layer: every kind's, allocated now."""
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
        admit(packs.values())  # before vLLM fills the slot: never served without σ
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


def _create_classes() -> list[type]:
    """Every vLLM linear LoRA class that defines create_lora_weights (the base, merged, packed)."""
    import vllm.lora.layers as L
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    classes = {
        id(c): c for c in [BaseLinearLayerWithLoRA, *vars(L).values()] if isinstance(c, type)
    }
    return [
        c
        for c in classes.values()
        if issubclass(c, BaseLinearLayerWithLoRA) and "create_lora_weights" in c.__dict__
    ]


def hooks() -> list:
    """The vLLM methods `install` replaces, as `nora.vllm.check` verifies them first."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager

    from nora.vllm import Hook

    create = ("self", "max_loras", "lora_config", "model_config")
    return [
        *[  # the base first: it must have it even if no class defines it any more
            Hook(c, "create_lora_weights", create, None)
            for c in dict.fromkeys([BaseLinearLayerWithLoRA, *_create_classes()])
        ],
        # a classification head routes its LoRA per request; nora's adapters never target it
        Hook(
            BaseLinearLayerWithLoRA,
            "_apply_lora_to_output",
            ("self", "x", "output"),
            ("ClassificationHeadWithLoRA",),
        ),
        # the LRU manager's activate_adapter calls super().activate_adapter: the patched one
        Hook(
            LoRAModelManager, "activate_adapter", ("self", "lora_id"), ("LRUCacheLoRAModelManager",)
        ),
    ]


def install() -> None:
    """Give vLLM's linear LoRA layers σ between shrink and expand (idempotent)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.model_executor.layers.linear import RowParallelLinear

    if getattr(BaseLinearLayerWithLoRA, "_nora_installed", False):
        return
    _register_op()
    for cls in _create_classes():  # each wraps its own: they call super() or not
        cls.create_lora_weights = _wrap_create(
            cls.__dict__["create_lora_weights"], RowParallelLinear
        )
    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output
    LoRAModelManager.activate_adapter = _activate_adapter(LoRAModelManager.activate_adapter)
    BaseLinearLayerWithLoRA._nora_installed = True
