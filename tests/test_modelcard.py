"""Model cards (nora.modelcard): every method's card parses with huggingface_hub's own parser
and says what the adapter is; `save_adapter`, `nora train`, PEFT's `save_pretrained` and TRL
(tests/test_trl.py) write one; a README.md someone wrote is never touched; a failed write
leaves the old card; training checkpoints get none."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_llama
from huggingface_hub import ModelCard

import nora
from nora import modelcard
from nora.adapters import METHODS
from nora.modelcard import MARKER, TrainingInfo
from nora.models import DEFAULT_HUB_ID, hub_identity
from nora.train import TrainConfig, train

BASE = "org/tiny-base"  # a Hub id, as base_model_name_or_path records it

# (method, placement): every registered method at weight level, and module-level LoRA
CASES = [(m, "weight") for m in METHODS] + [("lora", "module"), ("nora", "module")]


def saved(tmp_path, method="nora", placement="weight", **kw) -> Path:
    model = tiny_llama()
    cfg = nora.AdapterConfig(
        method=method, r=4, placement=placement, base_model_name_or_path=BASE, **kw
    )
    nora.inject(model, cfg)
    return nora.save_adapter(model, tmp_path / f"{method}-{placement}")


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


@pytest.mark.parametrize(("method", "placement"), CASES)
def test_every_methods_card_parses_and_describes_the_adapter(method, placement, tmp_path):
    folder = saved(tmp_path, method, placement)
    cls, cfg = METHODS[method], nora.read_config(folder)
    card = ModelCard.load(folder / "README.md")  # the Hub's own parser
    assert card.data.base_model == BASE
    assert card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation"
    want = list(dict.fromkeys(["nora", method]))  # method "nora": one tag
    assert card.data.tags[: len(want)] == want
    assert f"base_model:adapter:{BASE}" in card.data.tags
    text = card.text
    assert text.lstrip().startswith(MARKER)
    assert f"```text\n{cls.formula}\n```" in text  # the method file's own math
    for row in (
        f"| rank r | {cfg.r} |",
        f"`{cfg.target_modules[0]}`",
        f"| dropout p | {cfg.dropout:.4g} |",
    ):
        assert row in text
    assert f"| scale s | {cfg.effective_scale:g}" in text
    n = nora.count_parameters(nora.load_adapter(tiny_llama(), folder, is_trainable=True))
    assert f"| trainable parameters | {n.trainable:,} |" in text
    merging = section(text, "Merging")
    assert merging.startswith("Not possible") == (not cls.mergeable or placement != "weight")
    assert ("approximate_merge=True" in merging) == (
        cls.approximately_mergeable and placement == "weight"
    )
    loading = section(text, "How to load")
    plain_peft = nora.checkpoint.peft_type(cfg) == "LORA"
    assert ("import nora.peft" in loading) == (not plain_peft)
    assert ("vllm serve" in loading) == (cls.shrinks and placement == "weight")
    assert "## Training" not in text and "## Evaluation" not in text  # nothing known


def test_formula_is_the_indented_block_of_the_method_files_docstring():
    import nora.adapters.nora as nora_file

    assert METHODS["nora"].formula in nora_file.__doc__
    assert METHODS["nora"].formula.startswith("Δ(x) = s · B · D(σ(A·x))")
    assert "sin(ω·z)" in METHODS["loran"].formula and "spline" in METHODS["aurora"].formula
    assert len({c.formula for c in METHODS.values()}) == len(METHODS)  # one per method


@pytest.mark.parametrize(
    "mine",
    [
        "---\nlicense: mit\n---\n# My adapter\n\nNotes I wrote.\n",  # a Hub card of one's own
        "# My adapter\n\nNo header at all.\n",
        "---\nlicense: [mit\n---\nA header YAML cannot read.\n",
    ],
)
def test_a_readme_someone_wrote_is_never_overwritten(mine, tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "README.md").write_text(mine)
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method="nora", r=4))
    nora.save_adapter(model, folder)
    assert (folder / "README.md").read_text() == mine
    assert nora.read_config(folder).r == 4  # the adapter itself was saved
    assert modelcard.write_card(folder) is None  # and a refresh keeps it too
    assert (folder / "README.md").read_text() == mine


def test_a_nora_card_is_rewritten_and_keeps_what_it_knew(tmp_path):
    folder = saved(tmp_path, "nora")
    info = TrainingInfo(data="math", steps=7, lr=3e-4, eval_ppl=12.5, eval_loss=2.526)
    modelcard.write_card(folder, training=info, license="apache-2.0")
    # lm-eval's results beside the adapter (`nora eval --tasks` writes them), then a refresh
    results = {
        "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": "N/A"}},
        "n-shot": {"arc_easy": 0},
        "config": {"limit": 8},
    }
    (folder / "lm_eval_results.json").write_text(json.dumps(results))
    assert modelcard.write_card(folder) == folder / "README.md"
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == BASE
    assert card.data["nora_training"] == info.to_dict()
    assert "| optimizer steps | 7 |" in card.text and "| learning rate | 0.0003 |" in card.text
    assert "**12.5**" in section(card.text, "Evaluation")
    assert "| arc_easy | acc | 0.25 | 0 |" in card.text and "limit 8" in card.text
    # a new adapter saved over it: the card follows (rank 8), the old run's numbers do not
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method="nora", r=8, base_model_name_or_path=BASE))
    nora.save_adapter(model, folder)
    text = (folder / "README.md").read_text()
    assert "| rank r | 8 |" in text and "## Training" not in text and "arc_easy" not in text


def test_a_card_with_its_marker_deleted_is_the_users(tmp_path):
    folder = saved(tmp_path, "lora")
    edited = (folder / "README.md").read_text().replace(MARKER, "") + "\nMy notes.\n"
    (folder / "README.md").write_text(edited)
    modelcard.write_card(folder, training=TrainingInfo(steps=3))
    assert (folder / "README.md").read_text() == edited


def test_a_failed_card_write_leaves_the_old_card(tmp_path, monkeypatch):
    folder = saved(tmp_path, "nolora")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = os.replace

    def disk_full(src, dst):
        if Path(dst).name == "README.md":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        modelcard.write_card(folder, training=TrainingInfo(steps=5))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp file left


def test_save_adapter_card_false_writes_no_card(tmp_path):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method="nora", r=4))
    nora.save_adapter(model, tmp_path / "a", card=False)
    assert not (tmp_path / "a" / "README.md").exists()


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("smollm2-135m", (DEFAULT_HUB_ID, "apache-2.0")),
        ("HuggingFaceTB/SmolLM2-360M", ("HuggingFaceTB/SmolLM2-360M", None)),
        ("./models/mine", (None, None)),
        ("", (None, None)),
    ],
)
def test_hub_identity(name, want):
    assert hub_identity(name) == want


def test_hub_identity_of_the_default_cache_folder_and_a_local_folder(tmp_path):
    cache = tmp_path / "smollm2-135m-instruct"
    cache.mkdir()
    (cache / "nora_cache.json").write_text('{"source": "/x/SmolLM2-135M-Instruct.Q4_1.gguf"}')
    assert hub_identity(str(cache)) == (DEFAULT_HUB_ID, "apache-2.0")
    (tmp_path / "org").mkdir()
    assert hub_identity(str(tmp_path / "org")) == (None, None)


def test_train_writes_a_card_with_its_steps_rate_and_perplexity(tmp_path):
    tok = make_tokenizer()
    cfg = TrainConfig(
        adapter=nora.AdapterConfig(method="nora", r=4),
        data="logistic-map",
        n_train=8,
        n_eval=4,
        max_len=300,
        max_steps=2,
        batch_size=4,
        lr=2e-3,
        save_every=1,
        output_dir=str(tmp_path / "run"),
    )
    result = train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, progress=False)
    card = ModelCard.load(tmp_path / "run" / "adapter" / "README.md")
    assert card.data.tags == ["nora"] and card.data.base_model is None  # an in-memory model
    assert card.data["nora_training"]["steps"] == 2 and card.data["nora_training"]["lr"] == 2e-3
    training = section(card.text, "Training")
    assert "| optimizer steps | 2 |" in training and "| learning rate | 0.002 |" in training
    assert "`logistic-map` (8 examples, ≤ 300 tokens each)" in training
    assert "| examples per step | 4 |" in training
    assert f"**{result.eval_ppl:.4g}**" in section(card.text, "Evaluation")
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts and not any((c / "README.md").exists() for c in ckpts)  # no card there


def test_peft_save_pretrained_writes_a_nora_card(tmp_path):
    from peft import PeftModel, get_peft_model

    from nora.peft import NoraConfig

    model = get_peft_model(tiny_llama(), NoraConfig(method="aurora", r=2))
    model.save_pretrained(tmp_path / "p")
    card = ModelCard.load(tmp_path / "p" / "README.md")
    assert MARKER in card.text and card.data.tags[:2] == ["nora", "aurora"]
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert METHODS["aurora"].formula in card.text
    n = nora.count_parameters(model).trainable
    assert f"| trainable parameters | {n:,} |" in card.text  # counted from PEFT's weights file
    assert "### Framework versions" not in card.text  # PEFT's stock card was replaced
    model.save_pretrained(tmp_path / "p")  # again: PEFT updates nora's card, nora rewrites it
    again = ModelCard.load(tmp_path / "p" / "README.md")
    assert again.data.tags[:2] == ["nora", "aurora"] and "### Framework versions" not in again.text
    assert isinstance(PeftModel.from_pretrained(tiny_llama(), tmp_path / "p"), PeftModel)


def test_peft_save_pretrained_keeps_a_users_readme(tmp_path):
    from peft import get_peft_model

    from nora.peft import NoraConfig

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "README.md").write_text("# Mine\n\nWhat I trained and why.\n")
    get_peft_model(tiny_llama(), NoraConfig(method="nora", r=2)).save_pretrained(tmp_path / "p")
    text = (tmp_path / "p" / "README.md").read_text()
    assert "What I trained and why." in text and MARKER not in text  # PEFT adds its lines only
