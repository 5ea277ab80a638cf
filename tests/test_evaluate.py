"""`lorakit eval`: base then adapters with the training masking, generation grouped by prompt, rescoring, classes."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tiny import learnable_rows, save_model, tiny_bert, tiny_gpt2, tiny_tokenizer, write_jsonl
from typer.testing import CliRunner

import lorakit.models
from lorakit.cli import app
from lorakit.evaluation.evaluate import prompt_groups, read_predictions
from lorakit.training.config import build_config
from lorakit.training.data import DataSpec, encode, read_rows
from lorakit.training.loop import train
from lorakit.training.loss import dataset_loss

runner = CliRunner()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 folder, two adapters trained on it for different modules (q,v and mlp), and their data."""
    root = tmp_path_factory.mktemp("gpt2")
    model = save_model(tiny_gpt2(), root / "model")
    data = write_jsonl(root / "train.jsonl", learnable_rows(8))
    adapters = []
    for targets in ("q,v", "mlp"):
        cfg = dict(model=str(model), data=str(data), targets=targets, max_steps=2, batch_size=4, lr=1e-2)
        adapters.append(train(build_config(cfg, {"out": str(root / targets.replace(",", ""))})).adapter)
    return {"model": model, "data": data, "adapters": adapters}


def eval_json(*args: str) -> list[dict]:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


# ---------------------------------------------------------------------------------------------------------------
# Loss and perplexity


def test_base_first_then_each_adapter_with_its_own_modules(gpt2):
    qv, mlp = gpt2["adapters"]
    results = eval_json(str(qv), str(mlp), "--data", str(gpt2["data"]), "--model", str(gpt2["model"]))
    assert [r["name"] for r in results] == ["base", str(qv), str(mlp)]
    for r in results:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"])) and r["tokens"] == results[0]["tokens"]
    assert len({r["loss"] for r in results}) == 3  # each adapter changes the model in its own way
    # The base is unwrapped between adapters: the mlp adapter scores the same with or without q,v before it.
    alone = eval_json(str(mlp), "--data", str(gpt2["data"]), "--model", str(gpt2["model"]))
    assert alone[1]["loss"] == pytest.approx(results[2]["loss"], rel=1e-6)


def test_without_model_the_base_is_the_one_the_adapter_records(gpt2):
    with_model = eval_json(str(gpt2["adapters"][0]), "--data", str(gpt2["data"]), "--model", str(gpt2["model"]))
    recorded = eval_json(str(gpt2["adapters"][0]), "--data", str(gpt2["data"]))
    assert recorded == with_model


def test_dataset_loss_is_a_token_weighted_mean_that_batching_does_not_change(gpt2):
    spec = DataSpec(str(gpt2["data"]))
    encoded = encode(read_rows(spec), tiny_tokenizer(), 64, spec)
    model = lorakit.models.load_base(str(gpt2["model"]))
    one = dataset_loss(model, encoded.examples, batch_size=1, pad_id=0)
    three = dataset_loss(model, encoded.examples, batch_size=3, pad_id=0)
    assert one.tokens == three.tokens == encoded.num_label_tokens  # completion tokens + EOS, never prompt or padding
    assert three.loss == pytest.approx(one.loss, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Generation and text metrics


def test_generate_writes_one_prediction_per_unique_prompt(gpt2, tmp_path, monkeypatch):
    rows = [
        {"prompt": "w4 w5", "completion": "w14 w15"},
        {"prompt": "w6", "completion": "w16"},
        {"prompt": "w4 w5", "completion": "w15 w14"},  # the same prompt, another reference
        {"prompt": "w4 w5", "completion": "w14"},
    ]
    data = write_jsonl(tmp_path / "repeated.jsonl", rows)
    out = tmp_path / "predictions"
    args = [str(gpt2["adapters"][0]), "--data", str(data), "--generate", "--max-new-tokens", "4", "--out", str(out)]
    base, tuned = eval_json(*args)
    for r in (base, tuned):
        assert 0 <= r["bleu"] <= 100 and 0 <= r["rouge_l"] <= 100
        lines = [json.loads(line) for line in Path(r["predictions"]).read_text().splitlines()]
        assert [line["prompt"] for line in lines] == ["w4 w5", "w6"]  # unique prompts, first-seen order
        assert [line["references"] for line in lines] == [["w14 w15", "w15 w14", "w14"], ["w16"]]
        assert all(isinstance(line["prediction"], str) for line in lines)
        assert Path(r["predictions"]).parent == out

    # Rescoring a predictions file gives the same scores and needs no model.
    def no_model(*args, **kwargs):
        raise AssertionError("rescoring loaded a model")

    monkeypatch.setattr(lorakit.models, "load_base", no_model)
    monkeypatch.setattr(lorakit.models, "load_tokenizer", no_model)
    [rescored] = eval_json("--predictions", tuned["predictions"], "--metrics", "bleu,rouge_l")
    assert rescored["bleu"] == pytest.approx(tuned["bleu"]) and rescored["rouge_l"] == pytest.approx(tuned["rouge_l"])


def test_rescoring_a_perfect_prediction_scores_100(tmp_path):
    lines = [{"prompt": "p", "prediction": "the cat sat on the mat", "references": ["a dog", "the cat sat on the mat"]}]
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    [result] = eval_json("--predictions", str(path), "--metrics", "bleu,rouge_l")
    assert result["bleu"] == pytest.approx(100) and result["rouge_l"] == pytest.approx(100)
    assert read_predictions(path) == (["the cat sat on the mat"], [["a dog", "the cat sat on the mat"]])


def test_bad_predictions_file_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "prediction": "x", "references": ["x"]}\n{"prompt": "p",\n')
    result = runner.invoke(app, ["eval", "--predictions", str(path)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {path}:2: invalid JSON")


def test_generate_with_templates_takes_references_from_the_completion_template(gpt2, tmp_path):
    rows = [{"mr": "w4 w5", "ref": "w14 w15"}, {"mr": "w4 w5", "ref": "w16"}, {"mr": "w6", "ref": "w17"}]
    data = write_jsonl(tmp_path / "mr.jsonl", rows)
    args = ["--model", str(gpt2["model"]), "--data", str(data), "--generate", "--max-new-tokens", "2"]
    templates = ["--prompt-template", "{mr}{eos}", "--completion-template", " {ref}{eos}", "--out", str(tmp_path)]
    [base] = eval_json(*args, *templates)
    lines = [json.loads(line) for line in Path(base["predictions"]).read_text().splitlines()]
    assert [line["references"] for line in lines] == [["w14 w15", "w16"], ["w17"]]


def test_prompt_groups_keep_the_whole_completion_of_a_truncated_row(tmp_path):
    rows = [{"prompt": "w4 w5", "completion": "w10 w11 w12 w13 w14 w15"}, {"prompt": "w6", "completion": "w7"}]
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    tok = tiny_tokenizer()
    data = read_rows(spec)
    encoded = encode(data, tok, 4, spec)
    assert encoded.truncated == 1
    groups = prompt_groups(data, encoded, spec.completion_field, tok)
    assert [(g.prompt, g.prompt_ids, g.references) for g in groups] == [
        ("w4 w5", tok("w4 w5")["input_ids"], ["w10 w11 w12 w13 w14 w15"]),
        ("w6", tok("w6")["input_ids"], ["w7"]),
    ]


def test_generate_needs_prompt_completion_rows(gpt2, tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "w4 w5 w6"}])
    result = runner.invoke(app, ["eval", "--model", str(gpt2["model"]), "--data", str(data), "--generate"])
    assert result.exit_code == 2
    expected = f"error: --generate needs prompt/completion or chat rows; {data} holds text rows"
    assert result.stderr.splitlines() == [expected]


# ---------------------------------------------------------------------------------------------------------------
# Classification


def labelled_csv(path: Path, n: int, num_labels: int) -> Path:
    rng = random.Random(0)
    lines = ["text,label"] + [
        f"{' '.join(f'w{rng.randrange(4, 90)}' for _ in range(4))},{i % num_labels}" for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_classification_eval_reports_accuracy_and_binary_f1(tmp_path):
    model = save_model(tiny_bert(num_labels=2), tmp_path / "bert")
    data = labelled_csv(tmp_path / "two.csv", 10, 2)
    cfg = dict(model=str(model), data=str(data), task="classification", max_steps=2, batch_size=4, lr=1e-2)
    adapter = train(build_config(cfg, {"out": str(tmp_path / "run")})).adapter
    results = eval_json(str(adapter), "--data", str(data), "--task", "classification", "--model", str(model))
    assert [r["name"] for r in results] == ["base", str(adapter)]
    for r in results:
        assert r["tokens"] == 10  # one loss item per example
        assert 0 <= r["f1"] <= 1 and (r["accuracy"] * 10) == pytest.approx(round(r["accuracy"] * 10))


def test_classification_with_three_labels_has_accuracy_only(tmp_path):
    model = save_model(tiny_bert(num_labels=3), tmp_path / "bert")
    data = labelled_csv(tmp_path / "three.csv", 9, 3)
    [base] = eval_json("--data", str(data), "--task", "classification", "--model", str(model))
    assert "accuracy" in base and "f1" not in base


def test_a_classification_adapter_needs_no_task_flag_and_shows_its_columns(tmp_path):
    from tiny import save_model, tiny_bert
    from typer.testing import CliRunner

    from lorakit.cli import app

    runner = CliRunner()
    base = save_model(tiny_bert(num_labels=2), tmp_path / "bert")
    rows = "text,label\n" + "".join(f"w{4 + i} w{9 + i},{i % 2}\n" for i in range(8))
    (tmp_path / "data.csv").write_text(rows)
    train = ["train", "--model", str(base), "--task", "classification", "--data", str(tmp_path / "data.csv")]
    assert runner.invoke(app, [*train, "--max-steps", "2", "--out", str(tmp_path / "run")]).exit_code == 0
    adapter = str(tmp_path / "run" / "adapter.safetensors")

    shown = runner.invoke(app, ["eval", adapter, "--data", str(tmp_path / "data.csv")], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "accuracy" in shown.stdout and "perplexity" not in shown.stdout and "tokens" not in shown.stdout
    as_json = runner.invoke(app, ["eval", adapter, "--data", str(tmp_path / "data.csv"), "--json"])
    results = json.loads(as_json.stdout)["results"]
    assert [set(r) >= {"name", "loss", "perplexity", "accuracy"} for r in results] == [True, True]  # JSON: every key


def test_generate_scores_chat_rows_against_the_last_assistant_turn(tmp_path):
    """Chat rows: the conversation up to its last assistant turn is the prompt (the chat template, assistant turn
    opened), that turn the reference; rows with the same conversation share one generation."""
    from transformers import AutoModelForCausalLM

    template = (
        "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant{% endif %}"
    )
    base = save_model(tiny_gpt2(), tmp_path / "base")
    tok = tiny_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(base)
    first = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"}]
    rows = [
        {"messages": [*first, {"role": "user", "content": "w8"}, {"role": "assistant", "content": "w9 w10"}]},
        {"messages": [*first, {"role": "user", "content": "w8"}, {"role": "assistant", "content": "w11"}]},
        {"messages": [{"role": "user", "content": "w12"}, {"role": "assistant", "content": "w13"}]},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = ["eval", "--model", str(base), "--data", str(data), "--generate", "--max-new-tokens", "4"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "p"), "--json"])
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in (tmp_path / "p" / "base.predictions.jsonl").read_text().splitlines()]
    assert [w["references"] for w in written] == [["w9 w10", "w11"], ["w13"]]
    model = AutoModelForCausalLM.from_pretrained(base)
    for w, row in zip(written, (rows[0], rows[2])):
        ids = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True)
        ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4, pad_token_id=0
        )
        assert w["prediction"] == tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()
