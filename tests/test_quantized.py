"""A 4-bit / 8-bit base (bitsandbytes >= 0.50 on x86 CPUs): nora's adapters wrap Linear4bit /
Linear8bitLt layers, train, save, and load over the same quantized base and over the
full-precision base; merging a quantized layer is refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer
from torch import nn
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.config import AdapterConfig
from nora.quantize import QuantizationError, is_quantized, quantize_base

bnb = pytest.importorskip("bitsandbytes")


def load(model_dir, bits: int | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return quantize_base(model, bits) if bits else model


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits,kind", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_quantize_base_swaps_every_linear_but_the_head(model_dir, bits, kind):
    dense, q = load(model_dir), load(model_dir, bits)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, nn.Linear)}
    assert type(layers.pop("lm_head")) is nn.Linear
    assert all(isinstance(m, getattr(bnb.nn, kind)) for m in layers.values())
    # the quantized base computes nearly the dense function (NF4 is the coarser one)
    err = (logits(q) - logits(dense)).abs().max() / logits(dense).abs().max()
    assert 0 < err < (0.2 if bits == 4 else 0.05)


def test_4bit_float_storage_holds_the_same_bits(model_dir):
    """storage=float32 (how FSDP shards a 4-bit base): the packed bytes viewed as floats, so
    the layers compute exactly what the uint8 ones do."""
    u8, f32 = load(model_dir, 4), quantize_base(load(model_dir), 4, storage=torch.float32)
    w, v = u8.model.layers[0].mlp.up_proj.weight, f32.model.layers[0].mlp.up_proj.weight
    assert (w.dtype, v.dtype) == (torch.uint8, torch.float32)
    assert torch.equal(w.view(-1), v.view(torch.uint8).view(-1))
    assert torch.equal(logits(u8), logits(f32))


def test_train_on_a_4bit_base_and_load_over_both_bases(model_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model", model_dir, "--data", "logistic-map", "--max-len", 300,
            "--n-train", 8, "--n-eval", 4, "--max-steps", 3, "--batch-size", 4, "--lr", "1e-2",
            "--method", "nora", "--r", 4, "--load-in-4bit", "--output-dir", run]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = nora.checkpoint.read_weights(run / "adapter")
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B moved off 0

    q = nora.load_adapter(load(model_dir, 4), run / "adapter")
    assert all(is_quantized(w.base_layer) for w in nora.adapter_modules(q).values())
    dense = nora.load_adapter(load(model_dir), run / "adapter")
    for name, w in nora.adapter_modules(dense).items():  # the same adapter on a dense base
        for k, v in w.adapter.state_dict().items():
            torch.testing.assert_close(v, saved[f"{name}.{k}"])
    # over either base, the adapter changes the output; the two differ by the quantization
    with nora.disable_adapters(q):
        q_base = logits(q)
    assert not torch.allclose(logits(q), q_base)
    assert (logits(dense) - logits(q)).abs().max() < 0.2 * logits(dense).abs().max()


def test_train_on_an_8bit_base_resumes_and_reloads_exactly(model_dir, tmp_path):
    from nora.train import TrainConfig, train

    tok = make_tokenizer()
    cfg = TrainConfig(
        adapter=AdapterConfig(method="loran", r=4),
        data="logistic-map", max_len=300, n_train=8, n_eval=4, max_steps=2, batch_size=4,
        lr=1e-2, load_in_8bit=True, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    model = load(model_dir)
    result = train(cfg, model=model, tokenizer=tok, progress=False)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.eval_ppl))
    again = nora.load_adapter(load(model_dir, 8), tmp_path / "run" / "adapter")
    torch.testing.assert_close(logits(again), logits(model.eval()))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizing_twice_changes_nothing(model_dir, bits):
    q = load(model_dir, bits)
    before = logits(q)
    assert all(is_quantized(m) for n, m in q.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(logits(quantize_base(q, bits)), before)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_on_a_quantized_layer_is_refused_before_any_change(model_dir, bits):
    model = nora.inject(
        load(model_dir, bits), AdapterConfig(method="lora", r=2, init_weights=False)
    )
    before = logits(model)
    with pytest.raises(nora.NotMergeableError, match="quantized Linear.*dense weight"):
        nora.merge(model)
    assert not any(w.merged for w in nora.adapter_modules(model).values())
    torch.testing.assert_close(logits(model), before)


def test_quantize_after_inject_and_bad_bits_are_refused(model_dir):
    model = nora.inject(load(model_dir), AdapterConfig(method="lora", r=2))
    with pytest.raises(QuantizationError, match="before injecting"):
        quantize_base(model, 4)
    with pytest.raises(QuantizationError, match="4 or 8"):
        quantize_base(load(model_dir), 3)


def test_bitsandbytes_kernels_warning_is_quiet_without_the_cli():
    """`import nora` (not only `nora.cli`) silences bitsandbytes' "pip install kernels" warning,
    so `python -c "...export_results(...)"` and library users do not see it either."""
    import logging
    import subprocess
    import sys

    code = "import nora, logging; print(logging.getLogger('bitsandbytes.backends.cpu.ops').level)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == logging.ERROR
