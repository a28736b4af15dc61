"""A longer schemathesis campaign against nora's HTTP API (issue 22), results committed.

    .venv/bin/python benchmarks/fuzz_api.py [--examples 200]

Runs the CI fuzz test (`tests/serving/test_fuzz.py`: every operation of the server's own
OpenAPI schema, positive and negative bodies, on a server without keys and on one with keys;
no 5xx, every 4xx names its field, a refused key gets 401, no tenant is answered by another's
adapter, the greedy probe answers the same afterwards) with `--examples` generated requests per operation and
mode instead of CI's 40, and writes its counts with the machine, the schemathesis version and
the commit to `benchmarks/results/fuzz_api.md`. The checks are the test's: one place.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from nora.study.context import machine_info

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/serving/test_fuzz.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--examples",
        type=int,
        default=200,
        help="per operation and mode, 40 or more (the test asserts ≥ 300 requests)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_api.md"))
    args = ap.parse_args()
    env = {**os.environ, "NORA_FUZZ_EXAMPLES": str(args.examples)}
    t0 = datetime.datetime.now(datetime.timezone.utc)
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-m", "slow", "-p", "no:cacheprovider", TEST]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [
        x for x in run.stdout.splitlines() if " requests" in x or "passed" in x or "failed" in x
    ]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
    m = machine_info()  # the sweep's and the suite's machine description
    report = [
        "# schemathesis campaign against nora serve's API",
        "",
        f"{t0:%Y-%m-%dT%H:%M}Z, commit {git.stdout.decode().strip()}; {m['cpu']}, {m['cores']} "
        f"cores; schemathesis {version('schemathesis')}. Command: "
        f"`python benchmarks/fuzz_api.py --examples {args.examples}` ({args.examples} generated "
        "requests per operation and mode; the checks of `tests/serving/test_fuzz.py`).",
        "",
        f"Result: {'passed' if run.returncode == 0 else f'FAILED (pytest rc {run.returncode})'}",
        "",
        "```",
        *lines,
        "```",
    ]
    if run.returncode:
        report += ["", "```", run.stdout[-4000:], run.stderr[-2000:], "```"]
    Path(args.out).write_text("\n".join(report) + "\n")
    print("\n".join(report))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
