"""nora export: merged HF model folders (lora, loran), llama.cpp GGUF LoRA files, clear refusals."""

from __future__ import annotations

from types import SimpleNamespace

import gguf
import pytest
import torch
from conftest import make_tokenizer, randomize, tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.export import ExportError, _umask, lora_to_gguf, merge_to_folder, permute_rows

NON_LINEAR = {
    "nora": dict(method="nora", r=4),
    "nolora": dict(method="nolora", r=4),
    "aurora": dict(method="aurora", r=4),
    "lora-module": dict(method="lora", r=4, placement="module"),
}


def saved(tmp_path, base=tiny_llama, name="adapter", **spec):
    model = nora.inject(base(), nora.AdapterConfig(**spec))
    randomize(model)
    nora.save_adapter(model, tmp_path / name)
    return model, tmp_path / name


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize(
    "spec",
    [
        dict(method="lora", r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
        dict(method="loran", r=4, sinter_a=0.05, sinter_omega=3.0),
    ],
)
def test_merged_folder_is_a_plain_model_with_the_adapters_outputs(spec, tmp_path, ids):
    adapted, adapter = saved(tmp_path, **spec)
    tok = make_tokenizer()
    out = merge_to_folder(adapter, tmp_path / "merged", tiny_llama(), tok)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's private 0700
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~_umask() for f in out.iterdir())
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(tiny_llama(), ids))


@pytest.mark.parametrize("name", sorted(NON_LINEAR))
def test_non_linear_methods_are_refused_with_the_serving_hint(name, tmp_path):
    _, adapter = saved(tmp_path, **NON_LINEAR[name])
    for attempt in (
        lambda: merge_to_folder(adapter, tmp_path / "merged", tiny_llama()),
        lambda: lora_to_gguf(adapter, tmp_path / "a.gguf", tiny_llama().config),
    ):
        with pytest.raises(ExportError, match="serve it unmerged with `nora serve`"):
            attempt()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing written


def test_loran_to_gguf_points_to_the_merged_folder(tmp_path):
    _, adapter = saved(tmp_path, method="loran", r=4)
    with pytest.raises(ExportError, match="full-rank ΔW"):
        lora_to_gguf(adapter, tmp_path / "a.gguf", tiny_llama().config)


def test_merge_never_overwrites(tmp_path):
    _, adapter = saved(tmp_path, method="lora", r=4)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        merge_to_folder(adapter, tmp_path / "merged", tiny_llama())
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["keep.txt"]


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_gguf_lora_follows_llama_cpp_conventions(tmp_path):
    spec = dict(
        method="lora", r=4, alpha=12.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    adapted, adapter = saved(tmp_path, **spec)
    base = tiny_llama()  # 4 heads, 2 kv heads, head_dim 8
    out = lora_to_gguf(adapter, tmp_path / "lora.gguf", base.config)
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    reader = gguf.GGUFReader(out)
    kv = _fields(reader)
    assert kv["general.type"] == "adapter" and kv["general.architecture"] == "llama"
    assert kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == pytest.approx(12.0)

    tensors = {t.name: t for t in reader.tensors}
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    assert set(tensors) == {
        f"blk.{i}.{short[m]}.weight.lora_{ab}" for i in (0, 1) for m in short for ab in "ab"
    }
    heads = {"q_proj": 4, "k_proj": 2}
    for i in (0, 1):
        for m, g in short.items():
            w = adapted.get_submodule(f"model.layers.{i}.self_attn.{m}")
            A, B = w.adapter.lora_A.weight, w.adapter.lora_B.weight  # (r, k), (d, r)
            a, b = tensors[f"blk.{i}.{g}.weight.lora_a"], tensors[f"blk.{i}.{g}.weight.lora_b"]
            # GGUF lists dims innermost first, as llama.cpp's shape check reads them
            assert list(a.shape) == [A.shape[1], A.shape[0]] and list(b.shape) == [
                B.shape[1],
                B.shape[0],
            ]
            assert a.tensor_type == gguf.GGMLQuantizationType.F32
            a_t, b_t = torch.from_numpy(a.data.copy()), torch.from_numpy(b.data.copy())
            torch.testing.assert_close(a_t, A.detach(), rtol=0, atol=0)
            # llama.cpp computes W' = W_gguf + (alpha/r)·b·a, with q/k rows in its RoPE order
            dw = w.adapter.delta_weight().detach()
            want = permute_rows(dw, heads[m]) if m in heads else dw
            torch.testing.assert_close(12.0 / 4 * b_t @ a_t, want, rtol=1e-5, atol=1e-6)


def test_permute_rows_is_a_per_head_interleave():
    w = torch.arange(16.0).reshape(8, 2)  # 2 heads of 4 rows: [0 1 | 2 3] per head
    rows = permute_rows(w, 2)[:, 0].long().tolist()
    assert rows == [0, 4, 2, 6, 8, 12, 10, 14]  # halves of each head interleaved


def test_gguf_qwen2_names_and_no_permutation(tmp_path):
    adapted, adapter = saved(
        tmp_path, base=tiny_qwen2, method="lora", r=2, target_modules=["q_proj"]
    )
    reader = gguf.GGUFReader(lora_to_gguf(adapter, tmp_path / "q.gguf", tiny_qwen2().config))
    assert _fields(reader)["general.architecture"] == "qwen2"
    b = {t.name: t for t in reader.tensors}["blk.0.attn_q.weight.lora_b"]
    B = adapted.get_submodule("model.layers.0.self_attn.q_proj").adapter.lora_B.weight
    torch.testing.assert_close(torch.from_numpy(b.data.copy()), B.detach(), rtol=0, atol=0)


def test_gguf_refuses_an_architecture_llama_cpp_mapping_is_unknown_for(tmp_path):
    _, adapter = saved(tmp_path, method="lora", r=2)
    cfg = SimpleNamespace(model_type="phi3", num_attention_heads=4, num_hidden_layers=2)
    with pytest.raises(ExportError, match="GGUF LoRA export supports"):
        lora_to_gguf(adapter, tmp_path / "x.gguf", cfg)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_merged_gguf_and_refusal(tmp_path, ids):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    make_tokenizer().save_pretrained(base_dir)
    adapted, lora = saved(tmp_path, name="lora", method="lora", r=4)
    _, non_linear = saved(tmp_path, name="nora", method="nora", r=4)
    run = CliRunner().invoke

    res = run(app, ["export", str(lora), str(tmp_path / "merged"), "--model", str(base_dir)])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), rtol=1e-5, atol=1e-5)

    res = run(
        app, ["export", str(lora), str(tmp_path / "l.gguf"), "--gguf", "--model", str(base_dir)]
    )
    assert res.exit_code == 0, res.output
    assert _fields(gguf.GGUFReader(tmp_path / "l.gguf"))["adapter.type"] == "lora"

    res = run(app, ["export", str(non_linear), str(tmp_path / "n"), "--model", str(base_dir)])
    assert res.exit_code == 2 and "nora serve" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "n").exists()


@pytest.mark.slow
def test_gguf_lora_fits_the_embedded_default_as_llama_cpp_checks_it(tmp_path):
    """Every adapter tensor pairs with a base tensor of the default's own GGUF (written by
    llama.cpp's converter) with the shapes llama.cpp's loader demands, and our q/k row
    permutation reproduces that file's q/k weights from the HF ones."""
    from gguf.quants import dequantize

    from nora.models import gguf_path, load_base_model

    model, _ = load_base_model(dtype="float32", device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    nora.inject(model, nora.AdapterConfig(method="lora", r=8, target_modules=targets))
    randomize(model)
    nora.save_adapter(model, tmp_path / "a")
    nora.unload(model)
    lora = gguf.GGUFReader(lora_to_gguf(tmp_path / "a", tmp_path / "a.gguf", model.config))
    base = gguf.GGUFReader(gguf_path())
    assert _fields(lora)["general.architecture"] == _fields(base)["general.architecture"]
    base_t = {t.name: t for t in base.tensors}
    pairs = {t.name.rsplit(".", 1)[0] for t in lora.tensors}
    assert len(pairs) == 7 * model.config.num_hidden_layers
    lora_t = {t.name: t for t in lora.tensors}
    for name in pairs:
        w, a, b = base_t[name], lora_t[name + ".lora_a"], lora_t[name + ".lora_b"]
        assert w.shape[0] == a.shape[0] and w.shape[1] == b.shape[1] and a.shape[1] == b.shape[0]

    cfg = model.config
    for hf, g, n in [
        ("q_proj", "attn_q", cfg.num_attention_heads),
        ("k_proj", "attn_k", cfg.num_key_value_heads),
    ]:
        t = base_t[f"blk.3.{g}.weight"]
        w_gguf = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        w_hf = model.get_submodule(f"model.layers.3.self_attn.{hf}").weight.detach()
        torch.testing.assert_close(permute_rows(w_hf, n), w_gguf, rtol=0, atol=1e-6)
        assert not torch.allclose(w_hf, w_gguf)  # the permutation is real
