"""The serving benchmark end to end on the tiny model (CPU): every in-process and HTTP system it times answers
every region of the workload, and the report compares them per configuration."""

from __future__ import annotations

import json

import pytest

from bench import serve_bench


def test_serve_bench_times_every_system_on_every_region(tmp_path):
    out = tmp_path / "serve_bench.json"
    report = serve_bench.main(["--preset", "tiny", "--device", "cpu", "--systems", "engine", "engine-fast", "server",
                               "--masks", "2", "--images", "2", "--waves", "2", "--new-tokens", "3",
                               "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 0
    by_system = {r["system"]: r for r in report["results"]}
    assert set(by_system) == {"engine", "engine-fast", "server"}
    for result in by_system.values():
        assert result["regions"] == 2 * 2 * 2  # masks x images x waves, each answered once
        assert result["p50_region_s"] <= result["p99_region_s"] <= result["seconds"]
    phases = by_system["engine"]["phases_s"]
    assert set(phases) == {"send", "prefill_steps", "decode_steps"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= by_system["engine"]["seconds"]
    worker = by_system["server"]["phases_s"]  # the server's worker: admitting, stepping, waiting
    assert set(worker) == {"worker_admit", "worker_steps", "worker_idle"}
    assert worker["worker_admit"] > 0 and worker["worker_steps"] > 0 and worker["worker_idle"] >= 0
    summary = {row["system"]: row for row in report["summary"]}
    engine = summary["engine"]
    assert engine["over_server"] == by_system["engine"]["regions_per_s"] / by_system["server"]["regions_per_s"]
    assert summary["engine-fast"]["over_engine"] * engine["over_engine-fast"] == pytest.approx(1.0)


def test_serve_bench_measures_the_server_on_one_replica_and_on_all(tmp_path):
    """--devices cpu cpu: the server system on one replica and on two (two models in the process), and the scaling
    row compares them; the engine system runs once, on the first device."""
    report = serve_bench.main(["--preset", "tiny", "--devices", "cpu", "cpu", "--systems", "engine", "server",
                               "--masks", "2", "--images", "4", "--waves", "1", "--new-tokens", "3",
                               "--out", str(tmp_path / "replicas.json")])
    runs = {(r["system"], r["replicas"]): r for r in report["results"]}
    assert set(runs) == {("engine", 1), ("server", 1), ("server", 2)}
    assert all(r["regions"] == 2 * 4 for r in runs.values())
    assert report["settings"]["devices"] == ["cpu", "cpu"]
    [scaling] = report["device_scaling"]
    assert scaling["replicas"] == scaling["devices"] == 2 and scaling["tensor_parallel"] == 1
    assert scaling["over_1_device"] == runs[("server", 2)]["regions_per_s"] / runs[("server", 1)]["regions_per_s"]
    assert scaling["per_device_efficiency"] == pytest.approx(scaling["over_1_device"] / 2)
    assert report["summary"][0]["over_server"] == runs[("engine", 1)]["regions_per_s"] / runs[("server", 1)]["regions_per_s"]


def test_vllm_tensor_parallel_sizes_are_measured_in_turn_and_scaled_against_one_gpu():
    """vllm-osprey on one engine over 1 then 2 GPUs (`--vllm-tensor-parallel 2 1`): both widths run, the one-GPU
    run first, and the two-GPU run is reported against it per GPU (vLLM itself needs a GPU: the figures are set)."""
    from bench.serve_workload import Measurement

    args = serve_bench.parse_args(["--vllm-tensor-parallel", "2", "1"])
    assert serve_bench._widths("vllm-osprey", args, ["pipe"]) == [1, 2]
    assert serve_bench._widths("vllm", args, ["pipe"]) == [1]
    one, two = (Measurement("vllm-osprey", 16, 16, 64, tensor_parallel=n, seconds=2.0) for n in (1, 2))
    one.region_latencies, two.region_latencies = [0.5] * 100, [0.5] * 170
    [scaling] = serve_bench._device_scaling([one, two])
    assert (scaling["devices"], scaling["tensor_parallel"], scaling["replicas"]) == (2, 2, 1)
    assert scaling["over_1_device"] == pytest.approx(1.7) and scaling["per_device_efficiency"] == pytest.approx(0.85)
    assert serve_bench._label(serve_bench.summarize(two)) == "vllm-osprey tp2"
