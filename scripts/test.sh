#!/usr/bin/env bash
# Install (scripts/setup.sh test, and the vLLM environment .venv-vllm) and run the test suite
# (slow tests excluded; `-m slow` for them). tests/test_vllm.py runs vLLM there as subprocesses;
# NORA_REQUIRE_VLLM=1 makes them fail, not skip, if that environment is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup.sh vllm
NORA_REQUIRE_VLLM=1 exec .venv/bin/python -m pytest -q "$@"
