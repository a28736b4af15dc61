#!/usr/bin/env bash
# Install (scripts/setup.sh test, and vLLM's own environment: scripts/setup.sh vllm) and run the
# test suite (slow tests excluded; `-m slow` for them). tests/test_vllm.py runs vLLM in
# .venv-vllm as subprocesses. Skip reasons are always printed (-rs in pyproject's addopts).
# CI=true (the default here: this script installs the test extra first) turns a skip for a
# package CI must install into a failure: see REQUIRED_IN_CI in tests/conftest.py.
# `CI=false bash scripts/test.sh` relaxes it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup.sh vllm
export CI="${CI:-true}"
exec .venv/bin/python -m pytest -q "$@"
