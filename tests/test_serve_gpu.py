"""benchmarks/serve_gpu.py --tiny runs the whole serve decode-step benchmark on CPU."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_gpu.py"


def test_serve_gpu_tiny_prints_the_ratios():
    out = subprocess.run([sys.executable, str(BENCH), "--tiny"], capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    assert "ratio nora64/lora64:" in out and "ratio nora64/nora1:" in out
    assert "machine:" in out and "backend torch" in out
