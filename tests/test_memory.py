"""`lorakit train --dry-run`: the parameter counts and adapter size of the real run, from the config alone."""

import json
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file
from tiny import save_model, tiny_bert, tiny_gpt2, tiny_llama
from transformers import GPT2Config
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.models import load_base
from lorakit.training.config import build_config
from lorakit.training.loop import train
from lorakit.training.memory import dry_run_estimate, estimate_memory

runner = CliRunner()

CASES = {
    # name: (model builder, task, options)
    "gpt2-qv-slices-of-c_attn": (tiny_gpt2, "causal-lm", dict(targets="q,v")),
    "llama-all-linear-one-layer": (tiny_llama, "causal-lm", dict(targets="all-linear", layers=[1], rank=3)),
    "bert-classification-new-head": (lambda: tiny_bert(num_labels=3).bert, "classification", dict(targets="q,v")),
    "bert-classifier-checkpoint": (lambda: tiny_bert(num_labels=3), "classification", dict(targets="all-linear")),
}


def write_data(root: Path, task: str) -> Path:
    """4 prompt/completion rows, or 6 labelled texts in 3 classes (the run's head size comes from the data)."""
    if task == "classification":
        path = root / "labels.csv"
        path.write_text("text,label\n" + "".join(f"w{4 + i} w{9 + i},{i % 3}\n" for i in range(6)))
    else:
        path = root / "rows.jsonl"
        rows = [{"prompt": f"w{4 + i} w{20 + i}", "completion": f"w{40 + i}"} for i in range(4)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_dry_run_counts_equal_the_real_run(case, tmp_path):
    """Trainable and frozen parameters exactly; adapter tensor bytes exactly; the file within 0.5% (only the digits of
    the base fingerprints in its header are unknown)."""
    build, task, options = case
    model = save_model(build(), tmp_path / "model")
    values = dict(model=str(model), data=str(write_data(tmp_path, task)), task=task, out=str(tmp_path / "run"))
    cfg = build_config(values, {**options, "max_steps": 1}, source="test")
    est = dry_run_estimate(cfg)
    real = train(cfg)
    assert (est.trainable_params, est.frozen_params) == (real.trainable_params, real.frozen_params)
    tensors = load_file(str(real.adapter))
    assert est.adapter_tensor_bytes == 4 * real.trainable_params == sum(t.nbytes for t in tensors.values())
    assert abs(est.adapter_file_bytes - real.adapter_bytes) <= 0.005 * real.adapter_bytes
    if task == "classification":  # the head is trained in full when the checkpoint lacks it
        new_head = "classifier.weight" in lorakit.read_adapter(real.adapter).trained_params
        assert new_head == (case is CASES["bert-classification-new-head"])


def test_dry_run_loads_no_weights_and_prints_the_real_count(tmp_path, monkeypatch):
    model = save_model(tiny_llama(), tmp_path / "model")
    wrapped = tiny_llama()
    lorakit.add_lora(wrapped, "q,v,mlp", rank=2)
    expected = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)

    def no_weights(*args, **kwargs):
        raise AssertionError("the dry run loaded weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    monkeypatch.setattr(lorakit.training.loop, "load_base", no_weights)
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--targets", "q,v,mlp", "--rank", "2", "--out", str(out), "--dry-run"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{expected:,}" in result.stdout
    assert not out.exists()


def test_dry_run_on_a_gpt2_medium_config_counts_the_papers_393216(tmp_path):
    """The paper's GPT-2 Medium with q,v at r=4 (Table 4: 0.35M), from a folder holding nothing but config.json."""
    GPT2Config(n_layer=24, n_embd=1024, n_head=16).save_pretrained(tmp_path / "gpt2-medium")
    result = runner.invoke(
        app, ["train", "--model", str(tmp_path / "gpt2-medium"), "--targets", "q,v", "--rank", "4", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "393,216" in result.stdout
    est = estimate_memory(GPT2Config(n_layer=24, n_embd=1024, n_head=16), "q,v", 4)
    assert est.trainable_params == 393_216 and est.adapter_tensor_bytes == 4 * 393_216


def test_8bit_estimate_matches_the_bytes_of_a_real_8bit_base(tmp_path):
    """Block linear weights in int8 plus one fp32 scale per output row; the rest in fp32; counts unchanged."""
    pytest.importorskip("bitsandbytes")
    folder = save_model(tiny_llama(), tmp_path / "model")
    real = load_base(str(folder), dtype="fp32", load_in_8bit=True)
    lorakit.add_lora(real, "q,v")
    scales = [m.weight.SCB for m in real.modules() if hasattr(getattr(m, "weight", None), "SCB")]
    tensors = [*real.parameters(), *scales]
    frozen_bytes = sum(t.numel() * t.element_size() for t in tensors if not t.requires_grad)
    est = estimate_memory(tiny_llama().config, "q,v", 4, load_in_8bit=True)
    assert est.weights_bytes == frozen_bytes
    assert est.trainable_params == sum(p.numel() for p in real.parameters() if p.requires_grad)
