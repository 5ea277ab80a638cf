"""lorakit generate and lorakit chat: an adapter tried without code, the same tokens transformers would give."""

import json

import pytest
import torch
from tiny import randomize_lora, save_model, tiny_bert, tiny_gpt2, tiny_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.evaluation.evaluate import GenerateOptions
from lorakit.evaluation.generation import chat_loop, load_adapted, prompt_ids

runner = CliRunner()
# user turns as "w1 <text>", the assistant's turn opened with "w2": words of the tiny vocabulary
TEMPLATE = "{% for m in messages %}{{ 'w1 ' if m['role'] == 'user' else 'w2 ' }}{{ m['content'] }} {% endfor %}w2"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = save_model(tiny_gpt2(), root / "base")
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v", rank=4)
    randomize_lora(model)
    lorakit.save_adapter(model, root / "a.safetensors", base_model=str(base))
    return root / "a.safetensors", base


def reference(base, adapter_path, prompt_ids_, max_new_tokens):
    """What transformers' generate gives for the adapted model, greedy."""
    model = AutoModelForCausalLM.from_pretrained(base)
    lorakit.load_adapter(model, adapter_path)
    ids = torch.tensor([prompt_ids_])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=2, pad_token_id=0)  # fmt: skip
    return tiny_tokenizer().decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()


def test_generate_gives_the_adapted_models_greedy_continuation(adapter):
    path, base = adapter
    args = ["generate", str(path), "--prompt", "w5 w6 w7", "--prompt", "w9", "--max-new-tokens", "6", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["w5 w6 w7", "w9"]
    tok = tiny_tokenizer()
    for line in lines:
        assert line["output"] == reference(base, path, tok(line["prompt"])["input_ids"], 6)
    # the adapter matters: the base alone continues otherwise
    alone = runner.invoke(app, ["generate", "--model", str(base), *args[2:]])
    assert alone.exit_code == 0 and alone.stdout != result.stdout


def test_sampling_is_seeded(adapter, tmp_path):
    path, _ = adapter
    (tmp_path / "prompts.txt").write_text("w5 w6\n\nw8\n")
    args = ["generate", str(path), "--prompts-file", str(tmp_path / "prompts.txt"), "--temperature", "1.5"]
    args += ["--top-p", "0.9", "--seed", "3", "--json"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0 and first.stdout == second.stdout and len(first.stdout.splitlines()) == 2


def test_a_chat_model_gets_its_template_and_chat_keeps_the_history(adapter, tmp_path):
    path, base = adapter
    chat_base = tmp_path / "chat-base"
    save_model(AutoModelForCausalLM.from_pretrained(base), chat_base)
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(chat_base)
    adapted = load_adapted(path, str(chat_base))
    ids = prompt_ids(adapted.tokenizer, [{"role": "user", "content": "w5 w6"}], chat=True)
    assert ids == tok("w1 w5 w6 w2")["input_ids"]  # the template's text, assistant turn opened

    result = runner.invoke(app, ["generate", str(path), "--model", str(chat_base), "--prompt", "w5 w6", "--json"])
    expected = reference(chat_base, path, ids, 64 - len(ids))  # --max-new-tokens 128, cut to the 64 positions
    assert result.exit_code == 0 and json.loads(result.stdout)["output"] == expected
    plain = runner.invoke(app, ["generate", str(path), "--model", str(chat_base), "--prompt", "w5 w6", "--no-chat"])
    assert plain.exit_code == 0

    seen, said = [], []
    turns = iter(["w5 w6", "", "w7", "/reset", "w8", "/exit", "w9"])
    real = prompt_ids

    def spy(tokenizer, messages, chat):
        seen.append([m["content"] for m in messages])
        return real(tokenizer, messages, chat)

    import lorakit.evaluation.generation as generation

    generation.prompt_ids = spy
    try:
        answers = chat_loop(adapted, GenerateOptions(max_new_tokens=3, stop=""), lambda: next(turns), said.append)
    finally:
        generation.prompt_ids = real
    assert answers == 3
    assert seen[0] == ["w5 w6"] and seen[1] == ["w5 w6", said[0], "w7"] and seen[2] == ["w8"]  # /reset forgot

    result = runner.invoke(app, ["chat", str(path), "--model", str(chat_base)], input="w5 w6\nw7\n")
    assert result.exit_code == 0 and result.stdout.count("> ") == 3  # two turns, then end of input


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "A"], "no prompt given"),
        (["generate", "A", "--prompt", "w5", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["generate", "A", "--prompt", "w5", "--temperature", "-1"], "--temperature must be 0"),
        (["generate", "A", "--prompt", "w5", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["generate", "A", "--prompt", "w5", "--chat"], "has no chat template"),
        (["generate", "A", "--prompts-file", "missing.txt"], "no such prompts file"),
        (["generate", "A", "--prompt", "w5", "--prompt", ""], "prompt 2 ('') has no tokens"),
        (["chat", "A"], "has no chat template"),
    ],
)
def test_bad_requests_are_one_line(adapter, monkeypatch, tmp_path, args, message):
    path, _ = adapter
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [str(path) if a == "A" else a for a in args])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_a_classification_adapter_does_not_generate(tmp_path):
    model = tiny_bert(num_labels=2)
    lorakit.add_lora(model, "q,v")
    lorakit.save_adapter(
        model, tmp_path / "c.safetensors", base_model=str(save_model(tiny_bert(num_labels=2), tmp_path / "b"))
    )
    result = runner.invoke(app, ["generate", str(tmp_path / "c.safetensors"), "--prompt", "w5"])
    assert result.exit_code == 2 and "classification" in result.stderr and len(result.stderr.splitlines()) == 1
