#!/usr/bin/env bash
# nora's vLLM plugin on one GPU: correctness vs nora's HF path, the CUDA-graph guard, speed.
#
#   bash benchmarks/vllm_gpu.sh            # PY=/path/to/python to pick the interpreter
#
# Needs: a Python whose `import vllm` is a CUDA build with vLLM 0.32's LoRA API (pip install
# vllm: it brings its own CUDA torch and transformers), plus nora's pure-Python needs that vLLM
# already brings (torch, transformers, safetensors). This checkout's nora is put on PYTHONPATH
# and its plugin is registered by entry point only if nora is pip-installed there; otherwise
# the script registers it itself (vLLM's spawned workers inherit VLLM_PLUGINS=nora and the
# path). No downloads: the base is a random Llama built on the fly. About 5 minutes on an H200.
#
# Expected output (see benchmarks/vllm_gpu.py for what each line checks):
#   correctness base: equal True   … lora / nora / nolora / aurora: equal True
#   throughput decode base|lora|nora: N tok/s;  64 NoRA cost vs 64 LoRA: ~1.0x
#   cuda graphs: refused True: … --enforce-eager
#   {"correct": true, ...}         exit status 0
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
if ! "$PY" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "needs a CUDA build of vLLM importable by $PY (pip install vllm; no network: carry the wheels)" >&2
  exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "from importlib.metadata import entry_points as e; import sys; sys.exit(not [p for p in e(group='vllm.general_plugins') if p.name == 'nora'])"; then
  # not pip-installed: make an entry point for this checkout in a throwaway dist-info
  site="$(mktemp -d)"
  mkdir -p "$site/nora_adapters_plugin-0.0.dist-info"
  printf 'Metadata-Version: 2.1\nName: nora-adapters-plugin\nVersion: 0.0\n' > "$site/nora_adapters_plugin-0.0.dist-info/METADATA"
  printf '[vllm.general_plugins]\nnora = nora.vllm:register\n' > "$site/nora_adapters_plugin-0.0.dist-info/entry_points.txt"
  export PYTHONPATH="$site:$PYTHONPATH"
fi
exec "$PY" benchmarks/vllm_gpu.py
