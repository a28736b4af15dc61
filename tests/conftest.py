"""Shared fixtures: tiny random models of several Hugging Face families, built in-process.

Tests never touch the network: the hub is forced offline before transformers is imported.
Without a GPU, Triton kernels are tested under its interpreter (set before triton is imported).
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if shutil.which("nvidia-smi") is None:  # no GPU: Triton kernels run in its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def tiny_llama(
    seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = VOCAB, **kw
) -> LlamaForCausalLM:
    """Llama-style, grouped-query attention: v_proj is 32 -> 16 (non-square)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return MistralForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The answer is 42. Calculate 5 - 3 - 6. How many legs are there in total?",
    "You are a helpful assistant. Translate to French: the cat sleeps on the sofa.",
    "x1 = 0.7500\nx2 = 0.5625\nIterate the logistic map with r = 3.72 for 6 steps.",
    "system user assistant #### 28080 pencils boxes apples Mercury planet speed",
]


def make_tokenizer(template: str | None = SMOLLM2_TEMPLATE) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte is encodable
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = template
    return tok


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def save_model_dir(path, layers: int = 2):
    """A tiny Llama + tokenizer saved in Hugging Face layout, as a user's local model folder."""
    tok = make_tokenizer()
    tiny_llama(vocab=len(tok), hidden=64, layers=layers).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 9), generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter parameter random non-zero values (B = 0 would hide bugs)."""
    import nora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in nora.adapter_modules(model).values():
            for p in w.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --- skips CI may not take ------------------------------------------------------------------
# Packages CI installs (scripts/setup.sh test). Under CI (env CI=true), a test that skips
# because one of these cannot be imported FAILS: a broken install must not pass as green.
# Tests that need one of them skip with a reason naming it (pytest.importorskip does).
REQUIRED_IN_CI = ("triton", "vllm", "trl", "bitsandbytes", "lm_eval", "schemathesis")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing_required(reason: str) -> str | None:
    """The required package a skip reason blames, if that package cannot be imported here."""
    import importlib.util
    import re

    for pkg in REQUIRED_IN_CI:
        if re.search(rf"\b{pkg}\b", reason, re.I) and (
            f"could not import '{pkg}'" in reason or importlib.util.find_spec(pkg) is None
        ):
            return pkg
    return None


def _fail_required_skip(report) -> None:
    if not (_in_ci() and report.skipped) or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2])
    pkg = _missing_required(reason)
    if pkg is not None:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI, but CI must install {pkg!r} (REQUIRED_IN_CI in tests/conftest.py): "
            f"{reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_required_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole file at collection
    _fail_required_skip(outcome.get_result())
