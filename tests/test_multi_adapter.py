"""Several adapters on one base, one per batch row (lora/multi.py): each row's output equals that row run alone
with its adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import probe_ids, randomize_lora, save_model, tiny_gpt2, tiny_llama, tiny_tokenizer
from torch import nn

import lorakit
from lorakit.errors import LorakitError
from lorakit.evaluation.evaluate import GenerateOptions, generate
from lorakit.lora.adapter import read_adapter, save_adapter
from lorakit.lora.multi import adapter_per_row, stack_adapters, stacked
from lorakit.models import load_base

# Adapters that differ in targets, fused slices, rank and alpha.
SPECS = {
    "gpt2": [("q,v", 2, 8.0), ("o,mlp", 4, 4.0), ("q,k,v", 8, 16.0)],
    "llama": [("q,v", 2, 8.0), ("mlp", 4, 4.0), ("all-linear", 8, 16.0)],
}
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
ROWS = [0, 1, 2, -1, 2, 0]  # each prompt's adapter (-1: the base alone)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    folder = save_model(BUILDERS[arch](), root / "base")
    paths = []
    for i, (targets, rank, alpha) in enumerate(SPECS[arch]):
        model = load_base(str(folder))
        lorakit.add_lora(model, targets, rank=rank, alpha=alpha)
        randomize_lora(model, seed=10 + i, std=1.0)
        paths.append(save_adapter(model, root / f"a{i}.safetensors", base_model=str(folder)))
    return folder, paths


def alone(folder: Path, paths: list[Path], j: int) -> nn.Module:
    model = load_base(str(folder))
    if j >= 0:
        lorakit.load_adapter(model, paths[j])
    return model.eval()


def test_each_row_gets_its_own_adapters_logits(setup):
    folder, paths = setup
    model = load_base(str(folder)).eval()
    stack_adapters(model, [read_adapter(p) for p in paths])
    ids = probe_ids(batch=len(ROWS), length=10)
    with torch.no_grad(), adapter_per_row(model, ROWS):
        mixed = model(input_ids=ids).logits
    for i, j in enumerate(ROWS):
        with torch.no_grad():
            single = alone(folder, paths, j)(input_ids=ids[i : i + 1]).logits
        assert (mixed[i : i + 1] - single).abs().max().item() <= 1e-5, (i, j)
    with torch.no_grad(), adapter_per_row(model, 1):  # one int: every row takes that adapter
        every = model(input_ids=ids).logits
        assert (every - alone(folder, paths, 1)(input_ids=ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_per_row_equals_each_row_alone(setup, num_beams):
    folder, paths = setup
    tokenizer = tiny_tokenizer()
    prompts = [[1] + row for row in probe_ids(batch=len(ROWS), length=5, seed=3).tolist()]
    prompts[1] = prompts[1][:3]  # prompts of other lengths: left padding in the mixed batch
    options = GenerateOptions(max_new_tokens=8, batch_size=len(ROWS), num_beams=num_beams, stop="")
    model = load_base(str(folder))
    stack_adapters(model, [read_adapter(p) for p in paths])
    mixed = generate(model, tokenizer, prompts, options, adapters=ROWS)
    for i, j in enumerate(ROWS):
        assert mixed[i] == generate(alone(folder, paths, j), tokenizer, [prompts[i]], options)[0], (i, j)
    assert len(set(mixed)) > 2  # the adapters change the text (else the test would prove nothing)


def test_misuse_is_one_clear_error(setup, tmp_path):
    folder, paths = setup
    model = load_base(str(folder))
    adapters = [read_adapter(p) for p in paths]
    stack_adapters(model, adapters)
    assert stacked(model)
    with pytest.raises(LorakitError, match="choose each row's with adapter_per_row"):
        model(input_ids=probe_ids())
    with pytest.raises(LorakitError, match="adapter index 3 out of range"), adapter_per_row(model, [0, 3]):
        pass
    with pytest.raises(LorakitError, match="needs a plain base"):
        stack_adapters(model, adapters)
    other = save_model(BUILDERS["llama" if "llama" in str(folder) else "gpt2"](seed=5), tmp_path / "other")
    plain = load_base(str(other))
    with pytest.raises(LorakitError, match="trained on another base"):
        stack_adapters(plain, adapters)
    assert not any(True for _ in lorakit.lora_layers(plain))  # left as it was
