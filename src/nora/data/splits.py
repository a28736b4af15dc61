"""`build_splits`: a fixed held-out eval split and a train split, tokenized, with stats."""

from __future__ import annotations

import warnings

from nora.data.core import DataError, DataStats
from nora.data.registry import load
from nora.data.tokenization import IGNORE_INDEX, prompt_ids, tokenize_example


def build_splits(
    tokenizer,
    source: str,
    n_train: int,
    n_eval: int,
    max_len: int,
    seed: int = 0,
    skip: int = 0,
    **kw,
) -> tuple[list[dict], list[dict], DataStats]:
    """Load `n_eval + skip + n_train` examples in seeded order; eval = the first n_eval, then
    `skip` examples left out (e.g. a study's test split), train = the next n_train. The order
    does not depend on n, so the eval split stays the same when n_train changes. Examples too
    long for `max_len` are dropped from their split (not replaced), so a split never borrows
    from the other.
    """
    if n_train < 0 or n_eval < 0 or skip < 0 or n_train + n_eval == 0:
        raise DataError(f"need n_train, n_eval >= 0 and not both 0 (got {n_train}, {n_eval})")
    loaded = load(source, n_eval + skip + n_train, seed, **kw)
    examples = loaded.examples[:n_eval] + loaded.examples[n_eval + skip :]
    if n_train and len(examples) <= n_eval:
        raise DataError(
            f"{source!r} has only {len(examples)} examples: none left for training after "
            f"holding out n_eval={n_eval}"
        )
    if len(examples) < n_eval + n_train:
        warnings.warn(
            f"{source}: only {len(examples)} examples; train gets {len(examples) - n_eval} "
            f"instead of {n_train}",
            stacklevel=2,
        )
    stats = DataStats(loaded=len(examples), skipped_bad_records=loaded.skipped)

    def tokenize(split):
        out = []
        for ex in split:
            feature = tokenize_example(tokenizer, ex, max_len)
            if feature is None:
                stats.dropped_too_long += 1
                continue
            stats.truncated += feature["truncated"]
            stats.tokens += len(feature["input_ids"])
            stats.response_tokens += sum(t != IGNORE_INDEX for t in feature["labels"])
            out.append(feature)
        return out

    eval_split = tokenize(examples[:n_eval])
    train_split = tokenize(examples[n_eval : n_eval + n_train])
    stats.kept = len(eval_split) + len(train_split)
    if stats.kept == 0:
        shortest = min(len(prompt_ids(tokenizer, ex.messages)) for ex in examples)
        raise DataError(
            f"max_len={max_len} is shorter than every prompt (the smallest prompt has "
            f"{shortest} tokens); raise max_len above {shortest}"
        )
    for name, want, got in (("train", n_train, train_split), ("eval", n_eval, eval_split)):
        if want and not got:
            raise DataError(f"every {name} example is longer than max_len={max_len}")
    if stats.dropped_too_long:
        warnings.warn(
            f"{source}: dropped {stats.dropped_too_long} example(s) whose prompt is >= "
            f"max_len={max_len} tokens",
            stacklevel=2,
        )
    return train_split, eval_split, stats
