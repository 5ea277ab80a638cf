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


def test_eval_generate_runs_the_adapters_in_one_pass_with_the_same_predictions(setup, tmp_path, monkeypatch):
    """`lorakit eval A B C --generate`: one generation pass over base and adapters (batches mixing models) writes
    the predictions and scores the one-adapter-at-a-time path gives."""
    import json

    from tiny import learnable_rows, write_jsonl
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.evaluation import evaluate as evaluate_module

    folder, paths = setup
    data = write_jsonl(tmp_path / "eval.jsonl", learnable_rows(7, seed=4))
    calls = []
    real_generate = evaluate_module.generate

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate", counted)
    outputs = {}
    for mode in ("stacked", "one at a time"):
        if mode != "stacked":
            monkeypatch.setattr(evaluate_module, "stackable", lambda adapters: False)
        out = tmp_path / mode
        args = ["eval", *map(str, paths), "--data", str(data), "--generate", "--max-new-tokens", "6"]
        result = CliRunner().invoke(app, [*args, "--batch-size", "5", "--out", str(out), "--json"])
        assert result.exit_code == 0, result.output
        files = sorted(out.glob("*.jsonl"))
        assert len(files) == 1 + len(paths)
        outputs[mode] = ({f.name: f.read_text() for f in files}, json.loads(result.stdout))
    assert calls[0] == 7 * 4 and calls[1:] == [7] * 4  # one pass of 7 prompts x 4 models, then 4 passes of 7
    assert outputs["stacked"][0] == outputs["one at a time"][0]
    for a, b in zip(outputs["stacked"][1]["results"], outputs["one at a time"][1]["results"], strict=True):
        assert a.pop("loss") == pytest.approx(b.pop("loss"), rel=1e-6)
        assert a.pop("perplexity") == pytest.approx(b.pop("perplexity"), rel=1e-6)
        a.pop("predictions"), b.pop("predictions")  # the two runs' folders
        assert a == b and "bleu" in a  # name, tokens and the metrics


def test_generate_texts_on_stacked_adapters_equals_each_adapter_loaded_alone(setup):
    from lorakit.evaluation.generation import generate_texts, load_adapted, load_stacked

    folder, paths = setup
    prompts = ["w5 w9 w13", "w40", "w7 w7 w8 w60", "w11 w12", "w70 w3", "w33 w34 w35"]
    options = GenerateOptions(max_new_tokens=6, batch_size=4, stop="")
    mixed = generate_texts(load_stacked(paths), prompts, options, chat=False, adapters=ROWS)
    for i, j in enumerate(ROWS):
        single = load_adapted(paths[j]) if j >= 0 else load_adapted(None, str(folder))
        assert mixed[i] == generate_texts(single, [prompts[i]], options, chat=False)[0], (i, j)
