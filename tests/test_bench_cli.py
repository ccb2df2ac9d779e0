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


def test_token_norms_on_the_tiny_model(tiny_pipeline):
    from pathlib import Path

    from bench.token_norms import token_statistics

    stats = token_statistics(tiny_pipeline, Path(__file__).parent / "fixtures" / "synth", "train", images=2)
    assert set(stats) >= {"word_embedding_norm", "image_norm", "mask_norm", "pos_norm", "mask_cosine"}
    assert all(v == v and v >= -1 for v in stats.values())  # finite, cosines within range
