"""The frozen-prefix cache: exact (same logits, same trained weights), and refused where not."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, tiny_llama

import nora
from nora.data import build_splits
from nora.prefix_cache import PrefixCache, PrefixCacheError
from nora.train import TrainConfig, TrainingError, train


@pytest.fixture(scope="module")
def data():
    tok = make_tokenizer()
    train_set, eval_set, _ = build_splits(tok, "logistic-map", 24, 6, 300, seed=0)
    return tok, train_set, eval_set


def model_for(tok, seed=0):
    return tiny_llama(seed=seed, vocab=len(tok), hidden=64, layers=4)


def test_cached_top_pass_equals_full_model(data):
    tok, train_set, _ = data
    model = model_for(tok)
    nora.inject(
        model,
        nora.AdapterConfig(method="nora", r=4, layers_to_transform=[2, 3], init_weights=False),
    )
    cache = PrefixCache(model, 2)
    assert cache.verify(train_set[0], tok.pad_token_id)
    cache.encode(train_set[:5], tok.pad_token_id, batch_size=2)
    batch = cache.collate(train_set[:5], tok.pad_token_id)
    with torch.no_grad():
        full = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with cache.top_only():
            top = model(
                inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]
            ).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(top[mask], full[mask], rtol=1e-4, atol=1e-5)
    assert len(model.model.layers) == 4  # the layer list is back


def test_training_with_the_cache_gives_the_same_adapter(data, tmp_path):
    tok, train_set, eval_set = data
    results = []
    for use_cache in (False, True):
        model = model_for(tok)
        cfg = TrainConfig(
            adapter=nora.AdapterConfig(method="nora", r=4, dropout=0.1, layers_to_transform=[2, 3]),
            max_steps=5,
            batch_size=4,
            lr=1e-2,
            output_dir=str(tmp_path / str(use_cache)),
        )
        prefix = None
        if use_cache:
            prefix = PrefixCache(model, 2)
            prefix.encode(train_set + eval_set, tok.pad_token_id)
        s = train(
            cfg,
            model=model,
            tokenizer=tok,
            progress=False,
            splits=(train_set, eval_set),
            prefix=prefix,
        )
        results.append((s.eval_ppl, nora.adapter_state_dict(model)))
    (ppl0, w0), (ppl1, w1) = results
    assert ppl1 == pytest.approx(ppl0, rel=1e-5)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-6)


def test_cache_below_the_adapted_layers_is_refused(data, tmp_path):
    tok, train_set, eval_set = data
    model = model_for(tok)
    cfg = TrainConfig(
        adapter=nora.AdapterConfig(method="nora", r=4, layers_to_transform=[1, 3]),
        max_steps=1,
        batch_size=4,
        output_dir=str(tmp_path),
    )
    with pytest.raises(TrainingError, match="skips layers below 2"):
        train(
            cfg,
            model=model,
            tokenizer=tok,
            progress=False,
            splits=(train_set, eval_set),
            prefix=PrefixCache(model, 2),
        )


def test_bad_split_points_and_dropout(data):
    tok, *_ = data
    with pytest.raises(PrefixCacheError, match="first_layer must be in 1..3"):
        PrefixCache(model_for(tok), 4)
    with pytest.raises(PrefixCacheError, match="dropout"):
        PrefixCache(tiny_llama(vocab=len(tok), layers=4, attention_dropout=0.1).train(), 2)


def test_layer_list_is_restored_after_an_error(data):
    tok, *_ = data
    model = model_for(tok)
    cache = PrefixCache(model, 2)
    with pytest.raises(RuntimeError), cache.top_only():
        assert len(model.model.layers) == 2
        raise RuntimeError("boom")
    assert len(model.model.layers) == 4 and model.model.layers is cache.layers
