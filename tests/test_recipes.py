"""Every shipped recipe parses and dry-runs on a tiny model of the same architecture."""

from pathlib import Path

import pytest
from tiny import save_model, tiny_gpt2, tiny_llama, tiny_roberta
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.training.config import build_config, read_recipe
from lorakit.training.memory import estimate_memory

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
runner = CliRunner()


def tiny_like(cfg) -> object:
    """A tiny model of the recipe's architecture (the packaged default is a Llama)."""
    name = cfg.model or "smollm2"
    if name.startswith("gpt2"):
        return tiny_gpt2()
    if name.startswith("roberta"):
        return tiny_roberta(head=False)
    return tiny_llama()


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"gpt2-medium-e2e.yaml", "gpt2-large-e2e.yaml", "smollm2-e2e.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_header_gives_the_commands(recipe):
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    for command in ("lorakit train", "lorakit eval", "lorakit merge"):
        assert command in text, f"{recipe.name}: header lacks `{command}`"
    assert "Expect" in text


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_dry_runs_on_a_tiny_model_of_its_architecture(recipe, tmp_path, monkeypatch):
    cfg = build_config(read_recipe(recipe), source=str(recipe))
    folder = save_model(tiny_like(cfg), tmp_path / "tiny")
    result = runner.invoke(app, ["train", str(recipe), "--model", str(folder), "--dry-run"])
    assert result.exit_code == 0, result.output
    # the dry run counts what the recipe's targets give on this architecture
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    est = estimate_memory(
        config, cfg.targets, cfg.rank, cfg.alpha, cfg.layers, cfg.task, cfg.batch_size, cfg.max_length
    )
    assert est.trainable_params > 0 and f"{est.trainable_params:,}" in result.output


def test_gpt2_medium_recipe_counts_the_papers_parameters():
    from transformers import GPT2Config

    cfg = build_config(read_recipe(RECIPES[[p.name for p in RECIPES].index("gpt2-medium-e2e.yaml")]))
    est = estimate_memory(GPT2Config(n_layer=24, n_embd=1024, n_head=16), cfg.targets, cfg.rank, cfg.alpha)
    assert est.trainable_params == 393_216
