"""Targeting: aliases per architecture, suffixes, regexes, layer subsets and the errors."""

import pytest
import torch
from tiny import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.lora.targets import resolve_targets


def paths(model, spec, layers=None):
    return [
        (t.path, None if t.slices is None else [s.name for s in t.slices]) for t in resolve_targets(model, spec, layers)
    ]


def test_gpt2_aliases_use_fused_slices():
    m = tiny_gpt2()
    assert paths(m, "q,v") == [
        ("transformer.h.0.attn.c_attn", ["q", "v"]),
        ("transformer.h.1.attn.c_attn", ["q", "v"]),
    ]
    targets = resolve_targets(m, "k")
    assert [(s.start, s.stop) for s in targets[0].slices] == [(32, 64)]
    assert paths(m, "q,k,v")[0] == ("transformer.h.0.attn.c_attn", ["q", "k", "v"])
    assert paths(m, "o") == [("transformer.h.0.attn.c_proj", None), ("transformer.h.1.attn.c_proj", None)]
    assert [p for p, _ in paths(m, "mlp")] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]


def test_gpt2_whole_module_wins_over_slices():
    m = tiny_gpt2()
    assert paths(m, "q,c_attn")[0] == ("transformer.h.0.attn.c_attn", None)


def test_all_linear_excludes_heads_and_embeddings():
    for build in (tiny_gpt2, tiny_llama, tiny_bert):
        found = [p for p, _ in paths(build(), "all-linear")]
        assert found and not any("lm_head" in p or "classifier" in p or "pooler" in p or "wte" in p for p in found)
    assert len(paths(tiny_llama(), "all-linear")) == 2 * 7


def test_llama_family_aliases():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for model in (tiny_llama(), MistralForCausalLM(MistralConfig(**small)), Qwen2ForCausalLM(Qwen2Config(**small))):
        assert [p for p, _ in paths(model, "q,v")] == [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ]
        assert [p.rsplit(".", 1)[1] for p, _ in paths(model, "mlp")][:3] == ["gate_proj", "up_proj", "down_proj"]


def test_bert_roberta_distilbert_aliases():
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    bert = tiny_bert()
    assert [p for p, _ in paths(bert, "o")] == [f"bert.encoder.layer.{i}.attention.output.dense" for i in (0, 1)]
    assert [p for p, _ in paths(bert, "mlp")] == [
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    roberta = RobertaModel(
        RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    )
    assert [p for p, _ in paths(roberta, "q,v")] == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
    ]
    distil = DistilBertModel(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64))
    assert [p for p, _ in paths(distil, "q,v,mlp")] == [
        "transformer.layer.0.attention.q_lin",
        "transformer.layer.0.attention.v_lin",
        "transformer.layer.0.ffn.lin1",
        "transformer.layer.0.ffn.lin2",
    ]


def test_suffix_regex_and_layer_subset():
    m = tiny_llama()
    assert [p for p, _ in paths(m, "q_proj")] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert [p for p, _ in paths(m, "self_attn.o_proj,down_proj", layers=[1])] == [
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert [p for p, _ in paths(m, r"re:model\.layers\.0\.self_attn\.(q|k)_proj")] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]
    names = lorakit.add_lora(m, "q,v", layers=[0])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_no_match_lists_linear_modules():
    with pytest.raises(lorakit.LorakitError) as e:
        resolve_targets(tiny_gpt2(), "qv")
    msg = str(e.value)
    assert "no module matched 'qv'" in msg and "transformer.h.*.attn.c_attn" in msg and "mlp.c_fc" in msg


def test_other_target_errors():
    m = tiny_gpt2()
    with pytest.raises(lorakit.LorakitError, match="no targets given"):
        resolve_targets(m, " , ")
    with pytest.raises(lorakit.LorakitError, match="invalid regex"):
        resolve_targets(m, "re:(")
    with pytest.raises(lorakit.LorakitError, match="tied embeddings"):
        resolve_targets(m, "re:lm_head")
    with pytest.raises(lorakit.LorakitError, match=r"no module in layers \[7\]"):
        resolve_targets(m, "q", layers=[7])
    custom = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(lorakit.LorakitError, match="not defined for model type None"):
        resolve_targets(custom, "q")
    assert [t.path for t in resolve_targets(custom, "0")] == ["0"]


def test_untied_head_only_when_named_explicitly():
    m = tiny_llama(tie_word_embeddings=False)
    assert not any("lm_head" in p for p, _ in paths(m, "all-linear"))
    assert paths(m, "re:lm_head") == [("lm_head", None)]
    with torch.no_grad():
        assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
