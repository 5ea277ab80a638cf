"""4-bit bases (QLoRA: bitsandbytes `Linear4bit`, NF4 or FP4 with double quantization; runs on CPU): training learns
like full precision, the adapter exports to PEFT and imports back, a resumed run is bit-identical, `lorakit merge`
reloads the base in full precision and reports the quantization error; merging into a 4-bit base, 4-bit with 8-bit
and a missing bitsandbytes are one clear error each."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_8bit import hide_bitsandbytes
from tiny import killed_in_step, memorize_setup, runs_with_and_without, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.deploy.merge import logits_of, merge_to_folder, probe_batch
from lorakit.deploy.peft import export_peft, import_peft
from lorakit.models import load_base
from lorakit.training.config import build_config
from lorakit.training.loop import train

runner = CliRunner()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (lorakit[8bit]) not installed")
# 64 wide: bitsandbytes quantizes in blocks of 64 values, and on the CPU rows shorter than a block come out with ~4x
# the error (0.4 relative instead of NF4's 0.09). GPT-2's Conv1D layers become Linear4bit too.
ARCHS = {
    "llama": lambda: tiny_llama(hidden_size=64, intermediate_size=128),
    "gpt2": lambda: tiny_gpt2(n_embd=64),
}
OPTIONS = ["--batch-size", "8", "--max-steps", "20", "--lr", "5e-2", "--targets", "q,v"]
# NF4 moves the tiny models' starting loss by ~0.003 (measured); the 4-bit run's drop in loss over 20 steps (~0.58)
# must match the fp32 run's within 0.05 (measured: 0.02).
SAME_START, SAME_DROP = 0.02, 0.05


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny model folders and 8 rows to learn by heart."""
    return memorize_setup(tmp_path_factory.mktemp("nf4"), ARCHS)


@pytest.fixture(scope="module")
def runs(root) -> dict[tuple[str, bool], Path]:
    """(arch, 4-bit?) -> run folder, trained through the CLI on the same data."""
    return runs_with_and_without(root, ARCHS if HAS_BNB else {}, "--load-in-4bit", "nf4", OPTIONS)


def eval_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in lines if "eval_loss" in r]


@needs_bnb
@pytest.mark.slow  # (the 4 runs of the `runs` fixture: ~15 s on 2 busy cores)
@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_training_reduces_the_loss_like_full_precision(runs, arch):
    adapter = lorakit.read_adapter(runs[arch, True] / "adapter.safetensors")
    assert adapter.metadata["base_dtype"] == "nf4"
    assert {m.base_type for m in adapter.modules} == {"Linear4bit"}
    assert json.loads(adapter.metadata["train_config"])["load_in_4bit"] is True
    (first, *_, last), (first32, *_, last32) = eval_losses(runs[arch, True]), eval_losses(runs[arch, False])
    assert last < first - 0.3  # 8 rows learnt by heart: ~4.53 (uniform over 96 words) -> ~3.95
    assert first == pytest.approx(first32, abs=SAME_START)
    assert first - last == pytest.approx(first32 - last32, abs=SAME_DROP)


@needs_bnb
def test_fp4_is_the_other_4bit_type(root, tmp_path):
    out = tmp_path / "fp4"
    args = ["train", "--model", str(root / "llama"), "--data", str(root / "data.jsonl"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--max-steps", "2", "--load-in-4bit", "--bnb-4bit-quant-type", "fp4"])
    assert result.exit_code == 0, result.output
    assert lorakit.read_adapter(out / "adapter.safetensors").metadata["base_dtype"] == "fp4"


@needs_bnb
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_adapter_merges_into_the_full_precision_base_and_reports_the_4bit_error(runs, root, arch, tmp_path):
    adapter = runs[arch, True] / "adapter.safetensors"
    result = merge_to_folder(adapter, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and result.dtype == "fp32" and result.quantized_bits == "4-bit (nf4)"

    full = load_base(str(root / arch))  # the full-precision base + the adapter: what the merge must equal
    lorakit.load_adapter(full, adapter)
    ids = probe_batch(full)
    merged = load_base(str(tmp_path / "merged"))
    merged_logits = logits_of(merged, ids)
    assert (merged_logits - logits_of(full, ids)).abs().max() <= 1e-5

    quantized = load_base(str(root / arch), load_in_4bit="nf4")
    lorakit.load_adapter(quantized, adapter)
    expected = float((merged_logits - logits_of(quantized, ids)).abs().max())
    assert result.quantized_diff == pytest.approx(expected, rel=1e-5)
    assert 0 < result.quantized_diff < max(1.0, float(merged_logits.abs().max()))  # ~0.4 here: NF4 of random weights


@needs_bnb
@pytest.mark.slow
def test_merging_into_a_still_4bit_base_is_refused_and_changes_nothing(runs, root):
    model = load_base(str(root / "llama"), load_in_4bit="nf4")
    lorakit.load_adapter(model, runs["llama", True] / "adapter.safetensors")
    ids = probe_batch(model)
    before = logits_of(model, ids)
    with pytest.raises(lorakit.LorakitError, match=r"quantized \(4-bit\) base.*full precision.*lorakit merge"):
        lorakit.merge_adapter(model)
    assert not any(layer.merged for _, layer in lorakit.lora_layers(model))
    assert torch.equal(logits_of(model, ids), before)


@needs_bnb
@pytest.mark.slow
def test_4bit_adapter_exports_to_peft_and_imports_back(runs, root, tmp_path):
    adapter = runs["llama", True] / "adapter.safetensors"  # (GPT-2's q,v slices come back as one c_attn pair)
    peft_dir = export_peft(adapter, tmp_path / "peft")
    back = import_peft(peft_dir, tmp_path / "back.safetensors", model=str(root / "llama"))
    original, imported = load_file(str(adapter)), load_file(str(back))
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[k], imported[k]) for k in original)
    # The imported adapter records the full-precision base it was checked on; it still loads onto the 4-bit base
    # (the fingerprint sketch allows for NF4's rounding) and gives the original adapter's outputs there.
    model = load_base(str(root / "llama"), load_in_4bit="nf4")
    ids = probe_batch(model)
    lorakit.load_adapter(model, adapter)
    expected = logits_of(model, ids)
    lorakit.load_adapter(model, back)
    assert torch.equal(logits_of(model, ids), expected)


@needs_bnb
def test_a_killed_4bit_run_resumes_bit_identical(root, tmp_path):
    options = dict(max_steps=6, batch_size=2, lr=1e-2, save_every=2, dropout=0.1, load_in_4bit=True)
    common = dict(model=str(root / "llama"), data=str(root / "data.jsonl"), **options)
    full = train(build_config(common, {"out": str(tmp_path / "full")}, source="test"))
    killed = build_config(common, {"out": str(tmp_path / "killed")}, source="test")
    with killed_in_step(5), pytest.raises(KeyboardInterrupt):
        train(killed)
    resumed = train(build_config(common, {"out": str(tmp_path / "killed"), "resume": True}, source="test"))
    assert resumed.resumed_from == 4
    a, b = load_file(str(full.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_bnb
def test_the_dry_run_counts_4bit_weights_as_bitsandbytes_stores_them(root):
    """Packed values, absmax per block, the second level's scales and codes: byte for byte, per layer and in
    the estimate's weights (which adds one dequantized weight in flight)."""
    from lorakit.training.memory import estimate_memory, four_bit_bytes

    model = load_base(str(root / "llama"), load_in_4bit="nf4")
    stored, largest = 0, 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        parts = [module.weight.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        size = sum(t.numel() * t.element_size() for t in parts)
        assert size == four_bit_bytes(state.shape.numel())
        stored, largest = stored + size, max(largest, state.shape.numel())
    others = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dtype != torch.uint8)
    est = estimate_memory(model.config, "q,v", 4, load_in_4bit="nf4")
    assert est.weights_bytes == stored + others + 4 * largest


def test_4bit_with_8bit_is_refused_before_anything_loads(root, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(root / "llama"), "--data", str(root / "data.jsonl"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--load-in-4bit", "--load-in-8bit"])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "load_in_4bit and load_in_8bit: choose one" in line
    assert not out.exists()


def test_load_in_4bit_without_bitsandbytes_is_one_clear_error(root, tmp_path, monkeypatch):
    hide_bitsandbytes(monkeypatch)
    out = tmp_path / "run"
    args = ["train", "--model", str(root / "llama"), "--data", str(root / "data.jsonl"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--load-in-4bit"])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: --load-in-4bit needs bitsandbytes") and "lorakit[8bit]" in line
    assert not out.exists()
