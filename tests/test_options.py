"""Options: a value given on the command line always wins over a recipe or a resumed run's config.yaml, a 0, an empty
value or a --no-flag included; values that cannot work are refused with one `error:` line (exit 2) before anything
loads; a rank larger than an adapted layer allows is a warning naming the layer."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from tiny import learnable_rows, save_model, tiny_gpt2, write_jsonl
from typer.testing import CliRunner

import lorakit
import lorakit.evaluation.evaluate
import lorakit.models
import lorakit.training.config
import lorakit.training.distributed
import lorakit.training.loop
from lorakit.cli import app
from lorakit.lora.wrap import oversized_ranks
from lorakit.training.config import FIELDS, TrainConfig, build_config, read_recipe, to_yaml

runner = CliRunner()
HINTS = get_type_hints(TrainConfig)
REFUSED = "refused"

# Where 0 cannot work, the command line gives the smallest value that can (0 itself is in INVALID below).
NO_ZERO = dict(rank=1, batch_size=1, grad_accum=1, max_length=2, num_labels=2, max_steps=1, log_every=1)
NO_ZERO |= dict(save_every=1, eval_every=1, eval_batches=1, limit=1, eval_limit=1, nproc=1, threads=1)
NO_ZERO |= dict(early_stopping_patience=1)
NO_ZERO |= dict(alpha=1e-3, lr=1e-6, epochs=0.01, adam_eps=1e-12, save_total_limit=1, val_split=0.01)


def kind(name: str) -> tuple[Any, bool]:
    """(the field's type without None, whether None is allowed)."""
    hint = HINTS[name]
    if get_origin(hint) is Literal:
        return hint, False
    args = [a for a in get_args(hint) if a is not type(None)] or [hint]
    return args[0], type(None) in get_args(hint)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def recipe_value(name: str) -> Any:
    """A valid value other than the default (and other than what the command line gives)."""
    if name == "best_metric":  # a name from a fixed list, typed as a string
        return "bleu"
    hint, _ = kind(name)
    if get_origin(hint) is Literal:
        return next(c for c in get_args(hint) if c != FIELDS[name].default)
    if hint is bool:
        return True
    if hint is int:
        return 3
    if hint is float:
        return 0.5
    if hint is str:
        return "from-recipe"
    if get_origin(hint) is list:
        return [1]
    raise AssertionError(f"{name}: a field of a new kind ({hint}); teach this test its zero and recipe values")


def zero_cases(name: str) -> list[tuple[list[str], Any]]:
    """[(command-line arguments, the value the config must hold or REFUSED)]: the zero, empty or false value."""
    hint, optional = kind(name)
    if get_origin(hint) is Literal:  # no zero: the default, typed, must still beat the recipe
        return [([flag(name), FIELDS[name].default], FIELDS[name].default)]
    if hint is bool:
        return [(["--no-" + flag(name)[2:]], False)]
    if hint in (int, float):
        if name in NO_ZERO:
            return [([flag(name), str(NO_ZERO[name])], NO_ZERO[name])]
        return [([flag(name), "0"], hint(0))]
    if hint is str:  # empty: clears the recipe's value where None is allowed, else refused
        return [([flag(name), ""], None if optional else REFUSED)]
    if get_origin(hint) is list:
        return [([flag(name), ""], None), ([flag(name), "0"], [0])]
    raise AssertionError(f"{name}: a field of a new kind ({hint}); teach this test its zero and recipe values")


ZERO_CASES = [(name, args, expected) for name in FIELDS for args, expected in zero_cases(name)]
DEFAULT_CASES = [
    (name, FIELDS[name].default)
    for name in FIELDS
    if FIELDS[name].default is not None and kind(name)[0] is not bool  # booleans: the --no-flag cases above
]


def base_recipe(name: str, value: Any) -> dict[str, Any]:
    """A recipe setting `name` to `value` (and what it needs), with a model and data that never load."""
    recipe = {"model": "never-loaded", "data": "never-read.jsonl", name: value}
    if name == "num_labels":
        recipe["task"] = "classification"
    if name in EVALUATES:  # settings of the evaluation during training
        recipe.update({"eval_data": "never-read-eval.jsonl", "eval_every": 2, **EVALUATES[name], name: value})
    return recipe


# What each evaluation setting needs beside evaluation rows and --eval-every.
EVALUATES: dict[str, dict[str, Any]] = dict(
    eval_generate={},
    best_metric={"eval_generate": True},
    early_stopping_patience={},
    early_stopping_threshold={"early_stopping_patience": 2},
)


def write_recipe(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def one_error_line(result: Any) -> str:
    """The single `error: ...` line of a refused command (exit 2, nothing on stdout, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    return lines[0]


def words(text: str) -> str:
    """Rich wraps long lines at the terminal width: compare text with runs of whitespace as one space."""
    return " ".join(text.split())


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a model, tokenizer or config is loaded, an evaluation starts or torchrun launches."""

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was called")

        return fail

    for module in (lorakit.models, lorakit.training.loop):
        for name in ("load_base", "load_config", "load_tokenizer"):
            monkeypatch.setattr(module, name, refuse(name))
    monkeypatch.setattr(lorakit.training.distributed, "launch", refuse("launch"))
    monkeypatch.setattr(lorakit.evaluation.evaluate, "evaluate_adapters", refuse("evaluate_adapters"))
    return refuse


@pytest.fixture
def nothing_loads(no_models, monkeypatch):
    """As `no_models`, and training does not start either."""
    monkeypatch.setattr(lorakit.training.loop, "train", no_models("train"))


@pytest.fixture
def captured(nothing_loads, monkeypatch):
    """`lorakit train` up to the training call: `built` is the config from recipe + flags, `trained` what the
    command hands to training (which returns at once)."""
    seen: dict[str, TrainConfig] = {}
    real_build = lorakit.training.config.build_config

    def build(*args, **kwargs):
        seen["built"] = real_build(*args, **kwargs)
        return seen["built"]

    def train(cfg, console=None):
        seen["trained"] = cfg
        return SimpleNamespace(main=False)  # as on a rank other than 0: the command prints nothing more

    monkeypatch.setattr(lorakit.training.config, "build_config", build)
    monkeypatch.setattr(lorakit.training.loop, "train", train)
    return seen


# ---------------------------------------------------------------------------------------------------------------
# Every train option: the zero, empty or false value on the line beats the recipe


def test_every_config_field_is_a_train_option_and_back():
    train = typer.main.get_command(app).commands["train"]
    options = {p.name for p in train.params if p.param_type_name == "option"}
    assert options == set(FIELDS)


@pytest.mark.parametrize(
    "name, args, expected", ZERO_CASES, ids=[f"{n}={a[-1] if len(a) > 1 else a[0]}" for n, a, _ in ZERO_CASES]
)
def test_zero_empty_or_false_on_the_line_beats_the_recipe(tmp_path, captured, name, args, expected):
    recipe = base_recipe(name, recipe_value(name))
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = runner.invoke(app, ["train", str(path), *args])
    if expected is REFUSED:
        line = one_error_line(result)
        assert f"{name}: must not be empty (given as {flag(name)})" in line and str(path) in line
        assert not captured
        return
    assert result.exit_code == 0, result.output
    built, trained = captured["built"], captured["trained"]
    value = getattr(built, name)
    assert value == expected and type(value) is type(expected), f"{name}: {value!r}, typed {expected!r}"
    assert built == dataclasses.replace(build_config(recipe), **{name: expected})  # the rest of the recipe holds
    if name == "data":  # cleared: the demo set is filled in, never the recipe's file
        assert trained.data != recipe["data"] and Path(trained.data).name == "demo-train.jsonl"
    else:
        assert trained == built
    saved = read_recipe(write_recipe(tmp_path / "config.yaml", yaml.safe_load(to_yaml(built))))
    assert saved[name] == expected and type(saved[name]) is type(expected)  # what config.yaml records


@pytest.mark.parametrize("name, default", DEFAULT_CASES, ids=[n for n, _ in DEFAULT_CASES])
def test_the_default_typed_on_the_line_beats_the_recipe(tmp_path, captured, name, default):
    """A flag equal to the default is still given: the recipe's other value must not win."""
    recipe = base_recipe(name, recipe_value(name))
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    typed = ",".join(map(str, default)) if isinstance(default, list) else str(default)
    result = runner.invoke(app, ["train", str(path), flag(name), typed])
    assert result.exit_code == 0, result.output
    assert getattr(captured["built"], name) == default


# ---------------------------------------------------------------------------------------------------------------
# Values that cannot work: one line naming the option and the value, exit 2, nothing loaded, nothing written

INVALID = [(name, "0") for name in NO_ZERO]
INVALID += [("rank", "-1"), ("alpha", "-1"), ("alpha", "nan"), ("alpha", "inf"), ("dropout", "-0.1")]
INVALID += [("dropout", "1"), ("dropout", "nan"), ("lr", "-1"), ("lr", "inf"), ("lr", "nan"), ("batch_size", "-1")]
INVALID += [("max_length", "1"), ("warmup_steps", "-1"), ("label_smoothing", "1"), ("label_smoothing", "-0.1")]
INVALID += [("epochs", "-1"), ("epochs", "nan"), ("epochs", "inf"), ("weight_decay", "-1"), ("weight_decay", "inf")]
INVALID += [("max_grad_norm", "-1"), ("max_grad_norm", "nan"), ("adam_beta1", "1.5"), ("adam_beta1", "-0.1")]
INVALID += [("adam_beta2", "1"), ("adam_eps", "-1"), ("adam_eps", "nan"), ("seed", "-1"), ("num_labels", "1")]
INVALID += [("val_split", "1"), ("val_split", "-0.1"), ("val_split", "nan"), ("save_total_limit", "-1")]
INVALID += [("early_stopping_threshold", "-1"), ("early_stopping_threshold", "nan")]
INVALID += [("early_stopping_threshold", "inf")]


@pytest.mark.parametrize("where", ["line", "recipe"])
@pytest.mark.parametrize("name, value", INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_values_that_cannot_work_are_refused_before_anything_loads(tmp_path, nothing_loads, where, name, value):
    out = tmp_path / "run"
    recipe = {"model": "never-loaded", "data": "never-read.jsonl", "out": str(out)}
    if name == "num_labels":
        recipe["task"] = "classification"
    path = tmp_path / "recipe.yaml"
    if where == "line":
        write_recipe(path, recipe)
        result = runner.invoke(app, ["train", str(path), flag(name), value])
    else:  # written as YAML spells it: .nan, .inf
        special = {"nan": ".nan", "inf": ".inf"}.get(value, value)
        path.write_text(yaml.safe_dump(recipe) + f"{name}: {special}\n", encoding="utf-8")
        result = runner.invoke(app, ["train", str(path)])
    line = one_error_line(result)
    assert f"{name}: must be" in line and f"got {value}" in line, line
    assert str(path) in line  # where the run's options come from, and for a typed value, that it was typed:
    assert (f"(given as {flag(name)})" in line) is (where == "line"), line  # the recipe holds no such value
    assert not out.exists()


def test_a_bad_value_on_the_line_is_refused_even_where_the_recipe_is_fine(tmp_path, nothing_loads):
    """The refused value is the one typed, not the recipe's good one (nor the default) used instead."""
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", {"model": "m", "data": "d.jsonl", "out": str(out), "max_grad_norm": 1.0})
    line = one_error_line(runner.invoke(app, ["train", str(path), "--max-grad-norm", "-1", "--rank", "0"]))
    assert line == (
        f"error: {path}: rank: must be at least 1, got 0 (given as --rank); "
        "max_grad_norm: must be 0 or more and finite, got -1.0 (given as --max-grad-norm)"
    )
    assert not out.exists()


def test_without_a_recipe_the_problem_names_the_flags(tmp_path, nothing_loads):
    out = tmp_path / "run"
    args = ["train", "--model", "m", "--data", "d.jsonl", "--out", str(out), "--label-smoothing", "1"]
    line = one_error_line(runner.invoke(app, args))
    assert line == "error: flags: label_smoothing: must be in [0, 1), got 1.0"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Real tiny runs: the typed zeros are what config.yaml records and what the run uses

RECIPE_NONZERO = dict(rank=8, seed=7, dropout=0.1, warmup_steps=3, weight_decay=0.1, label_smoothing=0.1)
RECIPE_NONZERO["max_grad_norm"] = 0.5
TYPED = dict(rank=1, seed=0, dropout=0.0, warmup_steps=0, weight_decay=0.0, label_smoothing=0.0, max_grad_norm=0.0)


def metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "peak_memory_mb")} for x in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 2-step runs of a tiny GPT-2 on 8 rows in one batch (evaluated on the same rows):

    typed:    a recipe with non-zero values, the zeros typed on the command line
    recipe:   the same zeros written in the recipe, nothing typed
    nonzero:  the recipe with non-zero values alone
    """
    root = tmp_path_factory.mktemp("runs")
    model = save_model(tiny_gpt2(initializer_range=0.5), root / "gpt2")  # peaked logits: smoothing shows
    rows = write_jsonl(root / "rows.jsonl", learnable_rows(8))
    common = dict(model=str(model), data=str(rows), eval_data=str(rows), batch_size=8, max_steps=2, lr=1e-2)
    clipped = {}
    real_clip = torch.nn.utils.clip_grad_norm_
    outputs = {}
    for name, recipe, typed in (
        ("typed", RECIPE_NONZERO, TYPED),
        ("recipe", TYPED, {}),
        ("nonzero", RECIPE_NONZERO, {}),
    ):
        calls = []

        def clip(*args, calls=calls, **kwargs):
            calls.append(args[1] if len(args) > 1 else kwargs["max_norm"])
            return real_clip(*args, **kwargs)

        path = write_recipe(root / f"{name}.yaml", {**common, **recipe, "out": str(root / name)})
        args = [a for key, value in typed.items() for a in (flag(key), str(value))]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.utils, "clip_grad_norm_", clip)
            result = runner.invoke(app, ["train", str(path), *args])
        assert result.exit_code == 0, result.output
        outputs[name], clipped[name] = result.output, calls
    return SimpleNamespace(root=root, model=model, rows=rows, clipped=clipped, output=outputs)


def test_typed_zeros_are_what_config_yaml_records(runs):
    saved = read_recipe(runs.root / "typed" / "config.yaml")
    for name, value in TYPED.items():
        assert saved[name] == value and type(saved[name]) is type(value), name
    assert saved["max_grad_norm"] == 0.0  # not None, not the recipe's 0.5
    from_recipe = read_recipe(runs.root / "recipe" / "config.yaml")
    assert {**saved, "out": None} == {**from_recipe, "out": None}


def test_typed_zeros_train_exactly_as_the_same_zeros_in_a_recipe(runs):
    """Same adapter bits, same losses: every typed value (rank 1, seed 0, dropout 0, warmup 0, weight decay 0,
    label smoothing 0, no clipping) was used, and the run with the recipe's non-zero values is different."""
    typed, recipe, nonzero = (load_file(str(runs.root / n / "adapter.safetensors")) for n in runs.clipped)
    assert typed.keys() == recipe.keys()
    for key in typed:
        assert torch.equal(typed[key], recipe[key]), key
    assert metrics(runs.root / "typed") == metrics(runs.root / "recipe")
    assert metrics(runs.root / "typed") != metrics(runs.root / "nonzero")


def test_rank_1_on_the_line_gives_rank_1_tensors(runs):
    for name, rank in (("typed", 1), ("nonzero", 8)):
        tensors = load_file(str(runs.root / name / "adapter.safetensors"))
        ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A")}
        ranks |= {t.shape[1] for k, t in tensors.items() if k.endswith("lora_B")}
        assert ranks == {rank}, name


def test_max_grad_norm_0_means_no_clipping(runs):
    assert runs.clipped["typed"] == [] and runs.clipped["recipe"] == []
    assert runs.clipped["nonzero"] == [0.5, 0.5]  # the recipe's value clips every step


def test_label_smoothing_0_on_the_line_gives_the_unsmoothed_loss(runs):
    """Step 1 trains on all 8 rows with B = 0 (the base model): with label smoothing 0 its loss is the base's
    evaluation loss at step 0 (evaluation never smooths); with the recipe's 0.1 it is not."""
    for name, smoothed in (("typed", False), ("nonzero", True)):
        records = metrics(runs.root / name)
        base = next(r["eval_loss"] for r in records if r["step"] == 0 and "eval_loss" in r)
        step1 = next(r["loss"] for r in records if r["step"] == 1 and "loss" in r)
        assert (step1 != pytest.approx(base, rel=1e-5)) is smoothed, (name, step1, base)


RESUME_ZEROS = [
    (["--seed", "0"], "seed: 7 -> 0"),
    (["--label-smoothing", "0"], "label_smoothing: 0.1 -> 0.0"),
    (["--max-grad-norm", "0"], "max_grad_norm: 0.5 -> 0.0"),
    (["--dropout", "0"], "dropout: 0.1 -> 0.0"),
    (["--warmup-steps", "0"], "warmup_steps: 3 -> 0"),
    (["--weight-decay", "0"], "weight_decay: 0.1 -> 0.0"),
]


@pytest.mark.parametrize("args, change", RESUME_ZEROS, ids=[" ".join(a) for a, _ in RESUME_ZEROS])
def test_resume_with_a_typed_zero_is_refused_not_ignored(runs, no_models, args, change):
    """`--resume` reads the run's config.yaml; a typed 0 that differs from it is a change an exact resume cannot
    take, so it is refused by name (before, the 0 was dropped and the run resumed with the saved value)."""
    out = runs.root / "nonzero"
    before = (out / "adapter.safetensors").read_bytes()
    line = one_error_line(runner.invoke(app, ["train", "--resume", "--out", str(out), *args]))
    assert change in line, line
    assert (out / "adapter.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# A rank above the smaller side of an adapted layer


def test_a_rank_larger_than_a_layer_warns_naming_the_layer(runs, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(runs.model), "--data", str(runs.rows), "--max-steps", "1", "--batch-size", "8"]
    result = runner.invoke(app, [*args, "--rank", "500", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = words(result.output)
    assert "warning: rank 500 is larger than the smaller side of transformer.h.0.attn.c_attn.q (32)" in text
    assert "and of 3 more adapted layers" in text
    assert read_recipe(out / "config.yaml")["rank"] == 500  # a warning, not a change
    assert "warning: rank" not in words(runs.output["nonzero"])  # rank 8 on 32-wide layers: no warning


@pytest.mark.parametrize("rank, warned", [(32, False), (33, True)])
def test_the_rank_warning_starts_just_above_the_smaller_side(rank, warned):
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v", rank=rank)
    found = oversized_ranks(model)
    assert bool(found) is warned
    if warned:
        assert ("transformer.h.0.attn.c_attn.q", 32) in found and len(found) == 4


# ---------------------------------------------------------------------------------------------------------------
# eval: numeric options refused by name before anything loads; zeros and empties that can work are used

EVAL_INVALID = [
    ("--batch-size", "-1"),
    ("--batch-size", "0"),
    ("--num-beams", "0"),
    ("--max-new-tokens", "0"),
    ("--max-length", "1"),
    ("--max-length", "0"),
    ("--limit", "0"),
    ("--threads", "0"),
    ("--no-repeat-ngram-size", "-1"),
    ("--length-penalty", "nan"),
    ("--length-penalty", "inf"),
]
EVAL_EMPTY = [("--split", ""), ("--prompt-field", ""), ("--completion-field", ""), ("--text-field", "")]
EVAL_EMPTY += [("--metrics", "")]


@pytest.mark.parametrize(
    "option, value", EVAL_INVALID + EVAL_EMPTY, ids=[f"{o}={v}" for o, v in EVAL_INVALID + EVAL_EMPTY]
)
def test_eval_refuses_values_that_cannot_work(tmp_path, nothing_loads, option, value):
    """E.g. `--batch-size -1 --json` used to report loss 0.0; now one line and exit 2, no report."""
    rows = write_jsonl(tmp_path / "rows.jsonl", learnable_rows(2))
    preds = tmp_path / "preds"
    args = ["eval", str(tmp_path / "a.safetensors"), "--data", str(rows), "--json", "--generate", "--out", str(preds)]
    line = one_error_line(runner.invoke(app, [*args, option, value]))
    assert option in line and (value in line if value else "empty" in line or "no metric" in line), line
    assert not preds.exists()


def test_eval_refuses_a_bad_batch_size_also_when_rescoring_predictions(tmp_path, nothing_loads):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w4", "prediction": "w5", "references": ["w5"]}])
    line = one_error_line(runner.invoke(app, ["eval", "--predictions", str(preds), "--batch-size", "-1", "--json"]))
    assert line == "error: --batch-size must be at least 1, got -1"


@pytest.fixture
def eval_call(nothing_loads, monkeypatch):
    seen: dict[str, Any] = {}

    def evaluate_adapters(adapters, spec, **kwargs):
        seen.update(kwargs, adapters=adapters, spec=spec)
        return []

    monkeypatch.setattr(lorakit.evaluation.evaluate, "evaluate_adapters", evaluate_adapters)
    return seen


def test_eval_smallest_and_empty_values_are_used(tmp_path, eval_call):
    rows = write_jsonl(tmp_path / "rows.jsonl", learnable_rows(2))
    args = ["eval", "--data", str(rows), "--json", "--generate", "--out", str(tmp_path / "preds")]
    args += ["--batch-size", "1", "--max-length", "2", "--limit", "1", "--num-beams", "1", "--max-new-tokens", "1"]
    args += ["--length-penalty", "0", "--no-repeat-ngram-size", "0", "--data-config", "", "--threads", "1"]
    args += ["--prompt-template", "", "--completion-template", ""]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"results": []}
    spec, options = eval_call["spec"], eval_call["generate_options"]
    assert (eval_call["batch_size"], eval_call["max_length"], spec.limit) == (1, 2, 1)
    assert (spec.hub_config, spec.prompt_template, spec.completion_template) == (None, None, None)
    assert (options.batch_size, options.num_beams, options.max_new_tokens) == (1, 1, 1)
    assert (options.length_penalty, options.no_repeat_ngram_size) == (0.0, 0)
    torch.set_num_threads(1)  # --threads 1 set it; as conftest leaves it for the other tests


def test_eval_limit_1_scores_only_the_first_row(runs):
    """A real evaluation: --limit 1 --batch-size 1 scores the label tokens of the first row alone."""
    args = ["eval", "--model", str(runs.model), "--data", str(runs.rows), "--json"]
    one = runner.invoke(app, [*args, "--limit", "1", "--batch-size", "1"])
    all_rows = runner.invoke(app, args)
    assert one.exit_code == 0 and all_rows.exit_code == 0, one.output + all_rows.output
    first = learnable_rows(8)[0]
    [scores] = json.loads(one.stdout)["results"]
    assert scores["tokens"] == len(first["completion"].split()) + 1  # + EOS
    assert json.loads(all_rows.stdout)["results"][0]["tokens"] > scores["tokens"]
    assert math.isfinite(scores["loss"]) and scores["loss"] > 0


# ---------------------------------------------------------------------------------------------------------------
# merge, export, import, inspect: an empty --model means the base the adapter records


def test_empty_model_means_the_recorded_base_for_merge_and_import(runs, tmp_path):
    adapter = runs.root / "typed" / "adapter.safetensors"
    merged = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "merged"), "--model", ""])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    peft = tmp_path / "peft"
    assert runner.invoke(app, ["export", str(adapter), "--out", str(peft)]).exit_code == 0
    back = tmp_path / "back.safetensors"
    imported = runner.invoke(app, ["import", str(peft), "--out", str(back), "--model", ""])
    assert imported.exit_code == 0, imported.output
    assert lorakit.read_adapter(back).base_model == lorakit.read_adapter(adapter).base_model


@pytest.mark.parametrize(
    "args",
    [["merge", "--out", "OUT", "--dtype", ""], ["export", "--out", "OUT", "--format", ""]],
    ids=["merge --dtype ''", "export --format ''"],
)
def test_empty_choices_are_refused_and_write_nothing(runs, tmp_path, args):
    out = tmp_path / "out"
    adapter = str(runs.root / "typed" / "adapter.safetensors")
    result = runner.invoke(app, [args[0], adapter, *[str(out) if a == "OUT" else a for a in args[1:]]])
    assert result.exit_code == 2 and not out.exists()
    assert args[-2] in result.stderr  # click's usage error names the option


def test_inspect_compare_empty_is_refused(runs):
    """An empty path is the current folder (typer makes Path('') '.'): refused as not an adapter file."""
    adapter = str(runs.root / "typed" / "adapter.safetensors")
    line = one_error_line(runner.invoke(app, ["inspect", adapter, "--compare", "", "--json"]))
    assert line == "error: .: no such adapter file (it is a folder)"
