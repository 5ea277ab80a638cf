import os

import pytest
import torch

# Tiny models run fastest on one thread, and CI machines have two cores.
torch.set_num_threads(1)

USER_CACHE = os.environ.get("LORAKIT_CACHE")  # read before `isolated_cache` replaces it


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    """No test writes to the user's lorakit cache (a test that needs the real packaged model uses `user_cache`)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def user_cache(monkeypatch):
    """The user's own lorakit cache, where the packaged SmolLM2 is converted once and kept."""
    if USER_CACHE is None:
        monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    else:
        monkeypatch.setenv("LORAKIT_CACHE", USER_CACHE)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
