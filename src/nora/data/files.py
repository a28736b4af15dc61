"""Local data files (.jsonl, .json, .parquet) and the record schemas they may hold.

Schemas, detected per file from the first record that has a schema's identifying key
(`conversations`, `messages`, `instruction`, `prompt`), tried in that order:

- `conversations`: ShareGPT / Open-Orca/SlimOrca, `[{"from": "system"|"human"|"gpt", "value"}]`;
  the last `gpt` turn is the response, the turns before it the messages.
- `messages`: chat, `[{"role": "system"|"user"|"assistant", "content"}]`; the last assistant
  message is the response.
- `instruction` + `output`: TIGER-Lab/MathInstruct (optional `source`; an Alpaca-style
  `input` is appended to the instruction).
- `prompt` + `response`: plain pairs (optional `system`).

Any schema may carry a gold `answer`; MathInstruct outputs that end in "The answer is X"
get `answer = X`. Empty system turns are dropped (they carry nothing). A record that lacks a
required field is *bad*: it is counted and skipped, never half-used.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nora.data.core import DataError, Example, Loaded

SUFFIXES = (".jsonl", ".json", ".parquet")
# ShareGPT speaker names -> chat roles ("user"/"assistant" appear in some ShareGPT dumps).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
CHAT_ROLES = ("system", "user", "assistant")


class BadRecord(Exception):
    """Raised by a converter; the message says which field is missing or wrong."""


def _text(rec: dict, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"no non-empty string {key!r}")
    return value


def _finish(turns: list[dict], where_resp: int, rec: dict, meta: dict) -> Example:
    """Split `turns` at the response index; check there is a user turn to answer."""
    context = [t for t in turns[:where_resp] if t["role"] != "system" or t["content"].strip()]
    if not any(t["role"] == "user" for t in context):
        raise BadRecord("no user turn before the response")
    response = turns[where_resp]["content"]
    if not response.strip():
        raise BadRecord("empty response")
    answer = rec.get("answer")
    return Example(context, response, None if answer is None else str(answer), meta)


def from_sharegpt(rec: dict) -> Example:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadRecord("no 'conversations' list")
    turns = []
    for turn in conv:
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            raise BadRecord(f"turn without a known 'from' ({sorted(SHAREGPT_ROLES)})")
        if not isinstance(turn.get("value"), str):
            raise BadRecord("turn without a string 'value'")
        turns.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise BadRecord("no 'gpt' turn")
    return _finish(turns, last, rec, {"schema": "conversations"})


def from_messages(rec: dict) -> Example:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord("no 'messages' list")
    turns = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise BadRecord(f"message without a role in {CHAT_ROLES}")
        if not isinstance(m.get("content"), str):
            raise BadRecord("message without a string 'content'")
        turns.append({"role": m["role"], "content": m["content"]})
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise BadRecord("no assistant message")
    return _finish(turns, last, rec, {"schema": "messages"})


_ANSWER_IS = re.compile(r"[Tt]he answer is:?\s*(.+?)\s*\.?\s*$", re.S)


def from_instruction(rec: dict) -> Example:
    instruction, output = _text(rec, "instruction"), _text(rec, "output")
    extra = rec.get("input")
    if isinstance(extra, str) and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    meta: dict[str, Any] = {"schema": "instruction"}
    if isinstance(rec.get("source"), str):
        meta["origin"] = rec["source"]
    ex = _finish(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}],
        1,
        rec,
        meta,
    )
    if ex.answer is None:
        # MathInstruct's chain-of-thought outputs end with "The answer is X"; program outputs
        # (PoT) do not, and get no gold answer.
        tail = output.strip().splitlines()[-1]
        m = _ANSWER_IS.search(tail)
        ex.answer = m.group(1) if m else None
    return ex


def from_prompt(rec: dict) -> Example:
    prompt, response = _text(rec, "prompt"), _text(rec, "response")
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    system = rec.get("system")
    if isinstance(system, str) and system.strip():
        turns.insert(0, {"role": "system", "content": system})
    return _finish(turns, len(turns) - 1, rec, {"schema": "prompt"})


# name -> (identifying key, converter); detection tries them in this order. Only the one key
# identifies a schema, so a record with `prompt` but no `response` is a bad `prompt` record
# (counted, reported) rather than a file of unknown schema.
SCHEMAS: dict[str, tuple[str, Callable[[dict], Example]]] = {
    "conversations": ("conversations", from_sharegpt),
    "messages": ("messages", from_messages),
    "instruction": ("instruction", from_instruction),
    "prompt": ("prompt", from_prompt),
}


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """All records of a file as `(where, record)` pairs, `where` = "line 3" / "record 3"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`; imported only when needed

        rows = pq.read_table(path).to_pylist()
        return [(f"record {i}", r) for i, r in enumerate(rows, 1)]
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        return [(f"record {i}", r) for i, r in enumerate(rows, 1)]
    # JSON lines; a .json file that is not a list is read this way too (datasets' to_json
    # writes JSON lines under a .json name).
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON on line {lineno}: {e.msg}") from None
    return records


def detect_schema(records: list[tuple[str, Any]], path: Path | str) -> str:
    """The schema of the first record that has some schema's identifying key."""
    for _, rec in records:
        if isinstance(rec, dict):
            for name, (key, _) in SCHEMAS.items():
                if key in rec:
                    return name
    where, rec = records[0]
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise DataError(
        f"{path}: no record matches a known schema (conversations | messages | "
        f"instruction+output | prompt+response); {where} has {keys}"
    )


def load_file(
    path: str | Path,
    n: int | None = None,
    seed: int = 0,
    schema: str | None = None,
    shuffle: bool = True,
) -> Loaded:
    """Convert every record of a file, skip bad ones, then (seeded) shuffle and keep `n`.

    The order depends on `seed` only, not on `n`, so the first k examples are the same for
    any n >= k: this is what keeps a held-out split fixed.
    """
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    schema = schema or detect_schema(records, path)
    if schema not in SCHEMAS:
        raise DataError(f"unknown schema {schema!r}; choose one of {list(SCHEMAS)}")
    convert = SCHEMAS[schema][1]
    examples, skipped, first_bad = [], 0, None
    for where, rec in records:
        try:
            if not isinstance(rec, dict):
                raise BadRecord("not a JSON object")
            ex = convert(rec)
        except BadRecord as e:
            skipped += 1
            first_bad = first_bad or f"{where}: {e}"
            continue
        ex.meta.update(source=str(path), where=where)
        examples.append(ex)
    if not examples:
        raise DataError(
            f"{path}: none of its {len(records)} records is usable as {schema!r}; "
            f"first bad record at {first_bad}"
        )
    if shuffle:
        random.Random(seed).shuffle(examples)
    return Loaded(examples[:n] if n is not None else examples, skipped, first_bad)
