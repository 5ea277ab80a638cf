"""PEFT folders that PEFT's own loaders take (AutoPeftModelForCausalLM, the packaged default's hub id) and
import of lorakit's fused-slice export back to the same slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import probe_ids, randomize_lora, save_model, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.deploy import peft as peft_module
from lorakit.deploy.peft import export_peft, import_peft
from lorakit.deploy.vllm import report_lines
from lorakit.lora.adapter import read_adapter, save_adapter
from lorakit.models import PACKAGED, PACKAGED_HUB_ID, load_base

peft = pytest.importorskip("peft")
TOL = 1e-5


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"gpt2": save_model(tiny_gpt2(), root / "gpt2"), "llama": save_model(tiny_llama(), root / "llama")}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=probe_ids()).logits


def adapter(folder: Path, targets: str, path: Path, rank: int = 8, alpha: float = 8.0, base: str = "") -> nn.Module:
    model = load_base(str(folder))
    lorakit.add_lora(model, targets, rank=rank, alpha=alpha)
    randomize_lora(model)
    save_adapter(model, path, base_model=base or str(folder))
    return model


@pytest.mark.parametrize("targets", ["q,v", "v", "q,k,v", "q,v,o"])
def test_import_restores_fused_slices_bit_exactly(bases, tmp_path, targets):
    """lorakit -> PEFT (one rank-k*r pair on c_attn) -> lorakit gives back the q/k/v slices: same tensors, ranks,
    alphas, slices and targets record, so the same file size (before: a rank-2r adapter on all of c_attn)."""
    adapter(bases["gpt2"], targets, tmp_path / "a.safetensors", alpha=12.0)
    export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    back = import_peft(tmp_path / "peft", tmp_path / "b.safetensors")

    a, b = read_adapter(tmp_path / "a.safetensors"), read_adapter(back)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert [(m.path, m.rank, m.alpha, m.slices) for m in a.modules] == [
        (m.path, m.rank, m.alpha, m.slices) for m in b.modules
    ]
    assert b.metadata["targets"] == targets
    assert back.stat().st_size == (tmp_path / "a.safetensors").stat().st_size


def test_import_keeps_a_dense_c_attn_adapter_whole(bases, tmp_path):
    """A PEFT adapter trained on all of c_attn (dense B) has no block structure: it stays one pair."""
    model = peft.get_peft_model(load_base(str(bases["gpt2"])), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(tmp_path / "peft")
    back = read_adapter(import_peft(tmp_path / "peft", tmp_path / "b.safetensors"))
    assert [(m.rank, m.slices) for m in back.modules] == [(4, None), (4, None)]


@pytest.mark.parametrize("arch, targets", [("gpt2", "q,v"), ("llama", "q,v,o")])
def test_auto_peft_model_loads_exported_folder(bases, tmp_path, arch, targets):
    from peft import AutoPeftModelForCausalLM

    model = adapter(bases[arch], targets, tmp_path / "a.safetensors")
    out = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert (logits(loaded) - logits(model)).abs().max().item() <= TOL


def test_export_of_packaged_default_names_its_hub_id(bases, tmp_path, monkeypatch):
    """An adapter recording `lorakit:smollm2-135m-instruct` (a name only lorakit resolves) is exported with the
    hub id as base_model_name_or_path; the card says where lorakit's own base is; loading on the local base
    folder works; import without --model goes back to the packaged default."""
    model = adapter(bases["llama"], "q,v", tmp_path / "a.safetensors", base=PACKAGED)
    out = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == PACKAGED_HUB_ID
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata()["lorakit_base_model"] == PACKAGED
    card = (out / "README.md").read_text()
    assert f"base_model: {PACKAGED_HUB_ID}" in card
    assert f'from_pretrained("{PACKAGED_HUB_ID}")' in card
    assert str(lorakit.models.packaged_folder()) in card and "Q4_1" in card

    lines = report_lines(out)  # the vLLM check: the hub id to serve, and the exact local base
    assert lines[1].split()[2] == PACKAGED_HUB_ID and str(lorakit.models.packaged_folder()) in " ".join(lines)
    loaded = peft.PeftModel.from_pretrained(load_base(str(bases["llama"])), out).eval()  # the local base folder
    assert (logits(loaded) - logits(model)).abs().max().item() <= TOL

    seen = []

    def fake_base(source, config, heads):
        seen.append(source)
        return load_base(str(bases["llama"]))

    monkeypatch.setattr(peft_module, "_load_base_for", fake_base)
    back = read_adapter(import_peft(out, tmp_path / "b.safetensors"))
    assert seen == [PACKAGED] and back.base_model == PACKAGED


@pytest.mark.slow
def test_packaged_default_export_loads_on_its_local_folder(tmp_path, user_cache):
    """The real packaged SmolLM2 (skipped when not installed): PEFT on the converted local folder gives
    lorakit's logits."""
    from transformers import AutoModelForCausalLM

    from lorakit.models import packaged_model_dir

    try:
        folder = packaged_model_dir()
    except lorakit.LorakitError as e:
        pytest.skip(str(e))
    model = adapter(folder, "q,v", tmp_path / "a.safetensors", rank=4, base=PACKAGED)
    out = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == PACKAGED_HUB_ID
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lorakit_and_peft_train_identically_from_the_same_start_in_float64(arch):
    """The same base, A, head, batches and AdamW: lorakit's LoRA layers and PEFT's give the same losses and B after
    several steps (float64, so rounding cannot hide a difference in scaling, gradients or what is trained)."""
    import copy

    from tiny import tiny_bert

    from lorakit import add_lora
    from lorakit.lora.layer import LoRALayer

    base = tiny_llama() if arch == "llama" else tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    names = ["q_proj", "v_proj"] if arch == "llama" else ["query", "value"]
    ours, theirs = base, copy.deepcopy(base)
    add_lora(ours, "q,v", rank=4, alpha=8.0)
    if arch == "bert":
        ours.classifier.requires_grad_(True)  # a new head trains in full, as lorakit train does
    task = "CAUSAL_LM" if arch == "llama" else "SEQ_CLS"
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=names, task_type=task))
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for path, layer in ours.named_modules():
            if isinstance(layer, LoRALayer):  # PEFT draws its A in another order: start both from lorakit's
                modules[f"base_model.model.{path}"].lora_A["default"].weight.copy_(layer.lora_A[0])
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(5, 90, (4, 10), generator=g), torch.randint(0, 2, (4,), generator=g)

    def loss_of(model: nn.Module) -> torch.Tensor:  # in float64 (transformers' causal-LM loss upcasts to float32)
        logits = model(input_ids=ids).logits
        if arch == "llama":
            return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return nn.functional.cross_entropy(logits, labels)

    def train(model: nn.Module) -> list[float]:
        model.double().train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        losses = []
        for _ in range(6):  # one batch, learned a little more each step
            loss = loss_of(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    ours_losses, theirs_losses = train(ours), train(theirs)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    assert ours_losses[-1] < ours_losses[0] - 0.01  # it learned something to compare
    assert ours_losses == pytest.approx(theirs_losses, abs=1e-12, rel=0)
    for path, layer in ours.named_modules():
        if isinstance(layer, LoRALayer):
            b = modules[f"base_model.model.{path}"].lora_B["default"].weight
            assert layer.lora_B[0].abs().max() > 0 and torch.allclose(layer.lora_B[0], b, atol=1e-10, rtol=0)
