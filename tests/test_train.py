"""The training loop and evaluation: exact resume after SIGKILL and Ctrl-C, NaN stop,
config checks, perplexity checked against a hand computation, and batched greedy accuracy
against one-prompt-at-a-time decoding."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, tiny_llama
from safetensors.torch import load_file

import nora
from nora.data import Example, build_splits, collate, extract_final_answer
from nora.data.tokenization import prompt_ids
from nora.evaluate import accuracy, batch_nll, generate, perplexity, supports_fast_nll
from nora.train import TrainConfig, TrainingError, micro_batch_indices, train

TESTS = Path(__file__).parent


def setup(tmp_path, name="run", **kw):
    tok = make_tokenizer()
    model = tiny_llama(vocab=len(tok), hidden=64)
    cfg = dict(
        adapter=nora.AdapterConfig(method="nora", r=8, dropout=0.2),
        data="logistic-map",
        n_train=48,
        n_eval=8,
        max_len=300,
        max_steps=12,
        batch_size=4,
        lr=3e-3,
        save_every=3,
        output_dir=str(tmp_path / name),
    )
    cfg.update(kw)
    return TrainConfig(**cfg), model, tok


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the target every interrupted-and-resumed run must reach."""
    cfg, model, tok = setup(tmp_path_factory.mktemp("ref"))
    summary = train(cfg, model=model, tokenizer=tok, progress=False)
    return cfg, summary, final_weights(cfg.output_dir)


def test_run_writes_metrics_summary_and_adapter(reference):
    cfg, summary, _ = reference
    out = Path(cfg.output_dir)
    assert {p.name for p in out.iterdir()} >= {
        "train_config.json",
        "metrics.jsonl",
        "summary.json",
        "adapter",
        "checkpoints",
    }
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [eval(line.replace("null", "None"))["step"] for line in lines]
    assert steps[:12] == list(range(1, 13))
    assert summary.steps == 12 and summary.trainable_params == 2 * 8 * (64 + 64 + 64 + 32)
    assert math.isfinite(summary.eval_ppl) and summary.tok_per_s > 0
    assert len(list((out / "checkpoints").glob("step-*"))) == cfg.keep_checkpoints
    model = nora.load_adapter(tiny_llama(vocab=len(make_tokenizer()), hidden=64), out / "adapter")
    assert nora.get_config(model).method == "nora"


def test_training_lowers_heldout_perplexity(tmp_path):
    cfg, model, tok = setup(tmp_path, max_steps=25, lr=1e-2)
    _, eval_set, _ = build_splits(tok, cfg.data, cfg.n_train, cfg.n_eval, cfg.max_len, seed=0)
    base = perplexity(model, [collate(eval_set, tok.pad_token_id)]).ppl
    summary = train(cfg, model=model, tokenizer=tok, progress=False)
    assert summary.eval_ppl < 0.9 * base


WORKER = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, {tests!r})
    from test_train import setup
    from nora.train import train
    from pathlib import Path

    def pause_at_6(step, m):
        if step == 6:  # after step 6's checkpoint: say so, then wait to be killed
            print("step 6", flush=True)
            threading.Event().wait()

    cfg, model, tok = setup(Path({tmp!r}))
    train(cfg, model=model, tokenizer=tok, progress=False, on_step=pause_at_6)
""")


def resumed_run(tmp_path, **kw):
    """Run again in the same folder; returns its config, summary and the steps it ran."""
    cfg, model, tok = setup(tmp_path, **kw)
    ran: list[int] = []
    summary = train(
        cfg, model=model, tokenizer=tok, progress=False, on_step=lambda s, _: ran.append(s)
    )
    return cfg, summary, ran


def test_sigkill_then_resume_ends_with_the_same_weights(reference, tmp_path):
    _, _, ref_weights = reference
    code = WORKER.format(tests=str(TESTS), tmp=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=TESTS.parent, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "step 6\n", "worker ended before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "run" / "adapter").exists()  # it really died mid-run
    cfg, summary, ran = resumed_run(tmp_path)
    assert ran == list(range(7, 13))  # it started after the checkpoint, not from step 0
    assert summary.steps == 12
    assert_same_weights(final_weights(cfg.output_dir), ref_weights)


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(reference, tmp_path):
    _, _, ref_weights = reference
    cfg, model, tok = setup(tmp_path, save_every=0)

    def interrupt(step, _):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingError, match="interrupted at step 5; checkpoint saved"):
        train(cfg, model=model, tokenizer=tok, progress=False, on_step=interrupt)
    assert (Path(cfg.output_dir) / "checkpoints" / "step-000005").is_dir()
    cfg, _, ran = resumed_run(tmp_path, save_every=0)
    assert ran == list(range(6, 13))  # it started after the checkpoint, not from step 0
    recs = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").open()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))  # each step once
    assert_same_weights(final_weights(cfg.output_dir), ref_weights)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg, model, tok = setup(tmp_path, save_every=2)

    def poison(step, m):
        if step == 4:
            with torch.no_grad():
                next(iter(nora.adapter_modules(m).values())).adapter.lora_B.weight.fill_(
                    float("nan")
                )

    with pytest.raises(TrainingError, match="loss is nan at step 5.*step-000004"):
        train(cfg, model=model, tokenizer=tok, progress=False, on_step=poison)
    good = load_file(
        Path(cfg.output_dir) / "checkpoints" / "step-000004" / "adapter_model.safetensors"
    )
    assert all(torch.isfinite(v).all() for v in good.values())


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg, model, tok = setup(tmp_path, max_steps=3)
    train(cfg, model=model, tokenizer=tok, progress=False)
    cfg, model, tok = setup(tmp_path, max_steps=3, lr=1e-4)
    with pytest.raises(TrainingError, match=r"different config \(differs in \['lr'\]\)"):
        train(cfg, model=model, tokenizer=tok, progress=False)
    # a damaged train_config.json: a TrainingError naming the file, the folder left as it was
    out = Path(cfg.output_dir)
    f = out / "train_config.json"
    f.write_text('{"lr": 0.01,')
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(TrainingError, match=r"train_config.json is not valid JSON"):
        train(cfg, model=model, tokenizer=tok, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before and f.read_text() == '{"lr": 0.01,'


@pytest.mark.parametrize(
    "field,value", [("max_steps", 0), ("batch_size", 0), ("lr", 0.0), ("warmup_ratio", 1.5)]
)
def test_bad_training_settings(field, value, tmp_path):
    cfg, model, tok = setup(tmp_path, **{field: value})
    with pytest.raises(TrainingError, match=field):
        train(cfg, model=model, tokenizer=tok, progress=False)


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(
    "env,kw,match",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}, "not run under DeepSpeed: it is not installed"),
        ({"ACCELERATE_USE_MEGATRON_LM": "true"}, {}, "not run under Megatron-LM"),
        ({"ACCELERATE_USE_FSDP": "true"}, {}, "not FSDP version 1: pass --fsdp_version 2"),
        ({**FSDP2, "FSDP_VERSION": "1"}, {}, "not FSDP version 1"),
        (FSDP2, {"load_in_8bit": True}, "--load-in-8bit cannot be sharded"),
        (FSDP2, {"prefix": object()}, "a prefix cache runs the top layers alone"),
        (FSDP2, {"teacher": "teacher.safetensors"}, "distillation swaps the teacher's weights"),
    ],
    ids=["deepspeed", "megatron", "fsdp-default-version", "fsdp1", "fsdp-8bit", "fsdp-prefix"]
    + ["fsdp-teacher"],
)
def test_unsupported_parallelism_is_refused_before_anything_runs(
    env, kw, match, tmp_path, monkeypatch
):
    """What `accelerate launch` asks through its environment: refused with the reason before
    a model is loaded or a file written."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    prefix = kw.pop("prefix", None)
    cfg, model, tok = setup(tmp_path, max_steps=1, **kw)
    with pytest.raises(TrainingError, match=match):
        train(cfg, model=model, tokenizer=tok, progress=False, prefix=prefix)
    assert not Path(cfg.output_dir).exists()


def test_fsdp_in_one_process_trains_unsharded(tmp_path, monkeypatch):
    """`--use_fsdp` with one process: nothing to shard across, the plain one-process run."""
    for k, v in FSDP2.items():
        monkeypatch.setenv(k, v)
    cfg, model, tok = setup(tmp_path, max_steps=2, n_train=8)
    result = train(cfg, model=model, tokenizer=tok, progress=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    cfg, model, tok = setup(tmp_path, "plain", max_steps=2, n_train=8)
    plain = train(cfg, model=model, tokenizer=tok, progress=False)
    assert [r.loss for r in result.history] == [r.loss for r in plain.history]


def test_micro_batches_are_a_pure_function_of_the_step():
    a = [micro_batch_indices(10, 4, 0, m) for m in range(4)]
    assert a == [micro_batch_indices(10, 4, 0, m) for m in range(4)]
    assert a[0] + a[1] != a[2] + a[3]  # the next epoch is a new permutation
    assert len(set(a[0] + a[1])) == 8 and all(len(b) == 4 for b in a)  # no repeats in an epoch
    assert micro_batch_indices(10, 4, 1, 0) != a[0]


# --- perplexity -----------------------------------------------------------------------------


def test_perplexity_matches_a_hand_computation():
    tok = make_tokenizer()
    model = tiny_llama(vocab=len(tok), hidden=64)
    _, eval_set, _ = build_splits(tok, "logistic-map", 1, 5, 300, seed=3)
    batch = collate(eval_set, tok.pad_token_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = 0.0, 0
    for b in range(logits.shape[0]):  # token by token, in float64
        for t in range(logits.shape[1] - 1):
            y = int(batch["labels"][b, t + 1])
            if y != -100:
                total -= float(F.log_softmax(logits[b, t].double(), -1)[y])
                count += 1
    res = perplexity(
        model, [collate(eval_set[:2], tok.pad_token_id), collate(eval_set[2:], tok.pad_token_id)]
    )
    assert res.tokens == count
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_fast_head_only_loss_equals_the_full_forward():
    tok = make_tokenizer()
    model = tiny_llama(vocab=len(tok), hidden=64)
    nora.inject(model, nora.AdapterConfig(method="nora", r=4, init_weights=False))
    train_set, _, _ = build_splits(tok, "logistic-map", 4, 1, 300)
    batch = collate(train_set, tok.pad_token_id)
    assert supports_fast_nll(model, batch)
    with torch.no_grad():
        fast, n1 = batch_nll(model, batch, fast=True)
        full, n2 = batch_nll(model, batch, fast=False)
    assert n1 == n2 and torch.allclose(fast, full, rtol=1e-5)


def test_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    from nora import train as train_mod

    cfg, model, tok = setup(tmp_path, save_every=2, max_steps=4)
    real = train_mod.save_file

    def disk_full_at_step_4(tensors, path, metadata=None):
        if "step-000004" in str(path):
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(train_mod, "save_file", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space"):
        train(cfg, model=model, tokenizer=tok, progress=False)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]  # no half-written folder
    assert (ckpts / "step-000002" / "training_state.json").is_file()


# --- accuracy -------------------------------------------------------------------------------


def greedy_by_hand(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding one full forward per token: no batch, no padding, no KV cache."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([out])).logits[0, -1].argmax())
            if t == eos:
                break
            out.append(t)
    return out[len(ids) :]


def test_batched_greedy_generation_and_scores_line_up(tmp_path):
    tok = make_tokenizer()
    # larger initial weights than the default 0.02: the answers then depend on the prompt
    model = tiny_llama(vocab=len(tok), hidden=64, initializer_range=0.2)
    questions = [
        "a",
        "Calculate 5 - 3 - 6.",
        "The answer is",
        "x1 = 0.7500\nx2 = 0.5625\nIterate the logistic map.",
        "How many legs are there in total?",
    ]
    examples = [Example([{"role": "user", "content": q}], response="") for q in questions]
    prompts = [prompt_ids(tok, ex.messages) for ex in examples]
    assert len({len(p) for p in prompts}) == len(prompts)  # every batch is left-padded
    eos = model.generation_config.eos_token_id
    hand = [greedy_by_hand(model, p, 6, eos) for p in prompts]
    texts = [tok.decode(h, skip_special_tokens=True) for h in hand]
    assert all(texts) and len(set(texts)) == len(texts)  # non-empty and told apart
    # batches of 3: one full and one ragged batch, both left-padded
    assert generate(model, tok, prompts, max_new_tokens=6, batch_size=3) == texts
    # gold answers: right for examples 0, 2, 4, wrong for 1, 3: the scores must say so, in order
    for i, (ex, text) in enumerate(zip(examples, texts, strict=True)):
        ex.answer = extract_final_answer(text) if i % 2 == 0 else "no such answer"
    res = accuracy(model, tok, examples, 6, batch_size=3, samples_path=tmp_path / "s.jsonl")
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").open()]
    assert [s["prompt"] for s in samples] == questions
    assert [s["completion"] for s in samples] == texts
    assert [s["score"] for s in samples] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert res == {"accuracy": 3 / 5, "n": 5}
