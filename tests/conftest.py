"""Shared fixtures: one tiny random model folder per test session (built offline in about a second)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a complete tiny model folder (config, weights, tokenizer); read-only for tests."""
    from osprey.checkpoint import init_model_folder

    return init_model_folder("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from osprey.inference import OspreyPipeline

    return OspreyPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def builtin_pipeline():
    """The built-in trained model (osprey/assets/builtin): its answers depend on the masks, unlike the tiny random
    model's, so tests that must tell one mask from another compare with it."""
    from osprey import BUILTIN_MODEL_DIR
    from osprey.inference import OspreyPipeline

    return OspreyPipeline.from_pretrained(BUILTIN_MODEL_DIR, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory):
    """A tiny random SAM folder (tests/sam_folders.py), loaded back by osprey.segment's real loader."""
    from sam_folders import tiny_sam

    return tiny_sam(tmp_path_factory.mktemp("sam") / "tiny-sam")


@pytest.fixture(scope="session")
def tiny_sam3_dir(tmp_path_factory):
    from sam_folders import tiny_sam3

    return tiny_sam3(tmp_path_factory.mktemp("sam3") / "tiny-sam3")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL with pgvector for the session: the embedded server of the `pgserver` package in a temporary
    folder, stopped and removed at the end. Skipped, with the reason, only where it cannot start.

    As root, pgserver runs the server as its own `pgserver` user (which it creates) and opens the folder's parents
    to it; pytest's own temporary root is kept 0700 by every pytest run, so the folder is a plain mkdtemp instead.
    """
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    try:
        import pgserver
    except ImportError as exc:
        pytest.skip(f"pgserver is not installed ({exc}): pip install -e '.[index]'")
    folder = tempfile.mkdtemp(prefix="osprey-test-postgres-")
    try:
        server = pgserver.get_server(Path(folder) / "data", cleanup_mode="stop")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"pgserver could not start PostgreSQL here: {exc} {exc.stderr or ''}")
    except Exception as exc:  # noqa: BLE001 - whatever stops it from starting is the reason to report
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"pgserver could not start PostgreSQL here: {type(exc).__name__}: {exc}")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)
