"""The generation engine: KV-cached greedy/sampled decoding, continuous batching, streaming."""

from __future__ import annotations

import gc
import random
import threading

import pytest
import torch
from conftest import tiny_llama

from nora.serving import AdapterStore, Engine, MultiAdapterModel, SamplingParams
from nora.serving.engine import OverloadedError
from nora.serving.sampling import draw as _draw
from serving.common import SPECS, hf_generate, make_dir

PROMPTS = ["hello there", "a", "the quick brown fox", "xyz", "1234567890123456789", "hi!", "ok"]
ADAPTERS = ["nora", "lora", None, "aurora", "loran", "nolora", "nora"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("adapters"), SPECS)


def make_engine(root, tok, max_resident=3, **kw) -> Engine:
    store = AdapterStore(MultiAdapterModel(tiny_llama()), root, max_resident=max_resident)
    return Engine(store.multi, tok, store, **kw)


@pytest.fixture(scope="module")
def greedy_refs(root, tok):
    return [
        hf_generate(root, tok, p, a, 12, do_sample=False)
        for p, a in zip(PROMPTS, ADAPTERS, strict=True)
    ]


def test_greedy_continuous_batching_equals_each_request_alone(root, tok, greedy_refs):
    # 7 requests, 5 adapters, batch of 3 and 3 resident adapters: requests join as others
    # finish (different max_tokens), adapters are loaded and evicted on the way.
    engine = make_engine(root, tok, max_batch=3)
    params = [SamplingParams(max_tokens=12 - (i % 3) * 3, ignore_eos=True) for i in range(7)]
    reqs = engine.generate(PROMPTS, ADAPTERS, params)
    for r, ref, p in zip(reqs, greedy_refs, params, strict=True):
        assert r.output_ids == ref[: p.max_tokens] and r.finish_reason == "length"
        assert r.text == tok.decode(r.output_ids, skip_special_tokens=True)
    assert engine.stats.max_running == 3 and engine.stats.prefills >= 3
    assert engine.store.evictions > 0 and engine.running == 0
    assert all(engine.store.pins(n) == 0 for n in SPECS)


def test_joining_a_running_batch_with_a_longer_prompt(root, tok, greedy_refs):
    # the running rows get left-padded to the newcomer's prompt length, and vice versa
    engine = make_engine(root, tok, max_batch=4)
    first = engine.submit(PROMPTS[1], ADAPTERS[1], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.step()
    engine.step()
    late = [
        engine.submit(PROMPTS[i], ADAPTERS[i], SamplingParams(max_tokens=12, ignore_eos=True))
        for i in (2, 4)
    ]
    engine.run_until_idle()
    assert first.output_ids == greedy_refs[1]
    assert [r.output_ids for r in late] == [greedy_refs[2], greedy_refs[4]]


def test_cache_never_outgrows_the_longest_live_request(root, tok):
    engine = make_engine(root, tok, max_batch=2)
    lengths = []
    for i in range(6):
        engine.submit(PROMPTS[i], ADAPTERS[i], SamplingParams(max_tokens=3 + i, ignore_eos=True))
    while engine.step():
        if engine.rows:
            assert engine.mask.shape[1] == max(s.n_cached for s in engine.batch.seqs)
            for layer in engine.cache.layers:
                assert layer.keys.shape[:3] == (len(engine.rows), 2, engine.mask.shape[1])
            lengths.append(engine.mask.shape[1])
    assert max(lengths) <= max(len(p) for p in PROMPTS) + 8


def test_sampling_with_a_seed_does_not_depend_on_the_batch(root, tok):
    p = SamplingParams(
        max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=7, ignore_eos=True
    )
    alone = make_engine(root, tok).generate([PROMPTS[0]], ["nora"], p)[0]
    engine = make_engine(root, tok, max_batch=4)
    others = SamplingParams(max_tokens=6, temperature=1.0, seed=1, ignore_eos=True)
    reqs = engine.generate(
        PROMPTS[:4], ["nora", "lora", None, "aurora"], [p, others, others, others]
    )
    assert reqs[0].output_ids == alone.output_ids
    other_seed = SamplingParams(**{**p.__dict__, "seed": 8})
    again = make_engine(root, tok).generate([PROMPTS[0]], ["nora"], other_seed)[0]
    assert again.output_ids != alone.output_ids


def test_sampling_matches_transformers_top_k_1(root, tok, greedy_refs):
    # temperature > 0 with top_k = 1 must reduce to greedy
    p = SamplingParams(max_tokens=12, temperature=1.3, top_k=1, ignore_eos=True)
    r = make_engine(root, tok).generate([PROMPTS[3]], [ADAPTERS[3]], p)[0]
    assert r.output_ids == greedy_refs[3]


def test_stop_tokens_eos_and_stop_strings(root, tok, greedy_refs):
    ref = greedy_refs[0]
    stop_tok = ref[4]
    engine = make_engine(root, tok)
    by_token, by_eos = engine.generate(
        [PROMPTS[0]] * 2,
        [ADAPTERS[0]] * 2,
        [
            SamplingParams(max_tokens=12, stop_token_ids=[stop_tok]),
            SamplingParams(max_tokens=12),
        ],
    )
    assert by_token.finish_reason == "stop" and by_token.output_ids == ref[: ref.index(stop_tok)]
    engine.output.eos_ids = {stop_tok}  # the tokenizer's EOS, as the model's generation config says
    (eos,) = engine.generate([PROMPTS[0]], [ADAPTERS[0]], SamplingParams(max_tokens=12))
    assert eos.finish_reason == "stop" and eos.output_ids == ref[: ref.index(stop_tok)]
    text = tok.decode(ref, skip_special_tokens=True)
    stop = text[5:7]
    deltas = []
    (r,) = make_engine(root, tok).generate(
        [PROMPTS[0]],
        [ADAPTERS[0]],
        SamplingParams(max_tokens=12, stop=["@@", stop], ignore_eos=True),
    )
    engine = make_engine(root, tok)
    r2 = engine.submit(
        PROMPTS[0], ADAPTERS[0], SamplingParams(max_tokens=12, stop=[stop]), on_delta=deltas.append
    )
    engine.run_until_idle()
    for x in (r, r2):
        assert x.finish_reason == "stop" and x.text == text[: text.index(stop)]
    assert "".join(d.text for d in deltas) == r2.text  # the stop string never streams
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])


def test_streaming_deltas_add_up_to_the_text(root, tok, greedy_refs):
    engine = make_engine(root, tok, max_batch=2)
    streams: dict[int, list] = {i: [] for i in range(4)}
    reqs = [
        engine.submit(
            PROMPTS[i],
            ADAPTERS[i],
            SamplingParams(max_tokens=12, ignore_eos=True),
            on_delta=streams[i].append,
        )
        for i in range(4)
    ]
    engine.run_until_idle()
    for i, r in enumerate(reqs):
        assert "".join(d.text for d in streams[i]) == r.text
        assert sum(len(d.token_ids) for d in streams[i]) == 12
        assert streams[i][-1].finish_reason == "length"
        assert r.t_first is not None and len(r.token_times) == 12


def test_cancel_frees_the_row_and_unpins_the_adapter(root, tok):
    engine = make_engine(root, tok, max_batch=2)
    long = engine.submit("abc", "nora", SamplingParams(max_tokens=40, ignore_eos=True))
    short = engine.submit("abcdef", "lora", SamplingParams(max_tokens=40, ignore_eos=True))
    queued = engine.submit("q", "aurora", SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.running == 2 and engine.store.pins("nora") == 1
    long.cancel()
    queued.cancel()
    engine.step()
    assert long.finish_reason == "cancelled" and queued.finish_reason == "cancelled"
    assert engine.running == 1 and engine.store.pins("nora") == 0
    engine.run_until_idle()
    assert short.finish_reason == "length" and len(short.output_ids) == 40


def test_bad_requests_are_refused_with_a_reason(root, tok):
    engine = make_engine(root, tok, max_model_len=64)
    with pytest.raises(ValueError, match="exceeds the context length"):
        engine.submit("x" * 60, None, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.submit("", None)
    with pytest.raises(ValueError, match="temperature"):
        engine.submit("a", None, SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit("a", None, SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, 2, 10_000], None)
    (r,) = engine.generate(["a"], ["no-such-adapter"])
    assert r.finish_reason == "error" and "unknown adapter" in r.error


def test_background_thread_serves_concurrent_submitters(root, tok, greedy_refs):
    engine = make_engine(root, tok, max_batch=8).start()
    results = {}

    def client(i):
        results[i] = engine.generate(
            [PROMPTS[i]], [ADAPTERS[i]], SamplingParams(max_tokens=12, ignore_eos=True)
        )[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    engine.stop()
    assert [results[i].output_ids for i in range(len(PROMPTS))] == greedy_refs


@pytest.mark.parametrize(
    "top_k, top_p, expected",
    [
        (0, 1.0, [0.5, 0.3, 0.1, 0.05, 0.05]),
        (2, 1.0, [0.625, 0.375, 0, 0, 0]),
        (0, 0.7, [0.625, 0.375, 0, 0, 0]),  # 0.5 + 0.3 is the smallest prefix >= 0.7
        (0, 0.85, [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9, 0, 0]),
        (3, 0.7, [0.625, 0.375, 0, 0, 0]),
    ],
)
def test_sampler_draws_from_the_filtered_distribution(top_k, top_p, expected):
    logits = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]).log()
    gen = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    counts = torch.bincount(torch.tensor([_draw(logits, p, gen) for _ in range(6000)]), minlength=5)
    assert torch.allclose(counts / 6000, torch.tensor(expected), atol=0.025)


def test_sampler_nucleus_beyond_the_top_1024_is_exact():
    # Strictly decreasing logits: token i is the i-th most likely, so the nucleus at p = 0.5 is
    # the prefix 0..n-1, here ~2200 tokens: beyond the top 1024 the sampler looks at first.
    logits = -1e-4 * torch.arange(5000, dtype=torch.float32)
    probs = torch.softmax(logits.double(), -1)
    n = int((probs.cumsum(-1) - probs < 0.5).sum())  # smallest prefix holding >= 0.5
    assert 1024 < n < 2500
    gen = torch.Generator().manual_seed(0)
    draws = [_draw(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(4000)]
    assert max(draws) < n + 2  # nothing outside the nucleus (+1: float32 rounding at its edge)
    assert max(draws) > n - 50 and len(set(draws)) > 1024  # its tail beyond 1024 is reached
    # and within it, the draws follow softmax: the first half is a bit likelier than the second
    half = float(probs[: n // 2].sum() / probs[:n].sum())
    assert sum(d < n // 2 for d in draws) / len(draws) == pytest.approx(half, abs=0.03)


def test_a_full_waiting_queue_refuses_new_requests(root, tok):
    engine = make_engine(root, tok, max_waiting=2)
    engine.submit("a", None)
    engine.submit("b", None)
    with pytest.raises(OverloadedError, match="already waiting"):
        engine.submit("c", None)
    engine.run_until_idle()
    engine.submit("c", None)  # room again


def test_no_python_objects_accumulate_per_request(root, tok):
    engine = make_engine(root, tok, max_batch=4, max_resident=2)  # evictions on the way

    def wave(n, seed):
        rng = random.Random(seed)
        for _ in range(n):
            adapter = rng.choice([None, *SPECS])
            p = SamplingParams(max_tokens=rng.randint(1, 8), temperature=rng.choice([0, 0.8]))
            engine.submit("x" * rng.randint(1, 20), adapter, p, on_delta=lambda d: None)
        engine.run_until_idle()

    wave(60, 0)
    gc.collect()
    before = len(gc.get_objects())
    wave(150, 1)
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    assert engine.cache is None and not engine.waiting and engine.store.evictions > 10
