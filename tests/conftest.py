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


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny GPT-2 model folder (with the word-level tokenizer), one per test module."""
    from tiny import save_model, tiny_gpt2

    return save_model(tiny_gpt2(), tmp_path_factory.mktemp("model") / "gpt2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """10 training rows (5 batches of 2 per epoch) and 6 evaluation rows of other prompts, one set per module."""
    from tiny import learnable_rows, write_jsonl

    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", learnable_rows(10, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", learnable_rows(6, seed=1)),
    }
