"""`osprey bench` lists and dispatches the benchmarks."""

import subprocess
import sys

from bench.cli import BENCHMARKS


def test_bench_help_lists_every_benchmark():
    out = subprocess.run([sys.executable, "-m", "osprey.cli", "bench", "--help"], capture_output=True, text=True, check=True)
    for name in BENCHMARKS:
        assert name in out.stdout


def test_bench_dispatches_arguments_to_the_script():
    out = subprocess.run([sys.executable, "-m", "osprey.cli", "bench", "describe-speed", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--new-tokens" in out.stdout
