"""Mixed precision for every task, and stops that are not errors.

- {fp32, bf16, fp16} x {causal LM, classification with a new head, classification with the checkpoint's head}
  x {plain, 8-bit base}: each trains and lowers the loss; the base runs in the compute dtype (or int8) while
  everything the optimizer holds (LoRA A/B, a new head) is fp32, and fp16 unscales fp32 gradients.
- A frozen base whose activations overflow fp16 stops at step 1 with one line naming fp16 and the precisions
  that work (bf16, fp32), which then train it.
- Ctrl-C, SIGTERM and a NaN stop are not `ValueError`s; the CLI's exit codes (2, 1, 130, 143) are documented.
"""

import importlib.util
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import learnable_rows, save_model, tiny_gpt2, tiny_llama, write_jsonl
from transformers import LlamaForSequenceClassification
from typer.testing import CliRunner

import lorakit
import lorakit.training.loop as loop
import lorakit.training.loss
from lorakit.cli import app
from lorakit.errors import CheckFailed, LorakitError, TrainingDiverged, TrainingInterrupted
from lorakit.models import DTYPES
from lorakit.training.config import build_config
from lorakit.training.precision import FP16_8BIT_CPU_TORCH

runner = CliRunner()


def torch_version() -> tuple[int, int]:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (lorakit[8bit]) not installed")

PRECISIONS = ("fp32", "bf16", "fp16")
# task id -> (model folder, data file, lorakit task)
TASKS = {
    "causal-lm": ("gpt2", "lm.jsonl", "causal-lm"),  # GPT-2: fused Conv1D q,v slices
    "new-head": ("llama", "cls.jsonl", "classification"),  # a causal-LM folder: `score` is created at random
    "existing-head": ("llama-cls", "cls.jsonl", "classification"),  # saved from LlamaForSequenceClassification
}
OVERFLOW_SCALE = 1e4  # up_proj and down_proj x 1e4: MLP outputs ~4e5 > fp16's 65504; weights (< 800) still fit


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny model folders and data the models learn in a few steps."""
    root = tmp_path_factory.mktemp("precision")
    save_model(tiny_gpt2(), root / "gpt2")
    save_model(tiny_llama(), root / "llama")
    base = tiny_llama()
    base.config.num_labels = 2
    torch.manual_seed(0)
    save_model(LlamaForSequenceClassification(base.config).eval(), root / "llama-cls")
    hot = tiny_llama()
    with torch.no_grad():
        for name, param in hot.named_parameters():
            if name.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")):
                param.mul_(OVERFLOW_SCALE)
    save_model(hot, root / "hot")
    write_jsonl(
        root / "lm.jsonl", [{"prompt": f"w{4 + i} w{20 + i}", "completion": f"w{40 + i} w{60 + i}"} for i in range(8)]
    )
    rng = random.Random(0)
    rows = []
    for i in range(16):  # class 0: words w4..w39, class 1: w50..w89
        low, high = (4, 40) if i % 2 == 0 else (50, 90)
        rows.append({"text": " ".join(f"w{rng.randrange(low, high)}" for _ in range(4)), "label": i % 2})
    write_jsonl(root / "cls.jsonl", rows)
    write_jsonl(root / "rows.jsonl", learnable_rows(8))
    return root


def config(root: Path, out: Path, model: str, data: str, **options):
    values = dict(model=str(root / model), data=str(root / data), eval_data=str(root / data), out=str(out))
    values.update(batch_size=8, max_steps=10, lr=5e-2, targets="q,v", max_length=32)
    return build_config(values, options, source="test")


def capture_runs(monkeypatch) -> list:
    """The `Run` (model, optimizer, scaler) of each training started from now on."""
    runs, real = [], loop.setup

    def setup(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(loop, "setup", setup)
    return runs


def matrix() -> list:
    cases = []
    for eight_bit in (False, True):
        for task in TASKS:
            for precision in PRECISIONS:
                marks = [needs_bnb] if eight_bit else []
                ident = f"{precision}-{task}-{'8bit' if eight_bit else 'plain'}"
                cases.append(pytest.param(precision, task, eight_bit, marks=marks, id=ident))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize(("precision", "task", "eight_bit"), matrix())
def test_every_precision_task_and_base_trains_fp32_master_weights(
    root, tmp_path, monkeypatch, precision, task, eight_bit
):
    model, data, kind = TASKS[task]
    runs = capture_runs(monkeypatch)
    # Clipping unscales the gradients every step: fp16's scaler refuses fp16 gradients there.
    cfg = config(
        root, tmp_path / "run", model, data, task=kind, precision=precision, load_in_8bit=eight_bit, max_grad_norm=1.0
    )
    if precision == "fp16" and eight_bit and torch_version() < FP16_8BIT_CPU_TORCH:
        # fails inside torch 2.3's backward: refused up front, before the model loads
        with pytest.raises(LorakitError, match="needs torch >= 2.13"):
            loop.train(cfg)
        assert runs == []
        return
    result = loop.train(cfg)
    (run,) = runs

    assert result.eval_loss < result.first_eval_loss - 0.1, (result.first_eval_loss, result.eval_loss)
    named = dict(run.model.named_parameters())
    trained = {name for name, p in named.items() if p.requires_grad}
    held = [p for group in run.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(named[name]) for name in trained}
    assert {p.dtype for p in held} == {torch.float32}  # fp32 master weights, whatever the compute dtype
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in held)
    assert run.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert 0 < run.scaler.get_scale() < float("inf")

    head = {name for name in trained if "lora_" not in name}
    assert head == ({"score.weight"} if task == "new-head" else set())  # an existing head stays as it was
    tensors = load_file(str(result.adapter))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert {k for k in tensors if "lora_" not in k} == head

    frozen = {p.dtype for p in named.values() if not p.requires_grad}
    if eight_bit:
        assert torch.int8 in frozen
        assert lorakit.read_adapter(result.adapter).metadata["base_dtype"] == "int8"
    else:
        assert frozen == {DTYPES[precision]}  # the base really computes in the chosen precision


# ---------------------------------------------------------------------------------------------------------------
# A base that overflows fp16


def test_a_base_that_overflows_fp16_stops_at_step_1_with_one_line_naming_bf16_and_fp32(root, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(root / "hot"), "--data", str(root / "lm.jsonl"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--precision", "fp16", "--max-steps", "3", "--batch-size", "8"])
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: loss became nan at step 1; training stopped; "), line
    assert line.endswith(
        "the frozen base overflows fp16 (--precision fp16) before any update: use --precision bf16 or fp32"
    )
    assert "Traceback" not in result.output and not (out / "adapter.safetensors").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_suggested_precisions_train_the_base_that_overflows_fp16(root, tmp_path, precision):
    result = loop.train(config(root, tmp_path / "run", "hot", "lm.jsonl", precision=precision))
    assert result.eval_loss < result.first_eval_loss - 0.05


# ---------------------------------------------------------------------------------------------------------------
# Stops are not errors of the input


def test_stop_exceptions_are_not_value_errors():
    assert issubclass(TrainingInterrupted, KeyboardInterrupt) and not issubclass(TrainingInterrupted, Exception)
    assert issubclass(TrainingDiverged, RuntimeError) and not issubclass(TrainingDiverged, ValueError)
    assert TrainingInterrupted("", None, signal.SIGINT).exit_code == 130
    assert TrainingInterrupted("", None, signal.SIGTERM).exit_code == 143
    assert TrainingDiverged.exit_code == CheckFailed("").exit_code == 1
    assert LorakitError("").exit_code == 2


def ctrl_c_at_step(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """Send `signum` to this process while step `step` (1-based) runs (StopFlag handles it)."""
    real = loop.lr_at

    def lr_then_signal(s, *args):
        if s == step - 1:
            os.kill(os.getpid(), signum)
        return real(s, *args)

    monkeypatch.setattr(loop, "lr_at", lr_then_signal)


def test_catching_value_error_around_train_does_not_swallow_a_ctrl_c_or_a_nan_stop(root, tmp_path, monkeypatch):
    """`lorakit.training.loop.train` is what a library user calls (`lorakit` does not re-export it)."""
    ctrl_c_at_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted) as interrupted:
        try:
            loop.train(config(root, tmp_path / "cut", "gpt2", "rows.jsonl", batch_size=2, max_steps=4))
        except ValueError:
            pytest.fail("a Ctrl-C was caught as a ValueError")
    assert interrupted.value.exit_code == 130 and interrupted.value.checkpoint.name == "step-000002"

    with pytest.raises(TrainingDiverged) as diverged:
        try:
            loop.train(config(root, tmp_path / "hot", "hot", "lm.jsonl", precision="fp16", max_steps=2))
        except ValueError:
            pytest.fail("a NaN stop was caught as a ValueError")
    assert "fp16" in str(diverged.value) and diverged.value.checkpoint is None


STOPS = {
    "ctrl-c": (signal.SIGINT, 130, "interrupted at step 2; checkpoint saved in"),
    "sigterm": (signal.SIGTERM, 143, "interrupted at step 2 (SIGTERM); checkpoint saved in"),
}


@pytest.mark.parametrize(("signum", "code", "message"), STOPS.values(), ids=STOPS.keys())
def test_a_signal_at_step_2_exits_with_its_code_and_one_line(root, tmp_path, monkeypatch, signum, code, message):
    ctrl_c_at_step(monkeypatch, 2, signum)
    out = tmp_path / "run"
    args = ["train", "--model", str(root / "gpt2"), "--data", str(root / "rows.jsonl"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--max-steps", "4", "--batch-size", "2"])
    assert result.exit_code == code, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {message} {out / 'checkpoints' / 'step-000002'}"), line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"


def test_a_second_ctrl_c_that_aborts_at_once_exits_130(root, tmp_path, monkeypatch):
    def abort(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "lr_at", abort)
    args = ["train", "--model", str(root / "gpt2"), "--data", str(root / "rows.jsonl"), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--max-steps", "2"])
    assert result.exit_code == 130 and result.stderr.splitlines() == ["error: interrupted"]


def test_a_nan_stop_via_the_cli_exits_1_with_one_line(root, tmp_path, monkeypatch):
    real = lorakit.training.loss.batch_loss

    def nan_loss(*args, **kwargs):
        loss, n = real(*args, **kwargs)
        return loss * float("nan"), n

    monkeypatch.setattr(lorakit.training.loss, "batch_loss", nan_loss)
    args = ["train", "--model", str(root / "gpt2"), "--data", str(root / "rows.jsonl"), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--max-steps", "2", "--precision", "bf16"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: loss became nan at step 1; training stopped"]


# ---------------------------------------------------------------------------------------------------------------
# Exit codes, documented


EXIT_CODES = {
    "0": "done",
    "1": "stopped on a NaN/inf loss",
    "2": "bad input",
    "130": "Ctrl-C",
    "143": "SIGTERM",
}


def test_lorakit_help_lists_the_exit_codes():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # rich wraps the epilog to the terminal's width
    assert "Exit codes:" in text
    assert text.index("Exit codes:") < text.index("0 done") < text.index("1 a failed check")
    for code, meaning in EXIT_CODES.items():
        assert f" {code} " in text and meaning in text, (code, meaning)


def test_the_errors_module_documents_the_same_exit_codes():
    import lorakit.errors

    doc = lorakit.errors.__doc__
    for code in EXIT_CODES:
        assert f"- {code}: " in doc, code
    assert "TrainingDiverged" in doc and "TrainingInterrupted" in doc and "ValueError" in doc
