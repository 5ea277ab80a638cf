"""Recipes and the resolved configuration: any train option in YAML, flags on top, every problem named at once."""

from pathlib import Path

import pytest
import yaml
from tiny import save_model, tiny_gpt2
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.training.config import FIELDS, build_config, read_recipe, to_yaml

runner = CliRunner()
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))

# A value other than the default for every field, of every kind: None-able, lists, literals, floats, strings that
# YAML would misread if they were written unquoted.
EVERYTHING = dict(
    model="gpt2-medium",
    task="classification",
    num_labels=3,
    trust_remote_code=True,
    precision="bf16",
    gradient_checkpointing=True,
    load_in_8bit=True,
    load_in_4bit=False,  # refused next to load_in_8bit (test_4bit.py)
    bnb_4bit_quant_type="fp4",
    fsdp=False,  # refused next to load_in_8bit (test_fsdp.py)
    base_dropout=True,
    attn_implementation="sdpa",
    compile=True,
    group_by_length=True,
    packing=True,
    tf32=False,
    data="data: train.jsonl",
    eval_data="e2e_nlg",
    val_split=None,  # refused next to eval_data: its round trip is in test_schedules.py
    split="train[:10%]",
    eval_split="test",
    data_config="default",
    text_field="sentence",
    prompt_field="mr",
    completion_field="ref",
    messages_field="conversation",
    label_field="y",
    prompt_template="{mr}{eos}",
    completion_template=" {ref}",
    limit=100,
    eval_limit=10,
    max_length=128,
    targets="re:.*attn.*",
    rank=8,
    alpha=16,
    dropout=0.1,
    layers=[0, 2],
    epochs=2.5,
    max_steps=1000,
    batch_size=4,
    grad_accum=2,
    lr=1e-10,
    warmup_steps=500,
    lr_scheduler="cosine",
    weight_decay=0.0,
    adam_beta1=0.8,
    adam_beta2=0.99,
    adam_eps=1e-8,
    max_grad_norm=1.0,
    label_smoothing=0.1,
    seed=7,
    out="runs/e2e",
    save_every=100,
    save_total_limit=5,
    eval_every=50,
    eval_batches=5,
    eval_generate=True,
    best_metric="bleu",
    early_stopping_patience=3,
    early_stopping_threshold=0.01,
    log_every=10,
    resume=True,
    overwrite=False,
    dry_run=True,
    nproc=2,
    threads=3,
    allow_pickle=True,
    report_to="tensorboard,wandb",
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_the_example_sets_every_field():
    """A new TrainConfig field must join EVERYTHING, so that the round trip below covers it (overwrite and val_split
    exclude resume and eval_data, load_in_4bit and fsdp exclude load_in_8bit, which EVERYTHING sets)."""
    assert EVERYTHING.keys() == FIELDS.keys()
    excluded = ("overwrite", "val_split", "load_in_4bit", "fsdp")
    assert all(EVERYTHING[name] != f.default for name, f in FIELDS.items() if name not in excluded)


@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "everything"])
def test_yaml_round_trip_gives_the_same_config(tmp_path, values):
    cfg = build_config(values)
    path = write(tmp_path / "config.yaml", to_yaml(cfg))
    assert build_config(read_recipe(path)) == cfg
    assert list(read_recipe(path)) == list(FIELDS)  # every key, in field order


def test_flags_override_the_recipe(tmp_path):
    recipe = read_recipe(write(tmp_path / "r.yaml", "rank: 2\nalpha: 16\ntargets: q,k,v\n"))
    cfg = build_config(recipe, {"rank": 8, "lr": 1e-3}, source="r.yaml")
    assert (cfg.rank, cfg.alpha, cfg.targets, cfg.lr) == (8, 16.0, "q,k,v", 1e-3)


def test_recipe_keys_may_use_dashes_and_ints_for_floats():
    cfg = build_config({"max-steps": 10, "alpha": 32, "epochs": 3})
    assert cfg.max_steps == 10 and isinstance(cfg.alpha, float) and isinstance(cfg.epochs, float)


def test_exponent_numbers_that_yaml_reads_as_strings_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `2e-4` without a dot as a string; a recipe means the number."""
    recipe = read_recipe(write(tmp_path / "r.yaml", "lr: 2e-4\nadam_eps: 1e-6\n"))
    assert recipe["lr"] == "2e-4"  # what YAML gives us
    cfg = build_config(recipe)
    assert (cfg.lr, cfg.adam_eps) == (2e-4, 1e-6)


def test_every_problem_is_reported_together_by_name():
    recipe = {"rnak": 8, "lr": "fast", "dropout": 1.5, "bogus": 1, "precision": "fp8", "layers": "a,b"}
    with pytest.raises(LorakitError) as error:
        build_config(recipe, {"batch_size": 0}, source="r.yaml")
    message = str(error.value)
    assert message.startswith("r.yaml: ")
    for part in (
        "unknown key 'rnak' (did you mean rank?)",
        "unknown key 'bogus'",
        "lr: expected a number, got 'fast'",
        "precision: expected one of fp32, bf16, fp16, got 'fp8'",
        "layers: expected a list of integers",
        "dropout: must be in [0, 1), got 1.5",
        "batch_size: must be at least 1, got 0",
    ):
        assert part in message, part


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"rank": 0}, "rank: must be at least 1"),
        ({"max_steps": 0}, "max_steps: must be at least 1"),
        ({"lr": 0}, "lr: must be positive"),
        ({"epochs": -1}, "epochs: must be positive"),
        ({"warmup_steps": -1}, "warmup_steps: must be 0 or more"),
        ({"label_smoothing": 1.0}, "label_smoothing: must be in [0, 1)"),
        ({"resume": True, "overwrite": True}, "resume and overwrite: choose one"),
        ({"rank": 2.5}, "rank: expected an integer"),
        ({"resume": "yes"}, "resume: expected true or false"),
        ({"targets": None}, "targets: must not be empty"),
    ],
)
def test_bad_values_are_named(values, problem):
    with pytest.raises(LorakitError, match=problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_config(values)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"rank: [1, 2\n", "r.yaml:2: invalid YAML"),
        (b"- rank\n- 4\n", "r.yaml: expected a mapping of train options, got list"),
        (b"rank: \xff\n", "r.yaml: not UTF-8 text"),
    ],
)
def test_unreadable_recipes_are_named(tmp_path, content, problem):
    (tmp_path / "r.yaml").write_bytes(content)
    with pytest.raises(LorakitError) as error:
        read_recipe(tmp_path / "r.yaml")
    assert str(error.value).startswith(str(tmp_path / problem))


def test_empty_and_missing_recipes(tmp_path):
    assert read_recipe(write(tmp_path / "empty.yaml", "# nothing set\n")) == {}
    with pytest.raises(LorakitError, match="no such recipe file"):
        read_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_shipped_recipes_parse(recipe):
    build_config(read_recipe(recipe), source=str(recipe))


# ---------------------------------------------------------------------------------------------------------------
# Through `lorakit train`


def test_cli_recipe_with_flags_on_top_is_saved_resolved(tmp_path):
    model = save_model(tiny_gpt2(), tmp_path / "model")
    write(tmp_path / "d.jsonl", '{"prompt": "w4 w5", "completion": "w6"}\n' * 4)
    text = f"model: {model}\ndata: {tmp_path / 'd.jsonl'}\nrank: 2\nlr: 2e-4\nmax_steps: 1\nbatch_size: 2\n"
    recipe = write(tmp_path / "recipe.yaml", text)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--rank", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["rank"], saved["lr"], saved["max_steps"], saved["out"]) == (3, 2e-4, 1, str(out))


def test_cli_recipe_problems_are_one_line_naming_the_file(tmp_path):
    recipe = write(tmp_path / "recipe.yaml", "rnak: 2\nlearning_rate: 1e-3\nrank: -1\n")
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {recipe}: unknown key 'rnak'")
    assert "unknown key 'learning_rate'" in line and "rank: must be at least 1" in line
    assert not (tmp_path / "run").exists()
