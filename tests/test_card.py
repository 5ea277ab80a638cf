"""Model cards: merged and exported folders carry a README.md the hub renders (its YAML metadata block first)."""

import json

from huggingface_hub import ModelCard
from tiny import learnable_rows, save_model, tiny_gpt2, write_jsonl
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.deploy.card import model_card
from lorakit.models import PACKAGED

runner = CliRunner()


def test_a_run_merged_and_exported_has_cards_with_its_settings_and_losses(tmp_path):
    base = save_model(tiny_gpt2(), tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# the base\n")
    train = write_jsonl(tmp_path / "train.jsonl", learnable_rows(8, seed=0))
    dev = write_jsonl(tmp_path / "dev.jsonl", learnable_rows(4, seed=1))
    run = tmp_path / "run"
    args = ["train", "--model", str(base), "--data", str(train), "--eval-data", str(dev), "--out", str(run)]
    args += ["--max-steps", "2", "--batch-size", "2", "--lr", "0.01", "--rank", "2", "--seed", "5"]
    assert runner.invoke(app, args).exit_code == 0
    losses = [
        r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r
    ]
    adapter = run / "adapter.safetensors"
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "merged")]).exit_code == 0
    assert (
        runner.invoke(app, ["export", str(adapter), "--format", "peft", "--out", str(tmp_path / "peft")]).exit_code == 0
    )

    for folder, library in ((tmp_path / "merged", "transformers"), (tmp_path / "peft", "peft")):
        text = (folder / "README.md").read_text()
        assert text.startswith("---\n")
        card = ModelCard(text)  # the hub's own parser of the metadata block
        assert card.data.library_name == library
        assert card.data.license == "mit"  # from the base's own card
        assert "lora" in card.data.tags and card.data.pipeline_tag == "text-generation"
        assert card.data.base_model is None  # a local folder is no hub id
        assert "| rank / alpha | 2 / 32 (scaling 16) |" in text
        assert "| lr | 0.01 |" in text and "| seed | 5 |" in text and "| max_steps | 2 |" in text
        assert f"| step 0 | {losses[0]:.4f} |" in text and f"| step 2 | {losses[-1]:.4f} |" in text


def test_hub_bases_and_the_packaged_model_are_named_for_the_hub(tmp_path):
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v", rank=4)
    lorakit.save_adapter(model, tmp_path / "a.safetensors", base_model="openai-community/gpt2")
    adapter = lorakit.read_adapter(tmp_path / "a.safetensors")

    card = ModelCard(model_card(adapter, "peft", "openai-community/gpt2", "my-adapter"))
    assert card.data.base_model == "openai-community/gpt2" and card.data.library_name == "peft"
    assert 'PeftModel.from_pretrained(base, "my-adapter")' in card.text
    assert "## Evaluation" not in card.text  # no run folder beside this adapter

    card = ModelCard(model_card(adapter, "merged", PACKAGED, "merged"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
