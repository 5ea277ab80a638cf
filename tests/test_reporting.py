"""--report-to: the run's scalars in TensorBoard (read back with its own reader) and W&B (offline run)."""

import json

import pytest
from tiny import learnable_rows, save_model, tiny_gpt2, write_jsonl
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.training.config import read_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporting")
    base = save_model(tiny_gpt2(), root / "base")
    train = write_jsonl(root / "train.jsonl", learnable_rows(8, seed=0))
    dev = write_jsonl(root / "dev.jsonl", learnable_rows(4, seed=1))
    return ["train", "--model", str(base), "--data", str(train), "--eval-data", str(dev), "--max-steps", "3"]


def test_tensorboard_events_hold_what_metrics_jsonl_holds(inputs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = runner.invoke(app, [*inputs, "--eval-every", "2", "--report-to", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_recipe(out / "config.yaml")["report_to"] == "tensorboard"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "tokens_per_s", "peak_memory_mb", "eval_loss", "eval_perplexity"):
        logged = [(r["step"], r[key]) for r in records if key in r]
        assert logged, key
        read = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in read] == [s for s, _ in logged]
        assert all(abs(v - w) <= 1e-6 * max(1.0, abs(w)) for (_, v), (_, w) in zip(read, logged))  # float32 events
    assert "rank: 4" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_wandb_offline_run_holds_the_logged_keys(inputs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"
    result = runner.invoke(app, [*inputs, "--report-to", "wandb", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    for key in (b"loss", b"lr", b"tokens_per_s", b"eval_loss", b"targets", b'"q,v"'):  # scalars and the config
        assert key in data, key


@pytest.mark.parametrize(
    "value, message",
    [("tensorbored", "unknown tensorbored"), ("none,wandb", "none cannot be combined"), ("", "must not be empty")],
)
def test_bad_report_to_is_one_line_before_loading(inputs, tmp_path, value, message):
    out = tmp_path / "run"
    result = runner.invoke(app, [*inputs, "--report-to", value, "--out", str(out)])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not out.exists()


def test_a_missing_extra_names_it_before_loading(inputs, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    result = runner.invoke(app, [*inputs, "--report-to", "wandb", "--out", str(out)])
    assert result.exit_code == 2 and "pip install 'lorakit[wandb]'" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not out.exists()
