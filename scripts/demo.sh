#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the main job: `nora demo` on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nora demo "$@"
