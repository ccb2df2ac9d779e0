"""The annotate-speed benchmark end to end on the tiny model (CPU): the real runner and the engine answer every
region of the same workload, and the report's ratio is theirs."""

from __future__ import annotations

import json

import pytest

from bench import annotate_speed


def test_annotate_speed_times_the_runner_and_the_engine_on_the_same_regions(tmp_path):
    out = tmp_path / "annotate_speed.json"
    report = annotate_speed.main(["--preset", "tiny", "--device", "cpu", "--masks", "2", "--images", "4",
                                  "--max-rows", "4", "--new-tokens", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["settings"]["images_in_flight"] == 2
    assert report["annotate"]["regions"] == report["engine"]["regions"] == 2 * 4  # masks x images
    assert report["ratio"] == report["annotate"]["regions_per_s"] / report["engine"]["regions_per_s"]
    assert report["meets_target"] == (report["ratio"] >= 0.9)
    assert report["complete"] is True


def test_a_run_cut_off_keeps_the_phases_it_measured(tmp_path, monkeypatch):
    """Each phase's figures are written as they come (`complete: false`): a run stopped in its Ray phase (a device
    call's time limit) still leaves the engine's and the annotator's."""
    def cut_off(*_args):
        raise TimeoutError("the device call's time limit")

    monkeypatch.setattr(annotate_speed, "_run_ray", cut_off)
    out = tmp_path / "annotate_speed.json"
    with pytest.raises(TimeoutError):
        annotate_speed.main(["--preset", "tiny", "--device", "cpu", "--masks", "2", "--images", "4", "--max-rows",
                             "4", "--new-tokens", "3", "--ray-actors", "1", "--out", str(out)])
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and "ray" not in partial
    assert partial["annotate"]["regions"] == partial["engine"]["regions"] == 8
    assert partial["settings"]["model"] == "tiny (random weights in a folder)"


def test_images_must_fill_whole_waves(capsys):
    with pytest.raises(SystemExit) as exit_info:
        annotate_speed.main(["--preset", "tiny", "--device", "cpu", "--masks", "2", "--images", "3",
                             "--max-rows", "4"])
    assert exit_info.value.code == 2
    assert "not a multiple of the 2 images in flight" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_replicas_answer_the_same_workload(tmp_path):
    """--ray-actors: the preset's random weights go to a folder, every system runs from it, and Ray's run with one
    and with two replicas answers every region (a local Ray on the CPU)."""
    pytest.importorskip("ray.data")
    report = annotate_speed.main(["--preset", "tiny", "--device", "cpu", "--masks", "2", "--images", "4",
                                  "--max-rows", "4", "--new-tokens", "3", "--ray-actors", "1", "2"])
    assert report["settings"]["model"] == "tiny (random weights in a folder)"
    assert [(run["actors"], run["regions"], run["images_per_call"]) for run in report["ray"]] == [(1, 8, 2), (2, 8, 1)]
    assert all(run["regions_per_s"] == run["regions"] / run["seconds"] for run in report["ray"])
