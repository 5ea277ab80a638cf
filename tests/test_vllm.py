"""The vLLM check of `export --format peft`: its rules applied to exported and altered folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import randomize_lora, save_model, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.deploy.peft import export_peft
from lorakit.deploy.vllm import MAX_LORA_RANKS, check_folder, report_lines
from lorakit.lora.adapter import save_adapter
from lorakit.models import load_base


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"gpt2": save_model(tiny_gpt2(), root / "gpt2"), "llama": save_model(tiny_llama(), root / "llama")}


def exported(folder: Path, targets: str, tmp_path: Path, rank: int = 4) -> Path:
    model = load_base(str(folder))
    lorakit.add_lora(model, targets, rank=rank, alpha=8.0)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a.safetensors", base_model=str(folder))
    return export_peft(tmp_path / "a.safetensors", tmp_path / "peft")


@pytest.mark.parametrize("targets", ["q,v", "q,k,v,o", "all-linear"])
def test_llama_adapter_fits_with_the_smallest_allowed_max_lora_rank(bases, tmp_path, targets):
    out = exported(bases["llama"], targets, tmp_path, rank=4)
    check = check_folder(out, "LlamaForCausalLM")
    assert check.problems == [] and check.known
    assert check.max_rank == 4 and check.max_lora_rank == 8
    lines = report_lines(out)  # the class comes from the folder's own metadata
    assert lines[0].startswith("vLLM: fits")
    assert lines[1].split() == [
        "vllm",
        "serve",
        str(bases["llama"]),
        "--enable-lora",
        "--lora-modules",
        f"peft={out.resolve()}",
        "--max-lora-rank",
        "8",
    ]


def test_max_lora_rank_is_the_smallest_allowed_value_that_holds_the_rank(bases, tmp_path):
    out = exported(bases["llama"], "q", tmp_path, rank=9)
    assert check_folder(out, "LlamaForCausalLM").max_lora_rank == 16
    for rank, expected in [(1, 1), (8, 8), (9, 16), (33, 64), (300, 320), (512, 512)]:
        assert check_folder(_alter(out, r=rank), "LlamaForCausalLM").max_lora_rank == expected
        assert expected in MAX_LORA_RANKS


def test_gpt2_adapters_are_refused_because_vllm_gpt2_takes_no_lora(bases, tmp_path):
    out = exported(bases["gpt2"], "q,v", tmp_path)
    check = check_folder(out, "GPT2LMHeadModel")
    assert len(check.problems) == 1 and "GPT2LMHeadModel does not support LoRA yet" in check.problems[0]
    assert report_lines(out)[0] == "vLLM: will not load this adapter:"


def _alter(out: Path, **config) -> Path:
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return out


@pytest.mark.parametrize(
    "config, problem",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"r": 1024}, "above vLLM's largest --max-lora-rank"),
        ({"rank_pattern": {"q_proj": 600}}, "rank 600"),
    ],
)
def test_what_vllm_refuses_is_named(bases, tmp_path, config, problem):
    out = _alter(exported(bases["llama"], "q,v", tmp_path), **config)
    problems = check_folder(out, "LlamaForCausalLM").problems
    assert len(problems) == 1 and problem in problems[0]


def test_modules_vllm_does_not_know_are_named(tmp_path):
    out = tmp_path / "peft"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.zeros(2, 8),
        "base_model.model.model.layers.0.self_attn.rotary.lora_B.weight": torch.zeros(8, 2),
    }
    save_file(tensors, str(out / "adapter_model.safetensors"))
    problems = check_folder(out, "Qwen2ForCausalLM").problems
    assert problems == [
        "model.layers.0.self_attn.rotary: vLLM's Qwen2ForCausalLM takes LoRA only on q_proj, k_proj, v_proj, "
        "o_proj, gate_proj, up_proj, down_proj"
    ]
    unknown = check_folder(out, "")
    assert unknown.problems == [] and not unknown.known


def test_cli_export_prints_the_serve_command(bases, tmp_path):
    model = load_base(str(bases["llama"]))
    lorakit.add_lora(model, "q,v", rank=16, alpha=8.0)
    save_adapter(model, tmp_path / "a.safetensors", base_model=str(bases["llama"]))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    serve = [line.strip() for line in result.output.splitlines() if line.strip().startswith("vllm serve")]
    assert serve == [
        f"vllm serve {bases['llama']} --enable-lora --lora-modules p={(tmp_path / 'p').resolve()} --max-lora-rank 16"
    ]
