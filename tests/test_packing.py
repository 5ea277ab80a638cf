"""`--packing`: several examples per row, each with its own positions and no attention across examples; every
example's loss equals its loss in an unpacked batch."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from tiny import learnable_rows, randomize_lora, save_model, tiny_gpt2, tiny_llama, write_jsonl
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.training.config import build_config
from lorakit.training.data import IGNORE, Encoded, Example, collate
from lorakit.training.loss import batch_loss, model_inputs, with_label_index
from lorakit.training.packing import check_model, pack, pack_rows, padding_fraction

runner = CliRunner()


def examples(n: int = 9, seed: int = 0, vocab: int = 90) -> list[Example]:
    """Prompt/completion-like examples of 3..14 tokens: no label on the prompt part."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 15, (1,), generator=g))
        prompt = int(torch.randint(1, length, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def per_example_losses(model, batch, parts: list[list[int]]) -> list[float]:
    """The summed next-token loss of each example: `parts[r]` lists the lengths of the examples in row r."""
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits.float()
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=IGNORE
    )  # (B, T-1): the loss of predicting token t+1
    out = []
    for row, lengths in enumerate(parts):
        start = 0
        for n in lengths:
            out.append(float(token_loss[row, start : start + n - 1].sum()))  # targets 1..n-1 of this example
            start += n
    return out


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_each_example_has_the_same_loss_packed_as_alone(make):
    """The same examples, packed in rows of 24 tokens or one per row of a padded batch: per-example losses equal
    within 1e-5, and the packed batch's total loss (the training loss) equals the unpacked one's."""
    model = make()
    lorakit.add_lora(model, "all-linear", rank=4)
    randomize_lora(model)  # a trained adapter: LoRA's path runs too
    model.eval()
    encoded = Encoded(examples(), truncated=0, dropped=0, format="prompt_completion")
    packed = pack(encoded, capacity=24)
    assert len(packed.examples) < len(encoded.examples)  # several examples share rows
    assert all(len(e.input_ids) <= 24 for e in packed.examples)

    groups = pack_rows([len(e.input_ids) for e in encoded.examples], 24)
    order = [i for g in groups for i in g]
    unpacked = collate([encoded.examples[i] for i in order], pad_id=0)
    alone = per_example_losses(model, unpacked, [[len(encoded.examples[i].input_ids)] for i in order])
    batch = collate(packed.examples, pad_id=0)
    assert "position_ids" in batch
    together = per_example_losses(model, batch, [[len(encoded.examples[i].input_ids) for i in g] for g in groups])
    assert len(together) == len(alone) == len(encoded.examples)
    for a, b in zip(alone, together):
        assert b == pytest.approx(a, abs=1e-5)
    assert sum(together) > 1.0  # real losses, not zeros

    with torch.no_grad():
        total_unpacked, n_unpacked = batch_loss(model, with_label_index(unpacked, "causal-lm"), "causal-lm")
        total_packed, n_packed = batch_loss(model, with_label_index(batch, "causal-lm"), "causal-lm")
    assert n_packed == n_unpacked
    assert float(total_packed) == pytest.approx(float(total_unpacked), abs=1e-4)


def test_rows_fill_best_fit_decreasing_and_hold_every_example_once():
    lengths = [9, 2, 7, 3, 5, 1, 8, 4]
    rows = pack_rows(lengths, capacity=10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4 == -(-sum(lengths) // 10)  # 39 tokens: the fewest rows of 10 possible


def test_packing_removes_most_padding():
    lengths = [len(e.input_ids) for e in examples(200, seed=3)]
    packed = [sum(lengths[i] for i in r) for r in pack_rows(lengths, 64)]
    before, after = padding_fraction(lengths, 8), padding_fraction(packed, 8)
    assert after < before and after < 0.05


def test_a_model_that_lets_examples_attend_across_the_row_is_refused():
    """A model that ignores position ids (attention across the whole row) fails the check before training."""
    model = tiny_llama()
    model.eval()
    original = model.forward

    def forward(input_ids=None, position_ids=None, **kwargs):  # drops the packing information
        return original(input_ids=input_ids, **kwargs)

    model.forward = forward
    with pytest.raises(LorakitError, match="does not keep packed examples apart"):
        check_model(model, torch.device("cpu"), contextlib.nullcontext, 90, False)
    model.forward = original
    check_model(model, torch.device("cpu"), contextlib.nullcontext, 90, False)  # the model itself passes


def test_training_with_packing_reports_rows_and_padding(tmp_path):
    folder = save_model(tiny_gpt2(), tmp_path / "gpt2")
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(24, seed=0))
    out = tmp_path / "run"
    args = ["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--packing"]
    result = runner.invoke(app, [*args, "--max-length", "64", "--batch-size", "2", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("packing:"))
    assert line.startswith("packing: 24 examples in ") and "% -> " in line
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["loss"] > 0 for r in records if "loss" in r)


def test_packing_a_classifier_is_refused_before_anything_loads(tmp_path):
    cfg = build_config({"task": "classification", "packing": True, "data": str(tmp_path / "missing.jsonl")})
    with pytest.raises(LorakitError, match="--packing: only for --task causal-lm"):
        lorakit.train(cfg)
