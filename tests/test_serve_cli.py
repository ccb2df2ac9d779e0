"""`osprey describe` (in-process, tiny model) and `osprey serve` argument handling."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from osprey import masks as mask_codecs
from osprey.checkpoint import init_model_folder
from osprey.overlay import colour
from serve import cli
from serve.describe import MaskFileError, load_masks

H, W = 30, 40


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="osprey")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("describe")
    model = init_model_folder("tiny", root / "model", seed=0)
    image = root / "image.png"
    Image.fromarray((np.random.default_rng(2).random((H, W, 3)) * 255).astype(np.uint8)).save(image)
    a = np.zeros((H, W), bool)
    a[3:12, 4:20] = True
    b = np.zeros((H, W), bool)
    b[15:28, 22:38] = True
    sam = root / "sam.json"
    sam.write_text(json.dumps([mask_codecs.encode_sam(a), mask_codecs.encode_sam(b)]))
    regions = root / "regions.json"
    regions.write_text(json.dumps([{"box": [4, 3, 16, 9]}, {"rle": mask_codecs.encode_rle(b)}, [[22, 15, 38, 15, 38, 28]]]))
    png = root / "mask.png"
    png.write_bytes(mask_codecs.encode_png(a))
    return {"root": root, "model": model, "image": image, "sam": sam, "regions": regions, "png": png, "a": a, "b": b}


def test_mask_files_of_every_kind(files):
    masks = load_masks([str(files["sam"]), str(files["regions"]), str(files["png"])], H, W).masks
    assert masks.shape == (6, H, W)
    assert (masks[0] == files["a"]).all() and (masks[1] == files["b"]).all() and (masks[5] == files["a"]).all()
    bad = files["root"] / "bad.json"
    bad.write_text(json.dumps([{"box": [1, 1, 5, 5]}, {"box": [500, 0, 5, 5]}]))
    with pytest.raises(MaskFileError, match=r"bad.json\[1\].box: box .* lies outside"):
        load_masks([str(bad)], H, W)


def test_mask_file_size_error_names_the_cli_option(files, capsys):
    """The mask-size error of `osprey describe` names its own option (not the server's `resize_masks`)."""
    small = files["root"] / "small.png"
    small.write_bytes(mask_codecs.encode_png(files["a"][::2, ::2]))
    with pytest.raises(MaskFileError, match="--resize-masks") as info:
        load_masks([str(small)], H, W)
    assert "resize_masks" not in str(info.value)
    fitted = load_masks([str(small)], H, W, resize=True).masks
    assert fitted.shape == (1, H, W) and fitted[0, 4:10, 6:18].all()
    args = parse(["describe", str(files["image"]), "--masks", str(small), "--model", str(files["model"]),
                  "--max-tokens", "2", "--resize-masks", "--json"])
    assert args.func(args) == 0 and len(json.loads(capsys.readouterr().out)) == 1


def test_mask_file_notes_and_empty_regions(files, capsys):
    clipped = files["root"] / "clipped.json"
    clipped.write_text(json.dumps([{"box": [30, 20, 50, 50]}, mask_codecs.encode_rle(files["b"])]))  # bare COCO RLE
    regions = load_masks([str(clipped)], H, W)
    assert regions.masks[0].sum() == 10 * 10 and (regions.masks[1] == files["b"]).all()
    assert len(regions.notes) == 1 and "clipped.json[0].box" in regions.notes[0] and "clipped" in regions.notes[0]
    args = parse(["describe", str(files["image"]), "--masks", str(clipped), "--model", str(files["model"]),
                  "--max-tokens", "2"])
    assert args.func(args) == 0 and "note: " in capsys.readouterr().err
    empty = files["root"] / "empty.json"
    empty.write_text(json.dumps([{"box": [1, 1, 2, 2]}, mask_codecs.encode_rle(np.zeros((H, W), bool))]))
    with pytest.raises(MaskFileError, match=r"empty.json\[1\]: the mask is empty"):
        load_masks([str(empty)], H, W)


def test_serve_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8000)" in out and "(default: 64)" in out


def test_serve_refuses_a_sam_folder_of_another_kind(files, capsys):
    args = parse(["serve", "--model", str(files["model"]), "--sam", str(files["model"])])
    assert args.func(args) == 2
    assert "--sam" in capsys.readouterr().err


def test_describe_prints_json_and_writes_an_overlay(files, capsys):
    overlay = files["root"] / "out" / "overlay.png"
    args = parse(["describe", str(files["image"]), "--masks", str(files["sam"]), str(files["png"]),
                  "--model", str(files["model"]), "--max-tokens", "3", "--json", "--overlay", str(overlay)])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["area"] == int(files["a"].sum()) and rows[0]["box"] == [4.0, 3.0, 16.0, 9.0]
    assert all(r["completion_tokens"] <= 3 for r in rows)
    with Image.open(overlay) as out:  # the image with its regions drawn, the legend below (osprey.overlay)
        assert out.width >= W and out.height > H and out.mode == "RGB"
        drawn = np.asarray(out)[:H, :W]
    ys, xs = np.nonzero(files["b"])
    assert tuple(drawn[ys.max(), xs.max()]) == colour(1)  # region 2's outline at its bottom-right corner


def test_describe_table_and_errors(files, capsys, monkeypatch):
    args = parse(["describe", str(files["image"]), "--masks", str(files["regions"]), "--model", str(files["model"]),
                  "--max-tokens", "2", "--task", "category"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["#", "area"] and len(lines) == 4
    args = parse(["describe", str(files["image"]), "--masks", str(files["root"] / "none.json"),
                  "--model", str(files["model"])])
    assert args.func(args) == 2
    monkeypatch.delenv("OSPREY_MODEL", raising=False)
    monkeypatch.setattr("serve.config.default_model_path", lambda: None)  # as if no built-in model is installed
    args = parse(["describe", str(files["image"]), "--masks", str(files["png"])])
    assert args.func(args) == 2 and "--model" in capsys.readouterr().err


def test_default_model_resolution(files, monkeypatch, tmp_path):
    from serve.config import NoDefaultModel, resolve_model_path

    monkeypatch.delenv("OSPREY_MODEL", raising=False)
    monkeypatch.setattr("serve.config.default_model_path", lambda: files["model"])
    assert resolve_model_path(None) == str(files["model"])  # the built-in model, when installed
    monkeypatch.setenv("OSPREY_MODEL", str(tmp_path))
    assert resolve_model_path(None) == str(tmp_path)  # $OSPREY_MODEL before the built-in one
    assert resolve_model_path(str(files["model"])) == str(files["model"])  # --model before both
    monkeypatch.setenv("OSPREY_MODEL", str(tmp_path / "missing"))
    with pytest.raises(NoDefaultModel, match="OSPREY_MODEL"):
        resolve_model_path(None)


def test_serve_without_a_model_says_what_to_pass(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("OSPREY_MODEL", raising=False)
    monkeypatch.setattr("serve.config.default_model_path", lambda: None)  # as if no built-in model is installed
    args = parse(["serve"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "osprey model init" in err
    args = parse(["serve", "--model", str(tmp_path / "missing")])
    assert args.func(args) == 2
    args = parse(["serve", "--model", str(tmp_path), "--max-batch-size", "0"])
    assert args.func(args) == 2 and "max_batch_size" in capsys.readouterr().err


def test_describe_needs_no_server_extras():
    """`osprey describe` imports neither fastapi, uvicorn, httpx nor prometheus_client."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'httpx', 'prometheus_client', 'starlette'): sys.modules[name] = None\n"
            "import serve.cli, serve.describe\n"
            "print(serve.describe.load_masks.__name__)")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_serve_on_an_inherited_socket_answers_on_its_port(files):
    """`osprey serve --fd N` serves on a socket its parent bound and passed down: the parent knows the port before
    the server starts, with no window in which another process could take it (bench.load starts servers so)."""
    import subprocess
    import sys

    import httpx

    from serve.background import listening_socket

    with listening_socket() as listener:
        listener.listen()  # connections made before the server starts wait in the backlog
        port = listener.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "osprey.cli", "serve", "--model", str(files["model"]),
                                 "--port", str(port), "--fd", str(listener.fileno()), "--log-level", "warning"],
                                pass_fds=(listener.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=120).json()
    finally:
        proc.terminate()  # uvicorn shuts down, then re-raises SIGTERM: the exit status is -15 by design
        output = proc.communicate(timeout=60)[0].decode()
    assert [m["id"] for m in models["data"]] == ["model"], output
    assert f"http://127.0.0.1:{port}" in output  # the log names the inherited socket's port
