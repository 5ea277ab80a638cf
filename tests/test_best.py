"""The best adapter (`best/adapter.safetensors`) and early stopping: chosen by the metric, kept across a resume, the
run stopped at the right step, and the settings refused before anything loads when they cannot work."""

import io
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import write_jsonl
from typer.testing import CliRunner

import lorakit.training.checkpoint
import lorakit.training.loop
from lorakit import report
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.training.checkpoint import BEST_COPY, RunState
from lorakit.training.config import build_config, read_recipe
from lorakit.training.loop import StopFlag, restore_best, train

runner = CliRunner()
WIDE = {"COLUMNS": "300"}  # rich draws the summary table on one line per row


def options(model: Path, data: dict, out: Path, **more) -> dict:
    base = dict(model=str(model), data=str(data["train"]), eval_data=str(data["eval"]), out=str(out))
    # every checkpoint kept, so that the best adapter can be compared with the checkpoint of its step
    return {**base, "batch_size": 2, "lr": 5e-2, "eval_every": 1, "save_total_limit": 1000, **more}


def flags(values: dict) -> list[str]:
    """{"max_steps": 4, "eval_generate": True} -> ["--max-steps", "4", "--eval-generate"]."""
    args = []
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


def run_quietly(cfg) -> tuple:
    """train(cfg) with its console recorded (wide, no wrapping): (TrainResult, what it printed)."""
    text = io.StringIO()
    result = train(cfg, console=Console(file=text, width=300))
    return result, text.getvalue()


def table(result) -> str:
    console = Console(file=io.StringIO(), width=300)
    console.print(report.train_table(result))
    return " ".join(console.file.getvalue().split())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def candidates(out: Path, key: str = "eval_loss") -> list[tuple[int, float]]:
    """(step, value) of the evaluations after step 0: the ones the best adapter is chosen from."""
    return [(r["step"], r[key]) for r in metrics(out) if key in r and r["step"] > 0]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def checkpoint_adapter(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}" / "adapter.safetensors"


def expected_stop(values: list[tuple[int, float]], patience: int, threshold: float, lower: bool = True) -> int | None:
    """The step early stopping must stop at, worked out from the logged values: `patience` evaluations in a row that
    do not beat the best so far by more than `threshold`."""
    best, count = None, 0
    for step, value in values:
        gain = math.inf if best is None else (best - value if lower else value - best)
        count = 0 if gain > threshold else count + 1
        if gain > 0:
            best = value
        if count >= patience:
            return step
    return None


def lr_schedule(monkeypatch, learn_until: int, ctrl_c_in_step: int | None = None) -> None:
    """The peak learning rate for steps 1..learn_until, then 0 (the adapter stops changing, so the evaluation loss
    stops improving); optionally a real Ctrl-C while step `ctrl_c_in_step` runs."""

    def lr_at(step, total, warmup, peak, schedule="linear"):
        if ctrl_c_in_step is not None and step == ctrl_c_in_step - 1:
            assert isinstance(getattr(signal.getsignal(signal.SIGINT), "__self__", None), StopFlag)
            os.kill(os.getpid(), signal.SIGINT)
        return peak if step < learn_until else 0.0

    monkeypatch.setattr(lorakit.training.loop, "lr_at", lr_at)


# ---------------------------------------------------------------------------------------------------------------
# The best adapter


def test_best_adapter_is_the_checkpoint_of_the_lowest_eval_loss(model, data, tmp_path, monkeypatch):
    lr_schedule(monkeypatch, learn_until=8)  # a constant, large learning rate: the loss goes down and up again
    out = tmp_path / "run"
    args = flags(options(model, data, out, max_steps=8, save_every=1, lr=0.2))
    result = runner.invoke(app, ["train", *args], env=WIDE)
    assert result.exit_code == 0, result.output

    evals = candidates(out)
    assert [s for s, _ in evals] == list(range(1, 9))
    best_step, best_loss = min(evals, key=lambda sv: sv[1])  # the first of equal values
    assert best_step < 8, "the loss should rise again with this learning rate: then best and last differ"
    best = out / "best" / "adapter.safetensors"
    assert_same_tensors(best, checkpoint_adapter(out, best_step))
    last = tensors(out / "adapter.safetensors")
    assert any(not torch.equal(t, last[k]) for k, t in tensors(best).items())  # not simply the last adapter

    # metrics.jsonl flags each new best: every evaluation lower than all before it, the last one the best
    flagged = [r["step"] for r in metrics(out) if r.get("best")]
    running = [s for i, (s, v) in enumerate(evals) if all(v < w for _, w in evals[:i])]
    assert flagged == running and flagged[-1] == best_step
    with safe_open(str(best), "pt") as f:
        meta = f.metadata()
    assert (meta["best_step"], meta["best_metric"], float(meta["best_value"])) == (str(best_step), "loss", best_loss)

    # config.yaml keeps the settings of step 0 and records the best below them
    lines = (out / "config.yaml").read_text().splitlines()
    assert lines[-1] == f"# best adapter: best/adapter.safetensors, step {best_step}, eval loss {best_loss:.6g}"
    assert read_recipe(out / "config.yaml")["max_steps"] == 8

    output = result.output
    assert f"best loss {best_loss:.4f} at step {best_step}: saved {best}" in output  # said when it is saved
    assert f"best adapter │ {best} (step {best_step}, eval loss {best_loss:.4f})" in " ".join(output.split())
    # each checkpoint keeps a copy of the best adapter as it was at that step
    assert_same_tensors(out / "checkpoints" / "step-000008" / BEST_COPY, best)
    assert_same_tensors(out / "checkpoints" / f"step-{flagged[0]:06d}" / BEST_COPY, checkpoint_adapter(out, flagged[0]))


def test_a_run_that_evaluates_only_at_the_end_keeps_that_adapter_as_the_best(model, data, tmp_path):
    cfg = build_config(options(model, data, tmp_path / "run", max_steps=2, eval_every=None))
    result, printed = run_quietly(cfg)
    assert (result.best_step, result.best_value) == (2, result.eval_loss)
    assert_same_tensors(result.best_adapter, result.adapter)
    assert [r["step"] for r in metrics(cfg_out(cfg)) if r.get("best")] == [2]


def cfg_out(cfg) -> Path:
    return Path(cfg.out)


def test_no_evaluation_data_no_best_adapter(model, data, tmp_path):
    cfg = build_config({**options(model, data, tmp_path / "run", max_steps=1, eval_every=None), "eval_data": None})
    result, _ = run_quietly(cfg)
    assert result.best_adapter is None and not (tmp_path / "run" / "best").exists()
    assert "best adapter" not in table(result)


# ---------------------------------------------------------------------------------------------------------------
# Early stopping


def test_early_stopping_stops_after_patience_evaluations_without_improvement(model, data, tmp_path, monkeypatch):
    lr_schedule(monkeypatch, learn_until=3)  # no change after step 3: no improvement either
    out = tmp_path / "run"
    cfg = build_config(options(model, data, out, max_steps=20, save_every=1, early_stopping_patience=2))
    result, printed = run_quietly(cfg)

    evals = candidates(out)
    stop = expected_stop(evals, patience=2, threshold=0.0)
    assert stop is not None and stop <= 3 + 2  # at the latest 2 evaluations after the adapter stopped changing
    assert len({v for s, v in evals if s >= 3}) == 1  # lr 0: the same loss, bit for bit
    best_step, best_loss = min(evals, key=lambda sv: sv[1])
    assert (result.steps, result.planned_steps, result.stopped_early) == (stop, 20, True)
    assert (result.best_step, result.best_value) == (best_step, best_loss)
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, stop + 1))  # nothing trained after
    why = f"no improvement of loss over 2 evaluations (best {best_loss:.4f} at step {best_step})"
    assert f"early stopping at step {stop}: {why}" in printed.splitlines()
    assert f"steps │ {stop} of 20, stopped early" in table(result)

    # its checkpoint and the last step's adapter are saved; best/ holds the best
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stop:06d}"
    state = json.loads((out / "checkpoints" / f"step-{stop:06d}" / "state.json").read_text())
    assert (state["stopped_early"], state["evals_without_improvement"], state["best_step"]) == (True, 2, best_step)
    assert_same_tensors(out / "adapter.safetensors", checkpoint_adapter(out, stop))
    assert_same_tensors(out / "best" / "adapter.safetensors", checkpoint_adapter(out, best_step))
    # config.yaml records the settings and reads back as the same configuration
    saved = read_recipe(out / "config.yaml")
    names = ("best_metric", "early_stopping_patience", "early_stopping_threshold", "eval_generate")
    assert [saved[name] for name in names] == ["loss", 2, 0.0, False]
    assert build_config(saved) == cfg

    # --resume of a run that stopped early: it is finished; says so, exit 0, writes nothing
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    resumed = runner.invoke(app, ["train", "--resume", "--out", str(out)], env=WIDE)
    assert resumed.exit_code == 0, resumed.output
    assert f"{out}: the run stopped early at step {stop}, no improvement of loss over 2 evaluations" in resumed.output
    assert "nothing done now" in resumed.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # ... and patience is a setting of the run: a resume cannot change it
    more = runner.invoke(app, ["train", "--resume", "--out", str(out), "--early-stopping-patience", "5"])
    assert more.exit_code == 2 and "early_stopping_patience: 2 -> 5" in more.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_threshold_is_absolute_and_only_larger_gains_count(model, data, tmp_path, monkeypatch):
    """With a threshold above any gain the loss can make, every evaluation after the first counts as no improvement
    (the best adapter still follows every lower loss)."""
    cfg = build_config(
        options(model, data, tmp_path / "run", max_steps=10, early_stopping_patience=2, early_stopping_threshold=10)
    )
    result, printed = run_quietly(cfg)
    evals = candidates(tmp_path / "run")
    assert result.steps == 3 == expected_stop(evals, patience=2, threshold=10.0)
    assert (result.best_step, result.best_value) == min(evals, key=lambda sv: sv[1])
    assert "early stopping at step 3: no improvement of loss by more than 10 over 2 evaluations" in printed


def test_a_higher_text_metric_is_better_and_early_stopping_follows_it(model, data, tmp_path, monkeypatch):
    """--eval-generate --best-metric bleu: generations at every evaluation, scored (here by a scripted BLEU, as the
    tiny model's text scores ~0 everywhere); the highest is the best, a tie is no improvement."""
    script = iter([1.0, 2.0, 5.0, 4.0, 5.0, 9.0])  # step 0 (the base, no candidate), then steps 1, 2, ...
    seen = []

    def scripted(predictions, references, names):
        seen.append((len(predictions), names))
        return {name: next(script) if name == "bleu" else 50.0 for name in names}

    monkeypatch.setattr(lorakit.training.loop, "text_metrics", scripted)
    out = tmp_path / "run"
    cfg = build_config(
        options(model, data, out, max_steps=10, save_every=1, eval_generate=True, best_metric="bleu")
        | {"early_stopping_patience": 2}
    )
    result, printed = run_quietly(cfg)
    assert seen == [(6, ["bleu", "rouge_l"])] * 5  # 6 unique prompts, generated for at each evaluation
    assert [(r["step"], r["eval_bleu"], r.get("best", False)) for r in metrics(out) if "eval_bleu" in r] == [
        (0, 1.0, False),
        (1, 2.0, True),
        (2, 5.0, True),
        (3, 4.0, False),
        (4, 5.0, False),
    ]
    assert (result.steps, result.best_step, result.best_value, result.best_metric) == (4, 2, 5.0, "bleu")
    assert "early stopping at step 4: no improvement of bleu over 2 evaluations (best 5.0000 at step 2)" in printed
    assert_same_tensors(out / "best" / "adapter.safetensors", checkpoint_adapter(out, 2))
    assert "(step 2, eval bleu 5.0000)" in table(result)


def test_eval_generate_scores_real_generations(model, data, tmp_path):
    out = tmp_path / "run"
    cfg = build_config(options(model, data, out, max_steps=1, eval_generate=True, eval_batches=1))
    run_quietly(cfg)
    records = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert 0 <= r["eval_bleu"] <= 100 and 0 <= r["eval_rouge_l"] <= 100


def test_a_best_metric_that_cannot_run_here_is_an_error_before_training(model, data, tmp_path, monkeypatch):
    def unavailable(predictions, references, names):
        import warnings

        from lorakit.evaluation.metrics import MetricWarning

        warnings.warn("bleu unavailable: sacrebleu is not installed", MetricWarning, stacklevel=2)
        return dict.fromkeys(names)

    monkeypatch.setattr(lorakit.training.loop, "text_metrics", unavailable)
    cfg = build_config(options(model, data, tmp_path / "run", max_steps=2, eval_generate=True, best_metric="bleu"))
    with pytest.raises(LorakitError, match=r"--best-metric bleu: cannot be computed here \(bleu unavailable: sacre"):
        run_quietly(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # found at the base's evaluation, before step 1
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------------
# Resume


def test_ctrl_c_and_resume_end_with_the_same_best_adapter_and_the_same_stop(model, data, tmp_path, monkeypatch):
    """Interrupted + --resume = uninterrupted: the same best adapter (bits), the same step of early stopping (the
    count of evaluations without improvement went through the checkpoint) and the same metrics."""
    common = options(model, data, None, max_steps=20, save_every=3, early_stopping_patience=3)
    common.pop("out")
    full, cut = tmp_path / "full", tmp_path / "cut"
    lr_schedule(monkeypatch, learn_until=2)
    assert runner.invoke(app, ["train", *flags(common), "--out", str(full)]).exit_code == 0
    stop = max(r["step"] for r in metrics(full))
    stopped_at = json.loads((full / "checkpoints" / f"step-{stop:06d}" / "state.json").read_text())
    assert stopped_at["stopped_early"] and stop < 20

    interrupt = stop - 1  # after at least one evaluation without improvement: the count must survive the resume
    lr_schedule(monkeypatch, learn_until=2, ctrl_c_in_step=interrupt)
    interrupted = runner.invoke(app, ["train", *flags(common), "--out", str(cut)])
    assert interrupted.exit_code == 130
    saved = json.loads((cut / "checkpoints" / f"step-{interrupt:06d}" / "state.json").read_text())
    assert saved["evals_without_improvement"] >= 1 and not saved["stopped_early"]
    assert (cut / "checkpoints" / f"step-{interrupt:06d}" / BEST_COPY).is_file()

    lr_schedule(monkeypatch, learn_until=2)
    resumed = runner.invoke(app, ["train", "--resume", "--out", str(cut)])
    assert resumed.exit_code == 0, resumed.output
    assert f"early stopping at step {stop}" in " ".join(resumed.output.split())
    assert_same_tensors(full / "best" / "adapter.safetensors", cut / "best" / "adapter.safetensors")
    assert_same_tensors(full / "adapter.safetensors", cut / "adapter.safetensors")
    timing = ("tokens_per_s", "peak_memory_mb")
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics(cut)] == [
        {k: v for k, v in r.items() if k not in timing} for r in metrics(full)
    ]
    final = json.loads((cut / "checkpoints" / f"step-{stop:06d}" / "state.json").read_text())
    assert final == stopped_at


def test_resume_puts_back_the_best_adapter_of_its_checkpoint(tmp_path):
    """A killed run may have saved a best after its last checkpoint: the resume starts from the checkpoint's best
    (its copy), or from none."""
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / BEST_COPY).write_bytes(b"the best at step 3")
    best = out / "best" / "adapter.safetensors"
    best.parent.mkdir()
    best.write_bytes(b"a newer best, of step 5, from the run that was killed")
    restore_best(out, ckpt, RunState(step=4, best_step=3, best_value=1.0))
    assert best.read_bytes() == b"the best at step 3"
    restore_best(out, ckpt, RunState(step=4))
    assert not best.exists()


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda s: {**s, "best_step": 3}, "best_step and best_value are set together"),
        (lambda s: {**s, "best_step": "3", "best_value": 1.0}, "best_step is '3'"),
        (lambda s: {**s, "best_step": 3, "best_value": float("nan")}, "best_value is nan"),
        (lambda s: {**s, "stopped_early": 1}, "stopped_early is 1"),
        (lambda s: {**s, "evals_without_improvement": -1}, "evals_without_improvement is -1"),
    ],
)
def test_damaged_best_state_is_named(tmp_path, change, problem):
    state = change(json.loads(json.dumps(RunState(step=4).__dict__)))
    with pytest.raises(LorakitError, match=problem):
        RunState.from_json(state, tmp_path / "state.json")


def test_state_of_older_checkpoints_reads_with_no_best():
    old = {"step": 4, "epoch": 0, "batch": 4, "data": "x"}
    state = RunState.from_json(old, Path("state.json"))
    assert (state.best_step, state.best_value, state.evals_without_improvement, state.stopped_early) == (
        None,
        None,
        0,
        False,
    )


# ---------------------------------------------------------------------------------------------------------------
# Settings that cannot work: one error line, exit 2, before anything loads

REFUSED = [
    (["--early-stopping-patience", "0"], "early_stopping_patience: must be at least 1, got 0"),
    (["--early-stopping-threshold", "-1"], "early_stopping_threshold: must be 0 or more and finite, got -1.0"),
    (["--early-stopping-threshold", "nan"], "early_stopping_threshold: must be 0 or more and finite, got nan"),
    (["--early-stopping-threshold", "0.1"], "early_stopping_threshold: only with early_stopping_patience"),
    (
        ["--best-metric", "accuracy"],
        "best_metric: must be one of loss, bleu, nist, meteor, rouge_l, cider, got accuracy",
    ),
    (["--best-metric", "bleu"], "best_metric: bleu scores generated text, which needs eval_generate"),
    (["--no-eval-data", "--early-stopping-patience", "2"], "early_stopping_patience: needs eval_data (--eval-data)"),
    (["--no-eval-data", "--eval-generate"], "eval_generate: needs eval_data (--eval-data)"),
    (["--no-eval-every", "--early-stopping-patience", "2"], "early_stopping_patience: needs eval_every"),
]


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model, tokenizer or config was loaded")

    for name in ("load_base", "load_config", "load_tokenizer"):
        monkeypatch.setattr(lorakit.training.loop, name, refuse)


@pytest.mark.parametrize("args, problem", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_settings_that_cannot_work_are_one_error_line(data, tmp_path, nothing_loads, args, problem):
    out = tmp_path / "run"
    given = ["--model", "never-loaded", "--data", str(data["train"]), "--out", str(out)]
    if "--no-eval-data" not in args:
        given += ["--eval-data", str(data["eval"])]
    if "--no-eval-every" not in args:
        given += ["--eval-every", "2"]
    result = runner.invoke(app, ["train", *given, *[a for a in args if a not in ("--no-eval-data", "--no-eval-every")]])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: flags: ") and problem in line, line
    assert not out.exists()


def test_eval_generate_needs_prompt_completion_rows_before_the_model_loads(model, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lorakit.training.loop, "load_base", refuse)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "w4 w5 w6"}] * 4)
    args = ["train", "--model", str(model), "--data", str(text), "--eval-data", str(text), "--eval-generate"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --eval-generate needs prompt/completion rows; {text} holds text rows"
    ]


def test_recipe_and_config_yaml_round_trip(tmp_path):
    values = dict(
        data="d.jsonl",
        eval_data="e.jsonl",
        eval_every=5,
        eval_generate=True,
        best_metric="rouge_l",
        early_stopping_patience=4,
        early_stopping_threshold=0.5,
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(values))
    cfg = build_config(read_recipe(tmp_path / "r.yaml"))
    assert {k: getattr(cfg, k) for k in values} == values
