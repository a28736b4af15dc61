"""nora.data: loaders on local fixtures in the hub schemas, generators, response-only labels.

The tokenizer is a tiny byte-level BPE trained in-process, wrapped with SmolLM2's ChatML
template; the expected prompt text is written out by hand (`chatml`) so the masking check
does not trust the template engine it is testing against.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import DEFAULT_SYSTEM, make_tokenizer
from transformers import PreTrainedTokenizerFast

from nora.data import (
    DATASETS,
    IGNORE_INDEX,
    DataError,
    Example,
    build_splits,
    collate,
    extract_final_answer,
    load_examples,
    logistic_steps,
    score_answer,
    tokenize_example,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SLIMORCA = FIXTURES / "slimorca.jsonl"
MATHINSTRUCT_JSON = FIXTURES / "mathinstruct.json"
MATHINSTRUCT_PARQUET = FIXTURES / "mathinstruct.parquet"
PROMPT_RESPONSE = FIXTURES / "prompt_response.jsonl"
MESSAGES = FIXTURES / "messages.jsonl"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def chatml(messages: list[dict]) -> str:
    """SmolLM2's rendering, by hand: a default system turn unless one is given."""
    head = (
        ""
        if messages[0]["role"] == "system"
        else f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    )
    return head + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def check_masking(tok, ex: Example, feature: dict) -> None:
    ids, labels, p = feature["input_ids"], feature["labels"], feature["prompt_len"]
    prompt_text = chatml(ex.messages) + "<|im_start|>assistant\n"
    assert ids[:p] == tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert len(labels) == len(ids) > p
    for i, (t, label) in enumerate(zip(ids, labels, strict=True)):
        assert label == (IGNORE_INDEX if i < p else t), f"position {i}"
    # the supervised tokens are exactly the response and the turn's closing tokens
    assert tok.decode(ids[p:]) == ex.response + "<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in labels[p:]


SOURCES = [
    ("slimorca", {"path": SLIMORCA}),
    ("mathinstruct", {"path": MATHINSTRUCT_JSON}),
    ("mathinstruct", {"path": MATHINSTRUCT_PARQUET}),
    (str(PROMPT_RESPONSE), {}),
    (str(MESSAGES), {}),
    ("math", {"n": 4}),
    ("reasoning-mix", {"n": 6}),
    ("logistic-map", {"n": 4}),
]


@pytest.mark.parametrize(("source", "kw"), SOURCES, ids=lambda v: Path(str(v)).name)
def test_labels_mask_everything_but_the_response(tok, source, kw):
    examples = load_examples(source, **kw)
    assert examples
    for ex in examples:
        feature = tokenize_example(tok, ex, max_len=4096)
        assert feature is not None and not feature["truncated"]
        check_masking(tok, ex, feature)


def test_registry_names():
    assert set(DATASETS) == {
        "slimorca",
        "mathinstruct",
        "math",
        "reasoning-mix",
        "logistic-map",
        "jsonl",
    }


# ---- loaders on local files in the hub schemas ------------------------------------------


def test_slimorca_schema():
    exs = load_examples("slimorca", path=SLIMORCA, shuffle=False)
    assert len(exs) == 5
    first = exs[0]
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert first.response.startswith("Mercury has the shortest year")
    assert first.answer is None
    assert exs[1].messages == [
        {"role": "user", "content": "Translate to French: The cat sleeps on the sofa."}
    ]  # the empty system turn is dropped
    multi = exs[3]  # the last gpt turn is the response; earlier turns are context
    assert [m["role"] for m in multi.messages] == ["user", "assistant", "user"]
    assert multi.messages[1]["content"] == "Night." and multi.response == "Bright."
    # a path is enough: the `conversations` schema is detected
    assert load_examples(str(SLIMORCA), shuffle=False) == exs


def test_mathinstruct_json_and_parquet_agree():
    from_json = load_examples("mathinstruct", path=MATHINSTRUCT_JSON, shuffle=False)
    from_parquet = load_examples("mathinstruct", path=MATHINSTRUCT_PARQUET, shuffle=False)
    strip = [(e.messages, e.response, e.answer, e.meta["origin"]) for e in from_json]
    assert strip == [(e.messages, e.response, e.answer, e.meta["origin"]) for e in from_parquet]
    assert [e.answer for e in from_json] == ["64", "C", None, "7"]  # PoT has no "answer is"
    assert from_json[0].messages == [
        {"role": "user", "content": from_json[0].messages[0]["content"]}
    ]
    assert (
        load_examples(str(MATHINSTRUCT_PARQUET), shuffle=False)[0].response == from_json[0].response
    )


def test_prompt_response_and_messages_files():
    pr = load_examples(str(PROMPT_RESPONSE), shuffle=False)
    assert pr[0].messages == [{"role": "user", "content": "What is 2 + 3?"}]
    assert (pr[0].response, pr[0].answer) == ("2 + 3 = 5", "5")
    assert pr[1].messages[0] == {"role": "system", "content": "Answer in one sentence."}
    msgs = load_examples("jsonl", path=MESSAGES, shuffle=False)
    assert [m["content"] for m in msgs[1].messages] == [
        "Count to three.",
        "1, 2, 3",
        "Now backwards.",
    ]
    assert msgs[1].response == "3, 2, 1" and msgs[2].answer == "Yes"


def test_file_order_is_seeded_and_prefix_stable():
    a = load_examples(str(SLIMORCA), seed=1)
    assert load_examples(str(SLIMORCA), n=2, seed=1) == a[:2]
    assert load_examples(str(SLIMORCA), seed=1) == a
    assert sorted(e.response for e in a) == sorted(e.response for e in load_examples(str(SLIMORCA)))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_bad_records_are_counted_and_skipped(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "a?", "response": "b"},
            {"prompt": "no response here"},  # line 2: bad
            {"prompt": "c?", "response": "d"},
            "",  # blank lines are not records
            {"prompt": "e?", "response": ""},  # line 5: bad (empty response)
            {"prompt": "f?", "response": "g"},
        ],
    )
    with pytest.warns(UserWarning, match=r"skipped 2 bad record.*line 2"):
        exs = load_examples(str(path))
    assert sorted(e.response for e in exs) == ["b", "d", "g"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, eval_, stats = build_splits(tok, str(path), n_train=2, n_eval=1, max_len=512)
    assert stats.skipped_bad_records == 2 and stats.loaded == 3 and stats.kept == 3
    assert len(train) == 2 and len(eval_) == 1


def test_all_bad_records_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    with pytest.raises(DataError, match="first bad record at line 1"):
        load_examples(str(path))
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "no known schema"}])
    with pytest.raises(DataError, match="no record matches a known schema"):
        load_examples(str(path))


def test_malformed_json_names_the_line(tmp_path):
    path = write_jsonl(
        tmp_path / "broken.jsonl",
        [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, '{"prompt": "e",'],
    )
    with pytest.raises(DataError, match="line 3"):
        load_examples(str(path))
    bad_list = tmp_path / "broken.json"
    bad_list.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": oops}\n]\n')
    with pytest.raises(DataError, match="line 3"):
        load_examples(str(bad_list))


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'slimorka'.*slimorca.*logistic-map"):
        load_examples("slimorka")
    assert issubclass(DataError, ValueError)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load_examples(str(missing))
    with pytest.raises(DataError, match="not found"):
        load_examples("slimorca", path=missing)
    with pytest.raises(DataError, match="takes no option"):
        load_examples("logistic-map", n=2, pth="x")
    with pytest.raises(DataError, match="pass n"):
        load_examples("math")


def test_hub_failure_says_to_pass_a_local_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("slimorca", "mathinstruct"):
        with pytest.raises(DataError, match="path=") as info:
            load_examples(name, n=3)
        assert "\n" not in str(info.value)


def test_hub_records_go_through_the_same_converter(monkeypatch):
    import datasets

    rows = [json.loads(line) for line in SLIMORCA.read_text().splitlines()]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    exs = load_examples("slimorca", n=3, seed=0)
    assert len(exs) == 3 and all(e.meta["source"] == "Open-Orca/SlimOrca" for e in exs)
    assert load_examples("slimorca", n=2, seed=0) == exs[:2]


# ---- generators --------------------------------------------------------------------------


def test_logistic_steps_by_hand():
    # x1 = 3·0.5·0.5 = 0.75; x2 = 3·0.75·0.25 = 0.5625; x3 = 3·0.5625·0.4375 = 0.73828125 -> 0.7383;
    # x4 from the *rounded* x3: 3·0.7383·0.2617 = 0.57963933 -> 0.5796 (unrounded x3 gives 0.5797)
    assert logistic_steps(3.0, 0.5, 4) == [0.75, 0.5625, 0.7383, 0.5796]


def test_logistic_map_examples():
    exs = load_examples("logistic-map", n=20, seed=3)
    assert exs == load_examples("logistic-map", n=20, seed=3)
    assert exs[:5] == load_examples("logistic-map", n=5, seed=3)
    assert exs != load_examples("logistic-map", n=20, seed=4)
    for ex in exs:
        r, x0, k = ex.meta["r"], ex.meta["x0"], ex.meta["steps"]
        assert 2.5 <= r < 4.0 and 0 < x0 < 1 and 5 <= k <= 8
        assert (
            f"r = {r:.2f}" in ex.messages[0]["content"]
            and f"x0 = {x0:.4f}" in ex.messages[0]["content"]
        )
        lines = ex.response.splitlines()
        assert lines == [f"x{j} = {x:.4f}" for j, x in enumerate(logistic_steps(r, x0, k), 1)]
        assert ex.answer == lines[-1].split(" = ")[1]
        assert score_answer(ex, ex.response) == 1.0
        last_digit = "8" if ex.response.endswith("9") else "9"  # change the final value
        assert score_answer(ex, ex.response[:-1] + last_digit) == 0.0


def test_math_examples_and_scorer():
    exs = load_examples("math", n=30, seed=0)
    assert exs[:10] == load_examples("math", n=10, seed=0)
    assert (
        exs[0].messages[0]["content"]
        != load_examples("math", n=1, seed=1)[0].messages[0]["content"]
    )
    for ex in exs:
        assert ex.response.splitlines()[-1] == f"#### {ex.answer}"
        assert score_answer(ex, ex.response) == 1.0
    ex = exs[0]
    assert score_answer(ex, f"Some working.\n#### {ex.answer}") == 1.0
    assert score_answer(ex, f"The answer is {ex.answer}.") == 1.0
    wrong = str(int(float(ex.answer)) + 1)
    assert score_answer(ex, f"Some working.\n#### {wrong}") == 0.0
    assert score_answer(ex, f"#### {wrong}", partial=True) == pytest.approx(
        0.01
    )  # gsm's format reward
    assert score_answer(ex, "") == 0.0


def test_reasoning_mix_round_robin():
    exs = load_examples("reasoning-mix", n=12, seed=0)
    tasks = [e.meta["task"] for e in exs]
    assert tasks[:6] == tasks[6:] and len(set(tasks)) == 6
    assert exs[:5] == load_examples("reasoning-mix", n=5, seed=0)
    for ex in exs:
        assert ex.response == ex.answer and ex.answer
        assert score_answer(ex, ex.response) == 1.0


def test_extract_final_answer():
    assert extract_final_answer("work\n#### 1,234\n") == "1,234"
    assert extract_final_answer("think <answer> 7 </answer>") == "7"
    assert extract_final_answer("So the answer is 12.") == "12"
    assert extract_final_answer("x1 = 0.5\nx2 = 0.75\n") == "x2 = 0.75"
    assert extract_final_answer("  \n") is None


# ---- tokenization, splits, batching ------------------------------------------------------


def lengths(tok, ex: Example) -> tuple[int, int]:
    from nora.data import encode

    prompt, full = encode(tok, ex)
    return len(prompt), len(full)


def test_truncation_and_drop_counts(tmp_path, tok):
    short_q = {"prompt": "Hi?", "response": "A very long answer " * 20}
    long_q = {"prompt": "A very long question " * 30, "response": "ok"}
    fits = {"prompt": "2+2?", "response": "4"}
    path = write_jsonl(tmp_path / "lens.jsonl", [fits, short_q, long_q, fits])
    exs = load_examples(str(path), shuffle=False)
    (p_fit, f_fit), (p_short, f_short), (p_long, _) = (lengths(tok, e) for e in exs[:3])
    max_len = max(f_fit, p_short + 5)
    assert p_long >= max_len and f_short > max_len  # the fixture does what it says
    with pytest.warns(UserWarning, match="dropped 1"):
        train, eval_, stats = build_splits(
            tok, str(path), n_train=3, n_eval=1, max_len=max_len, shuffle=False
        )
    assert (stats.loaded, stats.dropped_too_long, stats.truncated, stats.kept) == (4, 1, 1, 3)
    kept = train + eval_
    assert stats.tokens == sum(len(f["input_ids"]) for f in kept)
    assert stats.response_tokens == sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in kept)
    cut = next(f for f in kept if f["truncated"])
    assert (
        len(cut["input_ids"]) == max_len
        and cut["labels"][: cut["prompt_len"]] == [IGNORE_INDEX] * cut["prompt_len"]
    )
    assert cut["labels"][cut["prompt_len"] :] == cut["input_ids"][cut["prompt_len"] :]
    assert tokenize_example(tok, exs[2], max_len) is None
    assert (
        tokenize_example(tok, exs[2], p_long) is None
    )  # a prompt of exactly max_len leaves no room


def test_max_len_below_every_prompt(tok):
    exs = load_examples(str(PROMPT_RESPONSE))
    shortest = min(lengths(tok, e)[0] for e in exs)
    with pytest.raises(DataError, match=f"smallest prompt has {shortest} tokens"):
        build_splits(tok, str(PROMPT_RESPONSE), n_train=2, n_eval=1, max_len=shortest)


@pytest.mark.parametrize("source", ["logistic-map", "math", str(SLIMORCA)])
def test_eval_split_is_fixed_when_n_train_changes(tok, source):
    train_a, eval_a, _ = build_splits(tok, source, n_train=2, n_eval=2, max_len=4096, seed=7)
    train_b, eval_b, _ = build_splits(tok, source, n_train=3, n_eval=2, max_len=4096, seed=7)
    assert [f["input_ids"] for f in eval_a] == [f["input_ids"] for f in eval_b]
    assert [f["input_ids"] for f in train_b[:2]] == [f["input_ids"] for f in train_a]
    eval_ids = {tuple(f["input_ids"]) for f in eval_b}
    assert not eval_ids & {tuple(f["input_ids"]) for f in train_b}  # held out


def test_no_chat_template_uses_plain_format(tok):
    plain = make_tokenizer(template=None)
    ex = Example(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "4"
    )
    f = tokenize_example(plain, ex, max_len=512)
    p = f["prompt_len"]
    assert plain.decode(f["input_ids"][:p]) == "System: Be brief.\nUser: 2+2?\nAssistant:"
    assert plain.decode(f["input_ids"][p:]) == " 4<|im_end|>"
    assert f["labels"][:p] == [IGNORE_INDEX] * p and f["labels"][p:] == f["input_ids"][p:]


def test_template_without_prefix_property_is_refused():
    # a generation prompt that opens a "thinking" block the finished turn does not have
    odd = make_tokenizer(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: <think>' }}{% endif %}"
    )
    ex = Example([{"role": "user", "content": "hi"}], "hello")
    with pytest.raises(DataError, match="not a prefix"):
        tokenize_example(odd, ex, max_len=512)


def test_collate_pads_right():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8], "example": None},  # extra keys are ignored
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    with pytest.raises(ValueError):
        collate([], pad_id=0)
