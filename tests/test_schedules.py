"""Schedules and splits: `--lr-scheduler`, `--val-split`, `--save-total-limit`, the `--dry-run` sized from the data,
and `lorakit train --help` (every default next to its option, full option names at 80 columns)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from tiny import killed_in_step, learnable_rows, tiny_gpt2, write_jsonl
from typer.testing import CliRunner

import lorakit.models
import lorakit.training.config
import lorakit.training.data
import lorakit.training.loop
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.training.checkpoint import KEEP, step_folders
from lorakit.training.config import FIELDS, TrainConfig, build_config, read_recipe, to_yaml
from lorakit.training.data import DataSpec, batch_order, encode, read_rows, split_rows
from lorakit.training.loop import lr_at, read_data, train
from lorakit.training.memory import dry_run, estimate_memory

runner = CliRunner()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """40 distinct prompt/completion rows (a row's text names it)."""
    data = [dict(r, prompt=f"{r['prompt']} w{80 + i % 10} w{90 - i // 10}") for i, r in enumerate(learnable_rows(40))]
    assert len({json.dumps(r) for r in data}) == 40
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", data)


def config(model: Path, data: Path, out: Path, **options) -> TrainConfig:
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=4, max_steps=4, lr=1e-2)
    return build_config(base, options, source="test")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_mb")} for r in records]


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    return lines[0]


def words(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------------
# --lr-scheduler

TOTAL, WARMUP, PEAK = 10, 2, 2e-3
# step -> lr: the warmup's last step and the first after it (the peak), the middle of the decay (step 6: half-way
# from step 2 to step 10), the last step (9) and step 10 (= total, after the last: where the decays reach 0).
EXPECTED = {
    "linear": {0: PEAK / 2, 1: PEAK, 2: PEAK, 6: PEAK / 2, 9: PEAK / 8, 10: 0.0},
    "cosine": {0: PEAK / 2, 1: PEAK, 2: PEAK, 6: PEAK / 2, 9: PEAK * (1 - math.cos(math.pi / 8)) / 2, 10: 0.0},
    "constant": {0: PEAK / 2, 1: PEAK, 2: PEAK, 6: PEAK, 9: PEAK, 10: PEAK},
}


@pytest.mark.parametrize("schedule", EXPECTED)
def test_lr_at_the_warmup_end_the_middle_and_the_last_step(schedule):
    for step, lr in EXPECTED[schedule].items():
        assert lr_at(step, TOTAL, WARMUP, PEAK, schedule) == pytest.approx(lr, rel=1e-12, abs=1e-18), step
    lrs = [lr_at(step, TOTAL, WARMUP, PEAK, schedule) for step in range(TOTAL)]
    assert all(0 < lr <= PEAK for lr in lrs)  # every step learns, none above the peak
    if schedule != "constant":
        assert all(a > b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1 :]))  # decreasing after the warmup


def test_the_default_schedule_is_linear_as_before():
    assert TrainConfig().lr_scheduler == "linear"
    assert [lr_at(s, TOTAL, WARMUP, PEAK) for s in range(TOTAL)] == [
        lr_at(s, TOTAL, WARMUP, PEAK, "linear") for s in range(TOTAL)
    ]
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_at(5, TOTAL, WARMUP, PEAK, "step")


def test_a_cosine_run_logs_the_cosine_lr_records_it_and_resume_refuses_another(model, rows, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--model", str(model), "--data", str(rows), "--out", str(out), "--max-steps", "5"]
        + ["--warmup-steps", "1", "--lr", "0.01", "--lr-scheduler", "cosine", "--batch-size", "8"],
    )
    assert result.exit_code == 0, result.output
    lrs = [r["lr"] for r in metrics(out) if "lr" in r]
    assert lrs == [lr_at(s, 5, 1, 0.01, "cosine") for s in range(5)]
    assert lrs[1] == 0.01 and lrs[3] == pytest.approx(0.005)  # the peak after the warmup, half-way at the middle
    assert read_recipe(out / "config.yaml")["lr_scheduler"] == "cosine"
    line = one_error_line(runner.invoke(app, ["train", "--resume", "--out", str(out), "--lr-scheduler", "linear"]))
    assert "lr_scheduler: 'cosine' -> 'linear'" in line


# ---------------------------------------------------------------------------------------------------------------
# --val-split


def test_the_split_is_seeded_disjoint_and_in_source_order(rows):
    all_rows = read_rows(DataSpec(source=str(rows)))
    train_rows, held = split_rows(all_rows, 0.07, seed=42)  # ceil(40 x 0.07) = ceil(2.8) = 3
    assert (len(train_rows.rows), len(held.rows)) == (37, 3)
    again = split_rows(all_rows, 0.07, seed=42)
    assert (again[0].rows, again[1].rows) == (train_rows.rows, held.rows)  # same seed: same split
    assert split_rows(all_rows, 0.07, seed=7)[1].rows != held.rows  # another seed: another split
    as_text = [{json.dumps(r) for r in part.rows} for part in (train_rows, held)]
    assert not as_text[0] & as_text[1] and as_text[0] | as_text[1] == {json.dumps(r) for r in all_rows.rows}
    assert held.lines == sorted(held.lines) and train_rows.lines == sorted(train_rows.lines)
    first = held.lines[0]  # messages still name the row's own line of the file
    assert held.where(0) == f"{rows}:{first}" and held.rows[0] == all_rows.rows[first - 1]
    assert len(split_rows(all_rows, 0.25, seed=0)[1].rows) == 10  # exact products are not rounded up
    parquet_like = dataclasses.replace(all_rows, lines=None)
    kept, _ = split_rows(parquet_like, 0.5, seed=0)
    assert kept.where(0) == f"{rows} row {kept.index[0] + 1}" and kept.rows[0] == all_rows.rows[kept.index[0]]


def test_the_evaluation_rows_are_never_trained_on(model, rows, tmp_path):
    cfg = config(model, rows, tmp_path / "run", val_split=0.1)
    train_rows, held = read_data(cfg)
    assert len(held.rows) == 4 and len(train_rows.rows) == 36
    assert not {json.dumps(r) for r in train_rows.rows} & {json.dumps(r) for r in held.rows}
    # what the run trains on: the 36 rows' examples only
    result = runner.invoke(
        app, ["train", "--model", str(model), "--data", str(rows), "--val-split", "0.1", "--out", str(tmp_path / "r")]
        + ["--max-steps", "1", "--batch-size", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(--val-split 0.1, seed 42: 36 rows to train on, 4 held out for evaluation)" in words(result.output)
    assert "data: 36 examples" in words(result.output)
    assert [r["step"] for r in metrics(tmp_path / "r") if "eval_loss" in r] == [0, 1]  # evaluated on the 4 rows
    saved = read_recipe(tmp_path / "r" / "config.yaml")
    assert (saved["val_split"], saved["eval_data"]) == (0.1, None)


def test_val_split_round_trips_through_config_yaml(tmp_path):
    cfg = build_config({"val_split": 0.2, "lr_scheduler": "constant", "save_total_limit": 7})
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert build_config(read_recipe(path)) == cfg


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--val-split", "0.1", "--eval-data", "e.jsonl"], "val_split and eval_data: choose one"),
        (["--val-split", "0"], "val_split: must be in (0, 1), got 0.0"),
        (["--val-split", "1"], "val_split: must be in (0, 1), got 1.0"),
        (["--save-total-limit", "0"], "save_total_limit: must be at least 1, got 0"),
    ],
)
def test_bad_splits_and_limits_are_one_line_before_anything_loads(tmp_path, args, problem):
    out = tmp_path / "run"
    line = one_error_line(runner.invoke(app, ["train", "--model", "m", "--data", "d.jsonl", "--out", str(out), *args]))
    assert problem in line, line
    assert not out.exists()


def test_a_split_that_leaves_no_training_rows_is_refused(model, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", learnable_rows(1))
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--val-split", "0.5"]
    line = one_error_line(runner.invoke(app, args))
    assert line == (
        f"error: --val-split 0.5: {data} has 1 row(s); holding out 1 for evaluation leaves none to train on "
        "(use more rows, a smaller --val-split or --eval-data)"
    )
    assert not out.exists()


def test_a_split_that_leaves_no_evaluation_rows_is_refused(model, tmp_path):
    """The held-out rows are all rows with nothing to learn (empty completions): no evaluation example is left."""
    data = learnable_rows(2) + [{"prompt": "w4", "completion": " "}, {"prompt": "w5", "completion": ""}]
    path = write_jsonl(tmp_path / "rows.jsonl", data)
    parsed = read_rows(DataSpec(source=str(path)))
    seed = next(s for s in range(1000) if {r["prompt"] for r in split_rows(parsed, 0.5, s)[1].rows} == {"w4", "w5"})
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(path), "--out", str(out), "--val-split", "0.5"]
    line = one_error_line(runner.invoke(app, [*args, "--seed", str(seed)]))
    assert line.startswith("error: the 2 row(s) held out by --val-split 0.5 leave no evaluation rows: "), line
    assert "2 empty completion" in line and not out.exists()


def test_a_resumed_run_sees_the_same_split_and_ends_bit_identical(model, rows, tmp_path):
    """Killed in step 4 after the checkpoint of step 2, resumed: the same adapter and metrics as the uninterrupted
    run (the data fingerprints of the split pass); another --val-split on resume is refused."""
    options = dict(val_split=0.1, save_every=2, eval_every=2, dropout=0.1, seed=3)
    full = train(config(model, rows, tmp_path / "full", **options))

    with killed_in_step(4), pytest.raises(KeyboardInterrupt):
        train(config(model, rows, tmp_path / "cut", **options))
    resumed = train(config(model, rows, tmp_path / "cut", **options, resume=True))
    assert resumed.resumed_from == 2 and resumed.steps == full.steps == 4
    a, b = load_file(str(full.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(metrics(tmp_path / "cut")) == without_timing(metrics(tmp_path / "full"))
    with pytest.raises(LorakitError, match=r"val_split: 0.1 -> 0.2"):
        train(config(model, rows, tmp_path / "cut", **{**options, "val_split": 0.2}, resume=True))


# ---------------------------------------------------------------------------------------------------------------
# --save-total-limit


def test_the_default_limit_is_the_old_keep():
    assert TrainConfig().save_total_limit == KEEP == 2


def test_the_newest_n_checkpoints_are_kept_and_resume_may_change_n(model, rows, tmp_path):
    out = tmp_path / "run"
    options = dict(max_steps=4, save_every=1, save_total_limit=3)

    with killed_in_step(4), pytest.raises(KeyboardInterrupt):
        train(config(model, rows, out, **options))
    assert [p.name for p in step_folders(out / "checkpoints")] == ["step-000001", "step-000002", "step-000003"]
    result = runner.invoke(app, ["train", "--resume", "--out", str(out), "--save-total-limit", "1"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in step_folders(out / "checkpoints")] == ["step-000004"]  # the new limit prunes
    text = (out / "config.yaml").read_text()
    assert yaml.safe_load(text)["save_total_limit"] == 3  # step 0's value; the change is a comment
    assert "# resumed at step 3 with: save_total_limit: 3 -> 1" in text


# ---------------------------------------------------------------------------------------------------------------
# --dry-run sized from the data


def test_the_dry_run_sizes_activations_by_the_longest_row_and_counts_steps(model, rows, tmp_path):
    cfg = config(model, rows, tmp_path / "run", max_steps=None, epochs=2, batch_size=4, grad_accum=2, val_split=0.1)
    plan = dry_run(cfg)
    train_rows, _ = read_data(cfg)
    encoded = encode(train_rows, lorakit.models.load_tokenizer(str(model)), 64, cfg.data_spec())
    lengths = [len(e.input_ids) for e in encoded.examples]
    assert (plan.data.batch_size, plan.data.seq_len) == (4, max(lengths))
    # the length-grouped sampler's widest batch is exactly that many tokens (36 rows: 9 full batches)
    widest = max(len(b) * max(lengths[i] for i in b) for b in batch_order(lengths, 4, cfg.seed, 0))
    assert widest == plan.data.batch_size * plan.data.seq_len
    assert (plan.data.examples, plan.data.eval_rows) == (36, 4)
    assert (plan.data.steps_per_epoch, plan.data.total_steps) == (5, 10)  # ceil(9 batches / 2), 2 epochs
    config_ = lorakit.models.load_config(str(model))
    sized = estimate_memory(config_, "q,v", 4, batch_size=4, seq_len=max(lengths))
    assert plan.estimate.activation_bytes == sized.activation_bytes
    by_max_length = estimate_memory(config_, "q,v", 4, batch_size=4, seq_len=64)  # the old estimate (capped 512)
    assert plan.estimate.activation_bytes * 64 == by_max_length.activation_bytes * max(lengths)
    result = runner.invoke(
        app, ["train", "--model", str(model), "--data", str(rows), "--val-split", "0.1", "--batch-size", "4"]
        + ["--grad-accum", "2", "--epochs", "2", "--dry-run", "--out", str(tmp_path / "run")],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = words(result.stdout)
    assert "training examples │ 36; 4 rows held out for evaluation (--val-split 0.1)" in text
    assert "steps per epoch │ 5" in text and "total steps │ 10 (2 epochs)" in text
    assert f"activations, batch 4 x {max(lengths)} tokens (the longest row of the data)" in text
    assert not (tmp_path / "run").exists()


def test_a_hub_dataset_is_not_read_and_sized_by_max_length(model, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the dry run read the hub dataset")

    monkeypatch.setattr(lorakit.training.data, "_read_hub", no_download)
    result = runner.invoke(
        app, ["train", "--model", str(model), "--data", "someone/e2e", "--max-length", "32", "--dry-run"],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = words(result.stdout)
    assert "activations, batch 8 x 32 tokens (--max-length; a hub dataset is not downloaded)" in text
    assert "training examples │ unknown (a hub dataset is not downloaded)" in text


# ---------------------------------------------------------------------------------------------------------------
# lorakit train --help


def train_options() -> list:
    command = typer.main.get_command(app).commands["train"]
    return [p for p in command.params if p.param_type_name == "option"]


def help_entries(columns: int) -> dict[str, str]:
    """Option names (as printed) -> their help text, from `lorakit train --help` at this width."""
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    panel = result.stdout.split("Options")[1]
    entries: dict[str, str] = {}
    name = None
    for line in panel.splitlines():
        body = line.strip().strip("│").rstrip()
        if body.lstrip().startswith("--"):
            name, _, text = body.strip().partition("  ")
            entries[name] = text.strip()
        elif name and body.strip():
            entries[name] += " " + body.strip()
    return entries


def shown(value: str):
    """A printed default as a value: numbers, off/on, text."""
    if value in ("off", "on"):
        return value == "on"
    try:
        return float(value)
    except ValueError:
        return value


def test_every_default_appears_next_to_its_option():
    entries = help_entries(200)
    by_option = {name.split()[0]: (name, text) for name, text in entries.items()}
    for param in train_options():
        name, text = by_option[param.opts[0]]
        field = FIELDS.get(param.name)
        if field is None:  # --help
            continue
        found = re.findall(r"\[default: ([^\]]+)\]", text)
        assert len(found) == 1, (name, text)
        if field.default is not None:
            expected = field.default if isinstance(field.default, (bool, str)) else float(field.default)
            assert shown(found[0]) == expected, (name, found[0], field.default)
        if isinstance(field.default, bool):  # a switch: both names, no value
            assert name == f"{param.opts[0]} / {param.secondary_opts[0]}", name
        else:
            assert len(name.split()) == 2, name  # the option and its value's kind
    assert "[default: 4]" in by_option["--rank"][1] and "[default: 32]" in by_option["--alpha"][1]
    assert "[default: 2e-4]" in by_option["--lr"][1] and "[default: linear]" in by_option["--lr-scheduler"][1]
    assert by_option["--lr-scheduler"][0] == "--lr-scheduler linear|cosine|constant"


def test_every_option_name_is_whole_at_80_columns():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and max(len(line) for line in result.stdout.splitlines()) <= 80
    names = re.findall(r"(?<![\w-])--[a-z0-9-]+", result.stdout)
    for param in train_options():
        for name in [*param.opts, *param.secondary_opts]:
            assert name in names, name
    assert "<bool>" not in result.stdout


def test_the_epilog_lists_recipe_only_keys(monkeypatch):
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    assert "snake_case keys" in result.stdout and "recipe only" not in result.stdout  # every field has a flag
    monkeypatch.setattr(lorakit.training.config, "FIELDS", {**FIELDS, "secret_knob": FIELDS["rank"]})
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    assert "Keys without a flag (recipe only): secret_knob." in words(result.stdout)


def test_without_a_tokenizer_the_rows_are_counted_and_sized_by_max_length(tmp_path):
    """A folder with only config.json (no tokenizer): the demo set's rows are counted, not tokenized."""
    tiny_gpt2().config.save_pretrained(tmp_path / "config-only")
    args = ["train", "--model", str(tmp_path / "config-only"), "--max-length", "16", "--dry-run"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = words(result.stdout)
    assert "training examples │ 480 rows (not tokenized)" in text and "steps per epoch │ 60" in text
    assert "activations, batch 8 x 16 tokens (--max-length; the model has no usable tokenizer)" in text


def test_a_missing_local_data_file_is_an_error_not_a_hub_dataset(model, tmp_path):
    line = one_error_line(runner.invoke(app, ["train", "--model", str(model), "--data", "./nope.jsonl", "--dry-run"]))
    assert line == "error: ./nope.jsonl: no such file"
