"""Datasets for fine-tuning chat LMs with the loss on the response only.

    from nora.data import build_splits, collate
    train, eval_, stats = build_splits(tok, "math", n_train=2000, n_eval=200, max_len=512)
    batch = collate(train[:8], pad_id=tok.pad_token_id)  # input_ids, attention_mask, labels

Sources (`DATASETS`): `slimorca` and `mathinstruct` (the Hub datasets, or a local file in
their schema via `path=`), `math`, `reasoning-mix` and `logistic-map` (offline generators),
and `jsonl` (user files). `load_examples` also takes a file path directly; the schema
(`conversations` | `messages` | `instruction`/`output` | `prompt`/`response`) is detected
per file. See `files`, `generators`, `tokenization` for each format.

Bad-input policy:
- an unknown dataset name, a missing or unsupported file, an unknown loader option: DataError
  (a ValueError) saying what was expected;
- a malformed JSON line: DataError with its line number (a broken file is not skipped over);
- a record missing a required field (e.g. no `response`, no `gpt` turn): counted and skipped,
  reported in one warning and in `DataStats.skipped_bad_records`;
- every record bad, or nothing returned: DataError naming the first bad line/record;
- too long for `max_len`: a prompt >= max_len is dropped (`dropped_too_long`), a longer
  prompt + response is cut (`truncated`); if every prompt is too long, DataError with the
  smallest prompt length.
"""

from nora.data.core import DataError, DataStats, Example, Loaded
from nora.data.generators import MIX_TASKS, logistic_steps
from nora.data.registry import DATASETS, load_examples
from nora.data.scoring import extract_final_answer, majority_prior, probe_logistic, score_answer
from nora.data.splits import build_splits
from nora.data.tokenization import (
    IGNORE_INDEX,
    batches,
    collate,
    encode,
    prompt_ids,
    tokenize_example,
)

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "batches",
    "MIX_TASKS",
    "DataError",
    "DataStats",
    "Example",
    "Loaded",
    "build_splits",
    "collate",
    "encode",
    "extract_final_answer",
    "load_examples",
    "logistic_steps",
    "prompt_ids",
    "probe_logistic",
    "majority_prior",
    "score_answer",
    "tokenize_example",
]
