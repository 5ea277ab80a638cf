"""PEFT export and import, checked against the `peft` library itself (a test-only oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import probe_ids, randomize_lora, save_model, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta
from torch import nn

import lorakit
from lorakit.deploy.peft import _pattern_key, export_peft, import_peft
from lorakit.errors import LorakitError
from lorakit.lora.adapter import read_adapter, save_adapter
from lorakit.models import load_base

peft = pytest.importorskip("peft")

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}
TOL = 1e-5
Q0 = "model.layers.0.self_attn.q_proj"  # a tiny-Llama module: (in, out) = (32, 32)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny base folders, one per architecture."""
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_model(build(), root / arch) for arch, build in BUILDERS.items()}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=probe_ids()).logits


def lorakit_adapter(folder: Path, targets: str, path: Path, rank: int = 2, alpha: float = 8.0) -> nn.Module:
    """A lorakit-wrapped base with random B, saved to `path`; returns the wrapped model."""
    model = load_base(str(folder))
    lorakit.add_lora(model, targets, rank=rank, alpha=alpha, dropout=0.1)
    randomize_lora(model)
    save_adapter(model, path, base_model=str(folder))
    return model


def peft_adapter(folder: Path, out: Path, seed: int = 3, **config) -> nn.Module:
    """A PEFT LoRA model on the base in `folder` with random B, saved to `out`; returns the PEFT model."""
    model = peft.get_peft_model(load_base(str(folder)), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return model.eval()


# ---------------------------------------------------------------- export


@pytest.mark.parametrize(
    "arch, targets",
    [
        ("gpt2", "q,v"),  # sliced c_attn -> one rank-2r block adapter
        ("gpt2", "o,mlp"),  # Conv1D, whole modules
        ("gpt2", "q,v,o"),  # c_attn rank 2r / alpha 2a beside c_proj rank r / alpha a: patterns
        ("llama", "q,v,o"),
        ("llama", "all-linear"),
        ("bert", "q,v"),  # sequence classification
    ],
)
def test_export_loads_in_peft_with_same_logits(bases, tmp_path, arch, targets):
    folder = bases[arch]
    model = lorakit_adapter(folder, targets, tmp_path / "a.safetensors")
    out = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")

    assert sorted(p.name for p in out.iterdir()) == [
        ".lorakit",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == (None if arch == "bert" else "CAUSAL_LM")  # SEQ_CLS would want head weights
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    assert config["target_modules"] == [path for path, _ in lorakit.lora_layers(model)]
    assert config["base_model_name_or_path"] == str(folder)

    loaded = peft.PeftModel.from_pretrained(load_base(str(folder)), out).eval()
    assert (logits(loaded) - logits(model)).abs().max().item() <= TOL
    # every module got the rank and alpha it was exported with, patterns included
    weights = _peft_tensors(out)
    for path, _ in lorakit.lora_layers(model):
        layer = loaded.base_model.model.get_submodule(path)
        assert layer.r["default"] == weights[f"base_model.model.{path}.lora_A.weight"].shape[0]


def _peft_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_export_sliced_module_is_block_structured(bases, tmp_path):
    model = lorakit_adapter(bases["gpt2"], "q,v", tmp_path / "a.safetensors", rank=2, alpha=8)
    out = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 16)  # k=2 slices of rank 2, alpha 8
    assert config["rank_pattern"] == config["alpha_pattern"] == {}

    path = "transformer.h.0.attn.c_attn"
    layer = model.get_submodule(path)
    weights = _peft_tensors(out)
    a = weights[f"base_model.model.{path}.lora_A.weight"]  # (k*r, in)
    b = weights[f"base_model.model.{path}.lora_B.weight"]  # (out, k*r)
    assert a.shape == (4, 32) and b.shape == (96, 4)
    assert torch.equal(b[32:64], torch.zeros(32, 4))  # k rows untouched
    delta = (b @ a) * 16 / 4  # (out, in), PEFT's update
    assert torch.allclose(delta[:32], layer.delta_weight(0), atol=1e-6)  # q
    assert torch.allclose(delta[64:], layer.delta_weight(1), atol=1e-6)  # v


@pytest.mark.parametrize(
    "build, heads",
    [(tiny_bert, ["classifier"]), (tiny_roberta, ["classifier.dense", "classifier.out_proj"])],
)
def test_export_with_trained_head_loads_in_peft(tmp_path, build, heads):
    model = build(num_labels=3)
    lorakit.add_lora(model, "q,v")
    randomize_lora(model)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in head:
            p.copy_(torch.randn(p.shape, generator=g))
            p.requires_grad_(True)  # a new head, trained in full next to LoRA
    save_adapter(model, tmp_path / "a.safetensors")
    out = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == heads
    assert config["task_type"] is None and config["auto_mapping"]["base_model_class"] == type(model).__name__
    stored = _peft_tensors(out)
    for name in read_adapter(tmp_path / "a.safetensors").trained_params:
        assert torch.equal(stored[f"base_model.model.{name}"], model.get_parameter(name))
    fresh = build(num_labels=3)  # the same base weights, the head as initialized
    assert (logits(fresh) - logits(model)).abs().max().item() > 0.1
    loaded = peft.PeftModel.from_pretrained(fresh, out).eval()
    assert (logits(loaded) - logits(model)).abs().max().item() <= TOL


def test_export_mixed_ranks_use_patterns(bases, tmp_path):
    lorakit_adapter(bases["gpt2"], "q,v,o", tmp_path / "a.safetensors", rank=2, alpha=8)
    out = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    # c_attn (rank 4, alpha 16) and attn.c_proj (rank 2, alpha 8) tie; the first in model order is global
    assert (config["r"], config["lora_alpha"]) == (4, 16)
    expected = {f"transformer.h.{i}.attn.c_proj": 2 for i in range(2)}
    assert config["rank_pattern"] == expected
    assert config["alpha_pattern"] == {k: 8 for k in expected}


def test_pattern_key_is_anchored_only_when_a_dot_wildcard_is_ambiguous():
    paths = ["a.b.c", "a.b1c"]
    assert _pattern_key("a.b1c", paths) == "a.b1c"
    assert _pattern_key("a.b.c", paths) == r"^a\.b\.c"  # plain "a.b.c" would also match "a.b1c"


def test_export_refuses_non_empty_folder_unless_overwrite(bases, tmp_path):
    lorakit_adapter(bases["llama"], "q", tmp_path / "a.safetensors")
    out = tmp_path / "peft"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(LorakitError, match="not empty"):
        export_peft(tmp_path / "a.safetensors", out)
    assert (out / "keep.txt").exists()
    # --overwrite replaces only a folder lorakit exported: someone's own folder stays as it is.
    with pytest.raises(LorakitError, match="was not made by lorakit"):
        export_peft(tmp_path / "a.safetensors", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    exported = export_peft(tmp_path / "a.safetensors", tmp_path / "exported")
    (exported / "stray.txt").write_text("x")
    export_peft(tmp_path / "a.safetensors", exported, overwrite=True)
    assert not (exported / "stray.txt").exists() and (exported / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- import


@pytest.mark.parametrize(
    "arch, config",
    [
        ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),  # Conv1D
        (
            "llama",
            dict(
                target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={"q_proj": 4},
                alpha_pattern={"model.layers.0.self_attn.v_proj": 3, "down_proj": 10},
            ),
        ),
        ("bert", dict(target_modules=["query", "value"])),
    ],
)
def test_import_gives_peft_logits(bases, tmp_path, arch, config):
    folder = bases[arch]
    reference = peft_adapter(folder, tmp_path / "peft", r=2, lora_alpha=6, **config)
    out = import_peft(tmp_path / "peft", tmp_path / "a.safetensors")  # base from base_model_name_or_path

    adapter = read_adapter(out)
    assert adapter.base_model == str(folder)
    model = load_base(str(folder))
    lorakit.load_adapter(model, out)  # also checks the recorded base fingerprint
    assert (logits(model) - logits(reference)).abs().max().item() <= TOL


def test_round_trip_keeps_tensors(bases, tmp_path):
    lorakit_adapter(bases["llama"], "q,v,o", tmp_path / "a.safetensors", rank=3, alpha=12)
    export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    back = import_peft(tmp_path / "peft", tmp_path / "b.safetensors", model=str(bases["llama"]))

    a, b = read_adapter(tmp_path / "a.safetensors"), read_adapter(back)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert [(m.path, m.rank, m.alpha) for m in a.modules] == [(m.path, m.rank, m.alpha) for m in b.modules]
    assert a.metadata["base_fingerprint"] == b.metadata["base_fingerprint"]


def test_round_trip_of_sliced_adapter_keeps_outputs(bases, tmp_path):
    model = lorakit_adapter(bases["gpt2"], "q,v,o", tmp_path / "a.safetensors")
    export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "b.safetensors")
    back = load_base(str(bases["gpt2"]))
    lorakit.load_adapter(back, tmp_path / "b.safetensors")
    assert (logits(back) - logits(model)).abs().max().item() <= TOL


def test_import_of_seq_cls_adapter_keeps_its_head(tmp_path):
    """A PEFT SEQ_CLS adapter (LoRA + modules_to_save classifier) on a base saved without a head."""
    from transformers import BertForSequenceClassification

    folder = save_model(tiny_bert().bert, tmp_path / "base")  # a BertModel checkpoint: no classifier
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=3)
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2, lora_alpha=6)
    reference = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    reference.save_pretrained(tmp_path / "peft")
    reference.eval()

    out = import_peft(tmp_path / "peft", tmp_path / "a.safetensors", model=str(folder))
    adapter = read_adapter(out)
    assert adapter.trained_params == {"classifier.weight": (3, 32), "classifier.bias": (3,)}
    assert adapter.metadata["num_labels"] == "3"
    fresh = BertForSequenceClassification.from_pretrained(folder, num_labels=3).eval()  # another random head
    assert (logits(fresh) - logits(reference)).abs().max().item() > 0.1
    lorakit.load_adapter(fresh, out)
    assert (logits(fresh) - logits(reference)).abs().max().item() <= TOL

    export_peft(out, tmp_path / "back")  # and back: the same head tensors under the same names
    before, after = _peft_tensors(tmp_path / "peft"), _peft_tensors(tmp_path / "back")
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.equal(before[f"base_model.model.{name}"], after[f"base_model.model.{name}"])


def test_import_refuses_head_the_base_lacks(bases, tmp_path):
    tensors = {f"{Q0}.lora_A.weight": torch.randn(2, 32), f"{Q0}.lora_B.weight": torch.randn(32, 2)}
    tensors["classifier.weight"] = torch.randn(3, 32)
    peft_dir = write_peft(tmp_path / "peft", base=bases["llama"], tensors=tensors, modules_to_save=["classifier"])
    with pytest.raises(LorakitError, match="classifier.weight \\(modules_to_save\\) is not a parameter of the base"):
        import_peft(peft_dir, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_import_refuses_existing_file_unless_overwrite(bases, tmp_path):
    lorakit_adapter(bases["llama"], "q", tmp_path / "a.safetensors")
    export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    (tmp_path / "b.safetensors").write_bytes(b"old")
    with pytest.raises(LorakitError, match="exists"):
        import_peft(tmp_path / "peft", tmp_path / "b.safetensors")
    assert (tmp_path / "b.safetensors").read_bytes() == b"old"
    # --overwrite replaces a lorakit adapter only, never another file
    with pytest.raises(LorakitError, match="is not a lorakit adapter"):
        import_peft(tmp_path / "peft", tmp_path / "b.safetensors", overwrite=True)
    assert (tmp_path / "b.safetensors").read_bytes() == b"old"
    (tmp_path / "c.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    import_peft(tmp_path / "peft", tmp_path / "c.safetensors", overwrite=True)
    read_adapter(tmp_path / "c.safetensors")


# ---------------------------------------------------------------- import errors


def write_peft(folder: Path, base: Path | None = None, tensors: dict | None = None, **config) -> Path:
    """A hand-made PEFT folder for the tiny Llama: one q_proj adapter unless `tensors` says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj"],
        "bias": "none",
        "base_model_name_or_path": str(base) if base else None,
    }
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {f"{Q0}.lora_A.weight": torch.randn(2, 32), f"{Q0}.lora_B.weight": torch.randn(32, 2)}
    tensors = {f"base_model.model.{k}": v for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(peft_type="IA3"), "is a PEFT IA3 adapter; only plain LoRA can be imported"),
        (dict(use_dora=True), "use_dora"),
        (dict(use_rslora=True), "rsLoRA scaling alpha/sqrt(r)"),
        (dict(bias="all"), "bias = 'all'"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(modules_to_save="classifier"), "modules_to_save = 'classifier', expected a list of module names"),
        (dict(init_lora_weights="pissa"), "changes the base weights"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(alpha_pattern={"q_proj": "big"}), "lora_alpha for model.layers.0.self_attn.q_proj is 'big'"),
    ],
)
def test_import_refuses_config(tmp_path, config, message):
    peft_dir = write_peft(tmp_path / "peft", **config)
    with pytest.raises(LorakitError, match="adapter_config.json") as e:
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")
    assert message in str(e.value)


def test_import_refuses_missing_folder_and_files(tmp_path):
    with pytest.raises(LorakitError, match="no such folder"):
        import_peft(tmp_path / "nope", tmp_path / "a.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="no adapter_config.json"):
        import_peft(tmp_path / "empty", tmp_path / "a.safetensors")
    (tmp_path / "empty" / "adapter_config.json").write_text("{not json")
    with pytest.raises(LorakitError, match="adapter_config.json: invalid JSON"):
        import_peft(tmp_path / "empty", tmp_path / "a.safetensors")


def test_import_never_loads_a_pickle(tmp_path):
    peft_dir = write_peft(tmp_path / "peft")
    (peft_dir / "adapter_model.safetensors").unlink()
    (peft_dir / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(LorakitError, match=r"only adapter_model.bin \(a pickle, never loaded\)"):
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")


@pytest.mark.parametrize(
    "name, message",
    [
        ("model.embed_tokens.lora_embedding_A", "LoRA on an embedding layer"),
        (f"{Q0}.lora_magnitude_vector", "DoRA"),
        (f"{Q0}.weight", f"unexpected tensor base_model.model.{Q0}.weight"),
    ],
)
def test_import_refuses_tensor_names(tmp_path, name, message):
    tensors = {f"{Q0}.lora_A.weight": torch.randn(2, 32), f"{Q0}.lora_B.weight": torch.randn(32, 2)}
    tensors[name] = torch.randn(2, 32)
    peft_dir = write_peft(tmp_path / "peft", tensors=tensors)
    with pytest.raises(LorakitError, match="adapter_model.safetensors") as e:
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")
    assert message in str(e.value)


def test_import_refuses_conv_tensors(tmp_path):
    # PEFT's Conv2d LoRA: A (r, in, 1, 1), B (out, r, 1, 1)
    a, b = torch.randn(2, 32, 1, 1), torch.randn(32, 2, 1, 1)
    tensors = {f"{Q0}.lora_A.weight": a, f"{Q0}.lora_B.weight": b}
    peft_dir = write_peft(tmp_path / "peft", tensors=tensors)
    with pytest.raises(LorakitError, match="4-D LoRA tensors"):
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")


def test_import_accepts_adapter_name_in_tensor_names(bases, tmp_path):
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    tensors = {f"{Q0}.lora_A.default.weight": a, f"{Q0}.lora_B.default.weight": b}
    peft_dir = write_peft(tmp_path / "peft", bases["llama"], tensors=tensors)
    adapter = read_adapter(import_peft(peft_dir, tmp_path / "a.safetensors"))
    assert torch.equal(adapter.tensors[f"{Q0}.lora_A"], a) and adapter.modules[0].alpha == 4


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {
                "model.layers.0.self_attn.nope.lora_A.weight": torch.randn(2, 32),
                "model.layers.0.self_attn.nope.lora_B.weight": torch.randn(32, 2),
            },
            "module model.layers.0.self_attn.nope not found in this model",
        ),
        (
            {f"{Q0}.lora_A.weight": torch.randn(2, 48), f"{Q0}.lora_B.weight": torch.randn(32, 2)},
            f"{Q0} is (32, 32) (in, out) here, the adapter expects (48, 32)",
        ),
        (
            {"model.norm.lora_A.weight": torch.randn(2, 32), "model.norm.lora_B.weight": torch.randn(32, 2)},
            "model.norm is a LlamaRMSNorm here, not a linear layer",
        ),
    ],
)
def test_import_refuses_modules_the_base_lacks(bases, tmp_path, tensors, message):
    peft_dir = write_peft(tmp_path / "peft", bases["llama"], tensors=tensors)
    with pytest.raises(LorakitError) as e:
        import_peft(peft_dir, tmp_path / "a.safetensors")
    assert message in str(e.value)
    assert not (tmp_path / "a.safetensors").exists()


def test_import_needs_a_base_model(tmp_path):
    peft_dir = write_peft(tmp_path / "peft", base=None)
    with pytest.raises(LorakitError, match="records no base_model_name_or_path; pass --model"):
        import_peft(peft_dir, tmp_path / "a.safetensors")


def test_cli_import_error_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    peft_dir = write_peft(tmp_path / "peft", use_dora=True)
    result = CliRunner().invoke(app, ["import", str(peft_dir), "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "use_dora" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- crafted files


def tampered(path: Path, out: Path, **module_changes) -> Path:
    """A copy of a lorakit adapter with every module record changed."""
    original = read_adapter(path)
    modules = [{**m, **module_changes} for m in json.loads(original.metadata["modules"])]
    save_file(original.tensors, out, metadata={**original.metadata, "modules": json.dumps(modules)})
    return out


@pytest.mark.parametrize(
    "alpha, message",
    [
        (float("nan"), "alpha is nan, expected a finite number > 0"),
        (float("inf"), "alpha is inf, expected a finite number > 0"),
        (0, "alpha is 0, expected a finite number > 0"),
        (1.7e308, "alpha 1.7e+308 is too large to export"),  # finite, but k * alpha for k slices is not
    ],
)
def test_export_refuses_bad_alpha_and_writes_nothing(bases, tmp_path, alpha, message):
    lorakit_adapter(bases["gpt2"], "q,v", tmp_path / "a.safetensors")
    bad = tampered(tmp_path / "a.safetensors", tmp_path / "bad.safetensors", alpha=alpha)
    with pytest.raises(LorakitError) as e:
        export_peft(bad, tmp_path / "peft")
    assert str(e.value).startswith(f"{bad}: ") and "module transformer.h.0.attn.c_attn: " in str(e.value)
    assert message in str(e.value)
    assert not (tmp_path / "peft").exists()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(lora_alpha=NAN), f"lora_alpha for {Q0} is nan, expected a finite number > 0"),
        (dict(lora_alpha=INF), f"lora_alpha for {Q0} is inf, expected a finite number > 0"),
        (dict(lora_alpha=-INF), f"lora_alpha for {Q0} is -inf, expected a finite number > 0"),
        (dict(lora_alpha=0), f"lora_alpha for {Q0} is 0, expected a finite number > 0"),
        (dict(lora_alpha=-4), f"lora_alpha for {Q0} is -4, expected a finite number > 0"),
        (dict(lora_alpha=10**400), f"lora_alpha for {Q0} is 1000000"),
        (dict(lora_alpha="4"), f"lora_alpha for {Q0} is '4', expected a finite number > 0"),
        (dict(alpha_pattern={"q_proj": NAN}), f"lora_alpha for {Q0} is nan, expected a finite number > 0"),
        (dict(r=0), f"r for {Q0} is 0, expected an integer >= 1"),
        (dict(r=NAN), f"r for {Q0} is nan, expected an integer >= 1"),
        (dict(r=INF), f"r for {Q0} is inf, expected an integer >= 1"),
        (dict(r=-2), f"r for {Q0} is -2, expected an integer >= 1"),
        (dict(r=2.0), f"r for {Q0} is 2.0, expected an integer >= 1"),  # peft builds nn.Linear(in, r): an int
        (dict(r="2"), f"r for {Q0} is '2', expected an integer >= 1"),
        (dict(rank_pattern={"q_proj": 0}), f"r for {Q0} is 0, expected an integer >= 1"),
        (dict(rank_pattern={"q_proj": NAN}), f"r for {Q0} is nan, expected an integer >= 1"),
        (dict(lora_dropout=NAN), "lora_dropout is nan, expected a number in [0, 1)"),
        (dict(lora_dropout="x"), "lora_dropout is 'x', expected a number in [0, 1)"),
        (dict(rank_pattern=[2]), "rank_pattern = [2], expected an object of module patterns"),
        (dict(auto_mapping=["x"]), "auto_mapping = ['x'], expected an object with a base_model_class name"),
        (dict(auto_mapping={"base_model_class": 5}), "auto_mapping = {'base_model_class': 5}, expected"),
        (dict(base_model_name_or_path=5), "base_model_name_or_path = 5, expected a hub id or folder"),
        (dict(target_modules={"q": 1}), "target_modules = {'q': 1}, expected a list of module names or a regex"),
        (dict(peft_type="LO\nRA"), r"is a PEFT 'LO\nRA' adapter; only plain LoRA can be imported"),
        (dict(use_dora=[[[[1] * 100]]]), "use_dora = [[[[1, 1, 1, 1"),
    ],
)
def test_import_refuses_bad_numbers_and_shapes_in_config(tmp_path, config, message):
    peft_dir = write_peft(tmp_path / "peft", **config)
    with pytest.raises(LorakitError) as e:
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")  # refused before the base loads
    assert str(e.value).startswith(f"{peft_dir / 'adapter_config.json'}: ")
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_import_refuses_r_other_than_the_tensors_rank_as_peft_does(bases, tmp_path):
    peft_dir = write_peft(tmp_path / "peft", bases["llama"], r=4)  # tensors of rank 2
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(load_base(str(bases["llama"])), peft_dir)
    with pytest.raises(LorakitError, match=f"r for {Q0} is 4, but its lora_A and lora_B have rank 2"):
        import_peft(peft_dir, tmp_path / "a.safetensors")
    write_peft(tmp_path / "peft", bases["llama"], r=4, rank_pattern={"q_proj": 2})  # the pattern decides
    import_peft(peft_dir, tmp_path / "a.safetensors")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply; expected a PEFT adapter config"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "JSON nested too deeply; expected a PEFT adapter config"),
        ('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}", "invalid JSON (Exceeds the limit"),
        ("\x00\x01 garbage", "invalid JSON (Expecting value"),
    ],
)
def test_import_refuses_garbage_config_with_one_line(tmp_path, text, message):
    peft_dir = write_peft(tmp_path / "peft")
    (peft_dir / "adapter_config.json").write_text(text)
    with pytest.raises(LorakitError) as e:
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")
    assert str(e.value).startswith(f"{peft_dir / 'adapter_config.json'}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "a, b, message",
    [
        (torch.randn(2, 32).to(torch.float8_e4m3fn), torch.randn(32, 2), "lora_A is torch.float8_e4m3fn; expected"),
        (torch.randn(2, 32), torch.randn(32, 2).to(torch.float8_e5m2), "lora_B is torch.float8_e5m2; expected"),
        (torch.randn(2, 32).double(), torch.randn(32, 2), "lora_A is torch.float64; expected float32, float16"),
        (torch.zeros(2, 32, dtype=torch.int8), torch.randn(32, 2), "lora_A is torch.int8; expected float32"),
        (torch.full((2, 32), INF), torch.randn(32, 2), "lora_A holds NaN or inf values"),
        (torch.randn(0, 32), torch.randn(32, 0), "expected (r, in) and (out, r), none of them 0"),
    ],
)
def test_import_refuses_bad_tensors(tmp_path, a, b, message):
    peft_dir = write_peft(tmp_path / "peft", r=a.shape[0], tensors={f"{Q0}.lora_A.weight": a, f"{Q0}.lora_B.weight": b})
    with pytest.raises(LorakitError) as e:
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")
    assert str(e.value).startswith(f"{peft_dir / 'adapter_model.safetensors'}: ") and message in str(e.value)


def test_import_refuses_fp8_head(tmp_path):
    tensors = {f"{Q0}.lora_A.weight": torch.randn(2, 32), f"{Q0}.lora_B.weight": torch.randn(32, 2)}
    tensors["classifier.weight"] = torch.randn(3, 32).to(torch.float8_e4m3fn)
    peft_dir = write_peft(tmp_path / "peft", tensors=tensors, modules_to_save=["classifier"])
    with pytest.raises(LorakitError, match="classifier.weight is torch.float8_e4m3fn; expected float32"):
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")


def test_cli_import_of_nan_alpha_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    peft_dir = write_peft(tmp_path / "peft", lora_alpha=NAN)
    result = CliRunner().invoke(app, ["import", str(peft_dir), "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        f"error: {peft_dir / 'adapter_config.json'}: lora_alpha for {Q0} is nan, expected a finite number > 0"
    ]
    assert not (tmp_path / "a.safetensors").exists()


GARBAGE = [None, True, False, -1, 0, 2, 2.5, NAN, INF, 10**30, "", "x", [], ["x"], [1], {}, {"x": 1}, [[[[]]]]]


def test_no_crafted_config_value_raises_anything_but_a_lorakit_error(tmp_path, monkeypatch):
    """Each config key lorakit reads, set to each garbage value: a one-line LorakitError, or on to loading the
    base (stubbed here) with r and alpha checked."""
    import lorakit.deploy.peft as peft_module

    class Reached(Exception):
        pass

    def load_base_for(source, config, heads):
        raise Reached

    monkeypatch.setattr(peft_module, "_load_base_for", load_base_for)
    keys = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "base_model_name_or_path"]
    keys += ["modules_to_save", "init_lora_weights", "rank_pattern", "alpha_pattern", "auto_mapping", "use_rslora"]
    keys += list(peft_module._VARIANTS)
    configs = [{key: value} for key in keys for value in GARBAGE]
    configs += [{p: {"q_proj": value}} for p in ("rank_pattern", "alpha_pattern") for value in GARBAGE]
    configs += [{"auto_mapping": {"base_model_class": value}} for value in GARBAGE]
    reached = 0
    for config in configs:
        peft_dir = write_peft(tmp_path / "peft", **config)
        try:
            import_peft(peft_dir, tmp_path / "a.safetensors", model="m")
        except Reached:
            reached += 1
        except LorakitError as e:
            assert str(e).startswith(f"{peft_dir}") and "\n" not in str(e) and len(str(e)) < 300, str(e)
    assert 0 < reached < len(configs)


def test_import_refuses_control_characters_in_tensor_names(tmp_path):
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    peft_dir = write_peft(tmp_path / "peft", tensors={f"{Q0}\u2028.lora_A.weight": a, f"{Q0}\u2028.lora_B.weight": b})
    with pytest.raises(LorakitError) as e:
        import_peft(peft_dir, tmp_path / "a.safetensors", model="unused")
    assert "holds control characters" in str(e.value) and len(str(e.value).splitlines()) == 1
