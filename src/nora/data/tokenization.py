"""Chat formatting with response-only labels, and batching.

`tokenize_example` renders the prompt with `apply_chat_template(messages,
add_generation_prompt=True)` and the full chat with the response as a final assistant turn.
The prompt ids must be a prefix of the full ids (checked); labels are -100 on the prompt
(system/user turns and the assistant header) and equal `input_ids` on everything after it:
the response and whatever the template closes the turn with (ChatML: `<|im_end|>\n`).

Tokenizers without a chat template use a plain format, prompt `"User: {content}\n"` per turn
(`System:` / `Assistant:` for those roles) then `"Assistant:"`, and response
`" {response}" + eos` (no BOS is added).

Truncation: a prompt of >= max_len tokens leaves no room for a response, so the example is
dropped (None); a longer prompt + response is cut at max_len (flagged `truncated`).
"""

from __future__ import annotations

import torch

from nora.data.core import DataError, Example

IGNORE_INDEX = -100  # the label torch's cross-entropy skips
_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    # return_dict=True gives the same shape on transformers 4.x (default False) and 5.x.
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def _plain_prompt(messages: list[dict]) -> str:
    turns = "".join(f"{_PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages)
    return turns + "Assistant:"


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids a model sees before it answers (use these to generate at evaluation)."""
    if _has_template(tokenizer):
        return _chat_ids(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(_plain_prompt(messages), add_special_tokens=False)["input_ids"]


def encode(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, full ids) for an example; the prompt is a prefix of the full."""
    prompt = prompt_ids(tokenizer, ex.messages)
    if not _has_template(tokenizer):
        response = tokenizer(" " + ex.response, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return prompt, prompt + list(response) + eos
    turn = {"role": "assistant", "content": ex.response}
    full = _chat_ids(tokenizer, ex.messages + [turn], add_generation_prompt=False)
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        at = next(
            (i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(full)
        )
        raise DataError(
            "the chat template renders the conversation differently once the answer is added "
            f"(the generation prompt is not a prefix of the full chat; they differ at token "
            f"{at}), so the response tokens cannot be told apart; use a template whose "
            "add_generation_prompt output is a prefix of the full conversation"
        )
    return prompt, full


def tokenize_example(tokenizer, ex: Example, max_len: int) -> dict | None:
    """`input_ids`/`labels` (lists of int) with -100 on the prompt, or None if the prompt
    alone fills max_len. Also `prompt_len`, `truncated` and the `example` itself."""
    prompt, full = encode(tokenizer, ex)
    if len(prompt) >= max_len:
        return None
    truncated = len(full) > max_len
    full = full[:max_len]
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    return {
        "input_ids": full,
        "labels": labels,
        "prompt_len": len(prompt),
        "truncated": truncated,
        "example": ex,
    }


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pad_id), attention_mask (0) and labels (-100), (B, T)."""
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(f["input_ids"]) for f in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(batch):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(features: list[dict], pad_id: int, size: int, collate_fn=collate) -> list[dict]:
    """`features` in order, `size` at a time, each chunk collated (`collate_fn`, default `collate`)."""
    return [collate_fn(features[i : i + size], pad_id) for i in range(0, len(features), size)]
