"""Fixtures every serving test module shares (the helpers themselves: common.py)."""

from __future__ import annotations

import pytest

from serving.common import char_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_one_thread(one_thread):
    """Every serving test runs tiny models: one thread (tests/conftest.py's one_thread)."""
    yield


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()
