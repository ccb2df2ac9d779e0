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
