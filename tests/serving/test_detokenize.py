"""IncrementalDetokenizer: text token by token, incomplete characters wait for the next
token, stop strings are cut and held back while they may still be forming."""

from __future__ import annotations

import pytest
from conftest import make_tokenizer

from nora.serving.detokenize import IncrementalDetokenizer


def feed(tok, text, stop=(), final_at=None):
    """Tokens of `text` one at a time; returns the streamed pieces, the stop flag and the
    detokenizer (`final_at`: the step that ends the request anyway)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, stop)
    pieces, stopped = [], False
    for k in range(1, len(ids) + 1):
        piece, stopped = d.step(ids[:k], final=k == (final_at or len(ids)))
        pieces.append(piece)
        if stopped:
            break
    return pieces, stopped, d


@pytest.mark.parametrize(
    "text, stop, streamed, held_at, stopped",
    [
        # no stop strings: every character goes out at once
        ("hello", (), ["h", "e", "l", "l", "o"], None, False),
        # a 3-character stop: 2 characters wait until they cannot start it
        ("abcdef", ("xyz",), ["", "", "a", "b", "c", "def"], 1, False),
        # the stop string is cut, with what followed; nothing of it was streamed
        ("say END now", ("END",), ["", "", "s", "a", "y", " ", ""], 1, True),
        # two stop strings complete at once: the one that starts first wins
        ("abcdef", ("cd", "bcd"), ["", "", "a", ""], 1, True),
        # a stop string split across tokens is found
        ("xxSTOPyy", ("STOP",), ["", "", "", "x", "x", ""], 2, True),
    ],
)
def test_hold_back_and_cut(tok, text, stop, streamed, held_at, stopped):
    pieces, hit, d = feed(tok, text, stop)
    assert pieces == streamed and hit == stopped
    assert "".join(pieces) == d.text  # what was streamed is the text, nothing more
    for s in stop:
        assert s not in d.text
    if held_at is not None:
        assert pieces[held_at] == ""  # held: a stop string could still be forming


def test_the_end_releases_what_was_held(tok):
    pieces, hit, d = feed(tok, "abcd", ("yy",), final_at=None)
    assert not hit and "".join(pieces) == "abcd" == d.text  # the last step is final
    d = IncrementalDetokenizer(tok, ("yy",))
    ids = tok("aby", add_special_tokens=False)["input_ids"]
    assert d.step(ids[:2]) == ("a", False)
    assert d.step(ids, final=True) == ("by", False)  # 'y' might have begun 'yy': ends now


def test_incomplete_characters_wait_for_their_last_byte():
    tok = make_tokenizer()  # byte-level BPE: 'é' and '€' are more than one token
    text = "café €5"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d, pieces = IncrementalDetokenizer(tok), []
    for k in range(1, len(ids) + 1):
        piece, _ = d.step(ids[:k], final=k == len(ids))
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == d.text == text
    assert len(ids) > len([p for p in pieces if p])  # some tokens waited for the next
