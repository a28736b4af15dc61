#!/usr/bin/env bash
# Install (scripts/setup.sh test) and run the test suite (slow tests excluded; `-m slow` for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
