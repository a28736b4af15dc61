"""A 4-bit (NF4) or 8-bit (LLM.int8) base for QLoRA-style training, through bitsandbytes.

    model, tok = load_base_model()
    quantize_base(model, bits=4)              # every nn.Linear but the output head
    nora.inject(model, AdapterConfig(...))    # adapters wrap the quantized layers unchanged

`bitsandbytes.nn.Linear4bit` / `Linear8bitLt` are `nn.Linear` subclasses whose forward
dequantizes on the fly, so nora's `AdapterLinear` wraps them like any Linear: h = W0q·x + Δ(x),
the adapter in float32, the base frozen. bitsandbytes >= 0.50 runs this on x86 CPUs (AVX2).
The adapter saved from such a model is the same PEFT-layout folder as always: it loads over
the quantized base and over the full-precision one. Merging needs a dense W0 and is refused on
a quantized layer (`nora.merge` says so before changing anything).
The output head stays dense: it is tied to the input embeddings in most small models.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn


class QuantizationError(ValueError):
    """The base cannot be quantized as asked; the message says why."""


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes quantized Linear (its weight is not a dense matrix)."""
    bnb = sys.modules.get("bitsandbytes")  # such a module exists only once bnb is imported
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantize_base(
    model: nn.Module,
    bits: int = 4,
    skip: tuple[str, ...] = ("lm_head",),
    storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Replace every `nn.Linear` of `model` (but those named in `skip`) by its bitsandbytes
    4-bit NF4 or 8-bit counterpart holding the same weights, in place; returns `model`.
    `storage` (4-bit only) is the dtype the packed bytes are viewed as: a float dtype lets
    FSDP2's fully_shard shard them (the same bits, the same outputs)."""
    if bits not in (4, 8):
        raise QuantizationError(f"bits must be 4 or 8, got {bits!r}")
    from nora.inject import has_adapters  # inject imports this module: not at the top

    if has_adapters(model):
        raise QuantizationError("quantize the base model before injecting adapters")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantizationError(
            "a 4/8-bit base needs bitsandbytes >= 0.50: pip install 'nora-adapters[quant]'"
        ) from None
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not is_quantized(m) and name.rsplit(".", 1)[-1] not in skip
    ]
    if not targets:
        if any(is_quantized(m) for m in model.modules()):
            return model  # quantized already (a model passed to `train` with load_in_4bit)
        raise QuantizationError("the model has no nn.Linear layers to quantize")
    # build all first: a failure leaves the model as it was
    built = [(name, _quantized(linear, bits, bnb, storage)) for name, linear in targets]
    for name, q in built:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


@functools.cache
def _linear8bit(bnb) -> type:
    class Linear8bit(bnb.nn.Linear8bitLt):
        """`Linear8bitLt` that evaluates as it trains. On CPU bitsandbytes trains through
        weight-only int8 (dequantize W, float matmul) but evaluates through LLM.int8's
        int8 x int8 product: a different function, and 2.5x slower here (576->1536 layer,
        4x256 tokens, 2 cores). nora takes the training path in both modes, so the held-out
        perplexity measures the function that was trained."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # the body of Linear8bitLt.forward (bitsandbytes 0.50), is_training forced on CPU
            self.state.is_training = self.training or x.device.type == "cpu"
            if self.weight.CB is not None:
                self.init_8bit_state()
            if self.bias is not None and self.bias.dtype != x.dtype:
                self.bias.data = self.bias.data.to(x.dtype)
            out = bnb.matmul(x, self.weight, bias=self.bias, state=self.state)
            if not self.state.has_fp16_weights and self.state.CB is not None:
                self.weight.data = self.state.CB
            return out

    return Linear8bit


def _quantized(linear: nn.Linear, bits: int, bnb, storage: torch.dtype) -> nn.Linear:
    w = linear.weight.data  # (out, in)
    has_bias = linear.bias is not None
    if bits == 4:
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=w.dtype,  # dequantized to the model's dtype for the matmul
            quant_type="nf4",
            quant_storage=storage,
            device="meta",
        )
        # module=q: quantizing records the quant_state on the layer too, where bitsandbytes'
        # forward finds it once fully_shard has swapped the weight for a plain shard (FSDP)
        q.weight = bnb.nn.Params4bit(
            w.cpu(), requires_grad=False, quant_type="nf4", quant_storage=storage, module=q
        )
        # bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel on the
        # first eval-mode forward; that kernel has no backward, so training after an evaluation
        # would stop gradients at every such layer (and it needs out_features % 32 == 0).
        # nora evaluates between steps: keep the generic, differentiable kernel.
        q.support_avx512bf16_for_cpu = False
    else:
        q = _linear8bit(bnb)(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,  # int8 storage, frozen
            threshold=6.0,  # LLM.int8: outlier features above this stay in 16/32 bit
            device="meta",
        )
        q.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(w.device).train(linear.training)  # the move to a device quantizes the weight
