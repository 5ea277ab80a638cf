"""8-bit bases (bitsandbytes; int8 layers run on CPU): training learns like full precision, `lorakit merge` reloads
the base in full precision and reports the quantization error, merging into int8 and a missing bitsandbytes are
clear errors."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny import memorize_setup, runs_with_and_without, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.deploy.merge import logits_of, merge_to_folder, probe_batch
from lorakit.models import load_base

runner = CliRunner()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (lorakit[8bit]) not installed")
ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}  # GPT-2's Conv1D layers become Linear8bitLt too
OPTIONS = ["--batch-size", "8", "--max-steps", "30", "--lr", "5e-2", "--targets", "q,v"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny model folders and 8 rows to learn by heart."""
    return memorize_setup(tmp_path_factory.mktemp("int8"), ARCHS)


@pytest.fixture(scope="module")
def runs(root) -> dict[tuple[str, bool], Path]:
    """(arch, 8-bit?) -> run folder, trained through the CLI on the same data."""
    return runs_with_and_without(root, ARCHS if HAS_BNB else {}, "--load-in-8bit", "int8", OPTIONS)


def hide_bitsandbytes(monkeypatch) -> None:
    """importlib.util.find_spec (what lorakit.models and lorakit.deploy.merge ask) no longer finds bitsandbytes."""
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "bitsandbytes" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def eval_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in lines if "eval_loss" in r]


@needs_bnb
@pytest.mark.parametrize("arch", ARCHS)
def test_8bit_training_reduces_the_loss_like_full_precision(runs, arch):
    adapter = lorakit.read_adapter(runs[arch, True] / "adapter.safetensors")
    assert adapter.metadata["base_dtype"] == "int8"
    assert {m.base_type for m in adapter.modules} == {"Linear8bitLt"}
    (first, *_, last), fp32 = eval_losses(runs[arch, True]), eval_losses(runs[arch, False])
    assert last < first - 0.2  # 8 rows learnt by heart: ~4.55 (uniform over 96 words) -> ~4.2
    assert first == pytest.approx(fp32[0], abs=0.02) and last == pytest.approx(fp32[-1], abs=0.05)


@needs_bnb
@pytest.mark.parametrize("arch", ARCHS)
def test_8bit_adapter_merges_into_the_full_precision_base_into_a_plain_transformers_folder(runs, root, arch, tmp_path):
    adapter = runs[arch, True] / "adapter.safetensors"
    result = merge_to_folder(adapter, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and result.dtype == "fp32"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(torch.is_floating_point(p) for p in merged.parameters())

    full = load_base(str(root / arch))  # the full-precision base + the adapter: what the merge must equal
    lorakit.load_adapter(full, adapter)
    ids = probe_batch(full)
    merged_logits = logits_of(merged, ids)
    assert (merged_logits - logits_of(full, ids)).abs().max() <= 1e-5

    # The reported quantization error is the distance to the 8-bit model the adapter was trained with.
    quantized = load_base(str(root / arch), load_in_8bit=True)
    lorakit.load_adapter(quantized, adapter)
    expected = float((merged_logits - logits_of(quantized, ids)).abs().max())
    assert result.quantized_diff == pytest.approx(expected, rel=1e-5)
    assert 0 < result.quantized_diff < 0.1 * max(1.0, float(merged_logits.abs().max()))


@needs_bnb
def test_merge_without_bitsandbytes_still_merges_but_reports_no_quantization_error(runs, tmp_path, monkeypatch):
    hide_bitsandbytes(monkeypatch)
    result = merge_to_folder(runs["llama", True] / "adapter.safetensors", tmp_path / "merged")
    assert result.quantized_diff is None and result.max_abs_diff <= result.tolerance
    fp32 = merge_to_folder(runs["llama", False] / "adapter.safetensors", tmp_path / "merged32")
    assert fp32.quantized_diff is None  # not an 8-bit adapter


@needs_bnb
def test_merging_into_a_still_quantized_base_is_refused_and_changes_nothing(runs, root):
    model = load_base(str(root / "llama"), load_in_8bit=True)
    lorakit.load_adapter(model, runs["llama", True] / "adapter.safetensors")
    ids = probe_batch(model)
    before = logits_of(model, ids)
    with pytest.raises(lorakit.LorakitError, match=r"quantized \(8-bit\) base.*full precision.*lorakit merge"):
        lorakit.merge_adapter(model)
    assert not any(layer.merged for _, layer in lorakit.lora_layers(model))
    assert torch.equal(logits_of(model, ids), before)


def test_load_in_8bit_without_bitsandbytes_is_one_clear_error(root, tmp_path, monkeypatch):
    hide_bitsandbytes(monkeypatch)
    out = tmp_path / "run"
    args = ["train", "--model", str(root / "llama"), "--data", str(root / "data.jsonl"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--load-in-8bit"])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: --load-in-8bit needs bitsandbytes") and "lorakit[8bit]" in line
    assert not out.exists()
