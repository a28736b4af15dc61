"""TRL's SFTTrainer trains a NoRA adapter through the PEFT bridge; nora loads and serves the result."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, tiny_llama
from huggingface_hub import ModelCard

import nora
from nora.modelcard import MARKER
from nora.peft import NoraConfig
from nora.serving import AdapterStore, Engine, MultiAdapterModel, SamplingParams

trl = pytest.importorskip("trl")

QA = [
    ("What is 2 + 3?", "5"),
    ("Translate to French: the cat", "le chat"),
    ("Name the closest planet to the sun.", "Mercury"),
    ("How many legs does a cat have?", "4"),
    ("What is 6 times 7?", "42"),
    ("Say hello.", "hello"),
]


def chat_dataset():
    """Conversational prompt/completion pairs: TRL masks the prompt (completion-only loss)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": q}],
                "completion": [{"role": "assistant", "content": a}],
            }
            for q, a in QA
        ]
    )


def sft(tok, out_dir, steps=4, **peft_kw):
    torch.manual_seed(0)
    args = trl.SFTConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=3,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; nora trains float32 on CPU
        max_length=256,  # the template's system prompt alone is ~100 tokens here
        completion_only_loss=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=tiny_llama(vocab=len(tok)),
        args=args,
        train_dataset=chat_dataset(),
        processing_class=tok,
        peft_config=NoraConfig(method="nora", r=4, target_modules=["q_proj", "v_proj"], **peft_kw),
    )
    return trainer


def test_sft_trainer_trains_nora_with_completion_only_loss_and_nora_serves_it(tmp_path):
    tok = make_tokenizer()
    trainer = sft(tok, tmp_path / "run")
    model = trainer.model
    assert type(model.base_model).__name__ == "NoraTuner"
    assert trainer.args.completion_only_loss

    # the collator masks every prompt token: only the assistant's answer is in the loss
    batch = next(iter(trainer.get_train_dataloader()))
    labels, ids = batch["labels"], batch["input_ids"]
    for row, lab in zip(ids, labels, strict=True):
        kept = tok.decode(row[lab != -100])
        assert 0 < (lab != -100).sum() < (row != tok.pad_token_id).sum()
        assert "user" not in kept and any(a in kept for _, a in QA)

    b_before = [w.adapter.lora_B.weight.clone() for w in nora.adapter_modules(model).values()]
    assert all(torch.count_nonzero(b) == 0 for b in b_before)  # B starts at zero
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(
        torch.count_nonzero(w.adapter.lora_B.weight) > 0
        for w in nora.adapter_modules(model).values()
    )

    root = tmp_path / "adapters"
    trainer.save_model(str(root / "sft"))
    assert nora.read_config(root / "sft").method == "nora"
    card = ModelCard.load(root / "sft" / "README.md")  # nora's model card, through PEFT's save
    assert card.data.tags[0] == "nora" and MARKER in card.text

    # nora loads the folder TRL wrote and reproduces the trained model exactly
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QA[0][0]}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        loaded = nora.load_adapter(tiny_llama(vocab=len(tok)), root / "sft").eval()
        assert torch.equal(loaded(input_ids=ids).logits, want)
        ref = loaded.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[
            0, ids.shape[1] :
        ]

    # and nora's serving engine (what `nora serve` runs) serves it: greedy tokens match HF generate
    store = AdapterStore(MultiAdapterModel(tiny_llama(vocab=len(tok))), root)
    engine = Engine(store.multi, tok, store)
    (req,) = engine.generate(
        [ids[0].tolist()], ["sft"], SamplingParams(max_tokens=6, ignore_eos=True)
    )
    assert req.output_ids == ref.tolist()


@pytest.mark.slow
def test_sft_trainer_on_the_embedded_default(tmp_path):
    """The issue's setting: SmolLM2-135M-Instruct, a few SFT steps of NoRA on chat data."""
    from nora.models import load_base_model

    model, tok = load_base_model(dtype="float32", device="cpu")
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=128,
        completion_only_loss=True,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=chat_dataset(),
        processing_class=tok,
        peft_config=NoraConfig(method="nora", r=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    trainer.save_model(str(tmp_path / "adapters" / "sft"))

    ids = tok.apply_chat_template(
        [{"role": "user", "content": QA[4][0]}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    trained = trainer.model.eval()
    fresh, _ = load_base_model(dtype="float32", device="cpu")
    loaded = nora.load_adapter(fresh, tmp_path / "adapters" / "sft").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0
        )
        ref = loaded.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    base, _ = load_base_model(dtype="float32", device="cpu")
    store = AdapterStore(MultiAdapterModel(base), tmp_path / "adapters")
    (req,) = Engine(store.multi, tok, store).generate(
        [ids[0].tolist()], ["sft"], SamplingParams(max_tokens=5, ignore_eos=True)
    )
    assert req.output_ids == ref[0, ids.shape[1] :].tolist()
