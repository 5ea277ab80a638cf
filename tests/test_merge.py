"""`lorakit merge`: a plain transformers folder with W0 + alpha/r B A, verified by a probe batch."""

import pytest
import torch
from tiny import probe_ids, randomize_lora, save_model, tiny_bert, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import lorakit
from lorakit.deploy.merge import merge_to_folder


def adapted(build, targets, folder, adapter, **kw):
    base = build(**kw)
    save_model(base, folder)
    model = build(**kw)
    lorakit.add_lora(model, targets, rank=4, alpha=32)
    randomize_lora(model)
    lorakit.save_adapter(model, adapter, base_model=str(folder))
    return model


def test_gpt2_merge_keeps_tied_embeddings_and_outputs(tmp_path):
    model = adapted(tiny_gpt2, "q,v", tmp_path / "base", tmp_path / "a.safetensors")
    result = merge_to_folder(tmp_path / "a.safetensors", tmp_path / "merged")
    assert result.modules == 2 and result.dtype == "fp32" and result.max_abs_diff <= result.tolerance
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # still tied
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)  # embeddings untouched
    ids = probe_ids()
    with torch.no_grad():
        assert (merged(ids).logits - model(ids).logits).abs().max() <= 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "merged") is not None
    # k rows of c_attn are exactly the base's
    k = slice(32, 64)
    w, w0 = merged.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight
    assert torch.equal(w[:, k], w0[:, k]) and not torch.equal(w[:, :32], w0[:, :32])


def test_llama_merge_and_saved_dtype(tmp_path):
    model = adapted(tiny_llama, "all-linear", tmp_path / "base", tmp_path / "a.safetensors")
    merge_to_folder(tmp_path / "a.safetensors", tmp_path / "m32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m32")
    ids = probe_ids()
    with torch.no_grad():
        assert (merged(ids).logits - model(ids).logits).abs().max() <= 1e-5
    result = merge_to_folder(tmp_path / "a.safetensors", tmp_path / "m16", dtype="bf16")
    assert result.dtype == "bf16" and result.max_abs_diff > 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype="auto").dtype == torch.bfloat16
    # a bf16 copy of the base (accepted by the fingerprint's sketch), merged and saved in fp32:
    # checked against the coarser (bf16) tolerance
    save_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base").to(torch.bfloat16), tmp_path / "base16")
    result = merge_to_folder(
        tmp_path / "a.safetensors", tmp_path / "m32b", model=str(tmp_path / "base16"), dtype="fp32"
    )
    assert result.dtype == "fp32" and result.tolerance >= 0.1


def test_bert_classifier_merge(tmp_path):
    model = adapted(tiny_bert, "q,v,mlp", tmp_path / "base", tmp_path / "a.safetensors")
    merge_to_folder(tmp_path / "a.safetensors", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = probe_ids()
    with torch.no_grad():
        assert (merged(ids).logits - model(ids).logits).abs().max() <= 1e-5


def test_merge_refusals_write_nothing(tmp_path):
    adapted(tiny_gpt2, "q,v", tmp_path / "base", tmp_path / "a.safetensors")
    save_model(tiny_gpt2(seed=9), tmp_path / "other")
    with pytest.raises(lorakit.LorakitError, match="trained on another base"):
        merge_to_folder(tmp_path / "a.safetensors", tmp_path / "out", model=str(tmp_path / "other"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(lorakit.LorakitError, match="not empty"):
        merge_to_folder(tmp_path / "a.safetensors", tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    # --overwrite replaces only a folder lorakit merged into: someone's own folder stays as it is.
    with pytest.raises(lorakit.LorakitError, match="was not made by lorakit"):
        merge_to_folder(tmp_path / "a.safetensors", tmp_path / "busy", overwrite=True)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    merge_to_folder(tmp_path / "a.safetensors", tmp_path / "merged")
    (tmp_path / "merged" / "stray.txt").write_text("left by hand")
    merge_to_folder(tmp_path / "a.safetensors", tmp_path / "merged", overwrite=True)
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / "stray.txt").exists()
    with pytest.raises(lorakit.LorakitError, match="unknown dtype 'fp8'"):
        merge_to_folder(tmp_path / "a.safetensors", tmp_path / "x", dtype="fp8")
    with pytest.raises(lorakit.LorakitError, match="has no config.json"):
        merge_to_folder(tmp_path / "a.safetensors", tmp_path / "x", model=str(tmp_path / "merged" / ".."))


def test_merge_without_recorded_base(tmp_path):
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v")
    lorakit.save_adapter(model, tmp_path / "a.safetensors")  # config._name_or_path is empty
    with pytest.raises(lorakit.LorakitError, match="records no base model; pass --model"):
        merge_to_folder(tmp_path / "a.safetensors", tmp_path / "out")


def test_failed_probe_check_writes_nothing(tmp_path, monkeypatch):
    import lorakit.deploy.merge as merge

    adapted(tiny_gpt2, "q,v", tmp_path / "base", tmp_path / "a.safetensors")
    monkeypatch.setattr(merge, "TOLERANCE", {torch.float32: -1.0})
    with pytest.raises(lorakit.LorakitError, match="merge check failed") as e:
        merge_to_folder(tmp_path / "a.safetensors", tmp_path / "out")
    assert e.value.exit_code == 1 and not (tmp_path / "out").exists()


def test_base_without_tokenizer_gives_no_stand_in_tokenizer(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")  # weights only
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v")
    lorakit.save_adapter(model, tmp_path / "a.safetensors", base_model=str(tmp_path / "base"))
    result = merge_to_folder(tmp_path / "a.safetensors", tmp_path / "merged")
    assert not result.tokenizer
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        ".lorakit",  # marks the folder as lorakit's, so that --overwrite may replace it
        "README.md",  # the model card
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_merge_keeps_a_new_trained_head(tmp_path):
    from transformers import BertConfig, BertModel

    from lorakit.models import load_base

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    save_model(BertModel(cfg), tmp_path / "encoder")  # a checkpoint without a classification head
    model = load_base(str(tmp_path / "encoder"), task="classification", num_labels=3)
    assert model.lorakit_new_params == ["classifier.bias", "classifier.weight"]
    lorakit.add_lora(model, "q,v")
    randomize_lora(model)
    model.classifier.requires_grad_(True)
    lorakit.save_adapter(model, tmp_path / "a.safetensors", base_model=str(tmp_path / "encoder"))
    merge_to_folder(tmp_path / "a.safetensors", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = probe_ids()
    with torch.no_grad():
        assert merged.config.num_labels == 3
        assert (merged(ids).logits - model(ids).logits).abs().max() <= 1e-5
