"""`lorakit export --format gguf`: llama.cpp LoRA adapters, read back with the gguf package (no llama.cpp needed;
tests/test_llamacpp.py runs them in llama.cpp itself)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import randomize_lora, save_model, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.deploy.gguf import export_gguf, permute_rows, unpermute_rows
from lorakit.errors import LorakitError
from lorakit.lora.adapter import read_adapter
from lorakit.lora.inspect import inspect_adapter
from lorakit.models import load_base

runner = CliRunner()
# SmolLM2's chat template (ChatML with a default system message), as its tokenizer_config.json holds it.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": save_model(tiny_llama(), root / "llama"),  # 4 heads, 2 kv heads: k is permuted per kv head
        "gpt2": save_model(tiny_gpt2(), root / "gpt2"),
    }


def adapter(folder: Path, targets: str, path: Path, rank: int = 2, alpha: float = 8.0) -> torch.nn.Module:
    model = load_base(str(folder))
    lorakit.add_lora(model, targets, rank=rank, alpha=alpha)
    randomize_lora(model)
    lorakit.save_adapter(model, path, base_model=str(folder))
    return model


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray], dict[str, str]]:
    """(scalar keys, {name: float32 array in numpy order}, {name: GGML type name})."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            value = field.parts[field.data[0]]
            fields[key] = bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]
    tensors, types = {}, {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        tensors[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        types[t.name] = t.tensor_type.name
    return fields, tensors, types


def hf_unpermute(b: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' own inverse of llama.cpp's q/k permutation (how it reads GGUF Llama weights): the oracle."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(b, n_head)


def test_llama_all_linear_reads_back_with_llama_cpp_names_shapes_and_permuted_b(bases, tmp_path):
    model = adapter(bases["llama"], "all-linear", tmp_path / "a.safetensors")
    out = export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf")
    fields, tensors, types = read_gguf(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    source = read_adapter(tmp_path / "a.safetensors").tensors
    cfg = model.config
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    expected = set()
    for layer in range(cfg.num_hidden_layers):
        for hf, short in names.items():
            group = "self_attn" if short.startswith("attn") else "mlp"
            path = f"model.layers.{layer}.{group}.{hf}"
            stem = f"blk.{layer}.{short}.weight"
            expected |= {f"{stem}.lora_a", f"{stem}.lora_b"}
            a, b = tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"]
            base = model.get_submodule(path).base.weight  # (out, in), what llama.cpp's tensor is (permuted or not)
            assert a.shape == (2, base.shape[1]) and b.shape == (base.shape[0], 2)
            assert np.array_equal(a, source[f"{path}.lora_A"].numpy())  # A is never permuted
            if short == "attn_q":
                assert not np.array_equal(b, source[f"{path}.lora_B"].numpy())
                assert np.array_equal(hf_unpermute(b, cfg.num_attention_heads), source[f"{path}.lora_B"].numpy())
            elif short == "attn_k":
                assert np.array_equal(hf_unpermute(b, cfg.num_key_value_heads), source[f"{path}.lora_B"].numpy())
            else:
                assert np.array_equal(b, source[f"{path}.lora_B"].numpy())
    assert set(tensors) == expected and set(types.values()) == {"F32"}


def test_permute_rows_is_llama_cpps_permutation_and_inverts():
    b = torch.arange(48.0).reshape(24, 2)  # 3 heads of 8 rows
    p = permute_rows(b, 3)
    # per head, rows [0..3] and [4..7] interleave: 0, 4, 1, 5, 2, 6, 3, 7
    assert p[:8, 0].tolist() == [0, 8, 2, 10, 4, 12, 6, 14]
    assert torch.equal(unpermute_rows(p, 3), b)
    assert np.array_equal(hf_unpermute(p.numpy(), 3), b.numpy())


def update_in_gguf(tensors: dict[str, np.ndarray], alpha: float, stem: str) -> np.ndarray:
    """llama.cpp's update for one base tensor: alpha / r * B A, r read from the pair's own shape."""
    a, b = tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"]
    return alpha / a.shape[0] * (b.astype(np.float64) @ a.astype(np.float64))


def test_gpt2_q_v_slices_become_one_attn_qkv_pair_with_zero_k_rows(bases, tmp_path):
    model = adapter(bases["gpt2"], "q,v,mlp", tmp_path / "a.safetensors", rank=2, alpha=8.0)
    out = export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf")
    fields, tensors, _ = read_gguf(out)
    assert fields["general.architecture"] == "gpt2"
    n = model.config.n_embd
    stem = "blk.0.attn_qkv.weight"
    a, b = tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"]
    assert a.shape == (4, n) and b.shape == (3 * n, 4)  # q and v: rank 2 + 2 on the fused (q|k|v, in) tensor
    assert not b[n : 2 * n].any() and b[:n].any() and b[2 * n :].any()
    # Each update equals lorakit's: merged minus base weight, as (out, in) (GPT-2's Conv1D stores (in, out), and
    # llama.cpp's GGUF holds it transposed). The q,v pair's rank is 4, the MLP's 2: one file alpha for both.
    layers = dict(lorakit.lora_layers(model))
    for path, short in [("transformer.h.0.attn.c_attn", "attn_qkv"), ("transformer.h.1.mlp.c_fc", "ffn_up")]:
        layer = layers[path]
        before = layer.base.weight.detach().clone()
        layer.merge()
        delta = (layer.base.weight.detach() - before).T.double().numpy()
        layer.unmerge()
        got = update_in_gguf(tensors, fields["adapter.lora.alpha"], f"blk.{path.split('.')[2]}.{short}.weight")
        np.testing.assert_allclose(got, delta, atol=1e-5)


def test_llama_updates_equal_lorakit_merge_after_unpermuting(bases, tmp_path):
    model = adapter(bases["llama"], "q,k,v,o", tmp_path / "a.safetensors", rank=3, alpha=5.0)
    fields, tensors, _ = read_gguf(export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf"))
    for path, layer in lorakit.lora_layers(model):
        before = layer.base.weight.detach().clone()
        layer.merge()
        delta = (layer.base.weight.detach() - before).double().numpy()
        layer.unmerge()
        index, short = path.split(".")[2], {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
        got = update_in_gguf(tensors, fields["adapter.lora.alpha"], f"blk.{index}.{short[path[-6]]}.weight")
        heads = {"q": model.config.num_attention_heads, "k": model.config.num_key_value_heads}
        if path[-6] in heads:
            got = hf_unpermute(got, heads[path[-6]])
        np.testing.assert_allclose(got, delta, atol=1e-5)


@pytest.mark.parametrize("outtype, ggml, tol", [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2)])
def test_outtypes(bases, tmp_path, outtype, ggml, tol):
    adapter(bases["llama"], "q,v", tmp_path / "a.safetensors")
    _, f32, _ = read_gguf(export_gguf(tmp_path / "a.safetensors", tmp_path / "a32.gguf"))
    _, half, types = read_gguf(export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf", outtype=outtype))
    assert set(types.values()) == {ggml}
    for name, t in f32.items():
        np.testing.assert_allclose(half[name], t, rtol=tol, atol=tol)


def test_refuses_a_trained_head_and_writes_nothing(tmp_path):
    folder = save_model(tiny_bert(), tmp_path / "bert")
    model = load_base(str(folder))
    lorakit.add_lora(model, "q,v", rank=2)
    model.classifier.requires_grad_(True)
    lorakit.save_adapter(model, tmp_path / "a.safetensors", base_model=str(folder))
    with pytest.raises(LorakitError, match="task head"):
        export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_refuses_the_lm_head_and_an_unmapped_architecture(tmp_path):
    folder = save_model(tiny_llama(tie_word_embeddings=False), tmp_path / "llama")
    model = load_base(str(folder))
    lorakit.add_lora(model, "q,lm_head", rank=2)
    lorakit.save_adapter(model, tmp_path / "head.safetensors", base_model=str(folder))
    with pytest.raises(LorakitError, match="lm_head is the LM head"):
        export_gguf(tmp_path / "head.safetensors", tmp_path / "a.gguf")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    folder = save_model(neox, tmp_path / "neox")
    model = load_base(str(folder))
    lorakit.add_lora(model, "query_key_value", rank=2)
    lorakit.save_adapter(model, tmp_path / "neox.safetensors", base_model=str(folder))
    with pytest.raises(LorakitError, match="no GGUF mapping for model type 'gpt_neox'"):
        export_gguf(tmp_path / "neox.safetensors", tmp_path / "a.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


def test_out_file_checks(bases, tmp_path):
    adapter(bases["llama"], "q,v", tmp_path / "a.safetensors")
    out = export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf")
    with pytest.raises(LorakitError, match="file exists"):
        export_gguf(tmp_path / "a.safetensors", out)
    assert export_gguf(tmp_path / "a.safetensors", out, outtype="f16", overwrite=True) == out
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    with pytest.raises(LorakitError, match="not a GGUF adapter"):
        export_gguf(tmp_path / "a.safetensors", other, overwrite=True)
    with pytest.raises(LorakitError, match="is a folder"):
        export_gguf(tmp_path / "a.safetensors", tmp_path)
    with pytest.raises(LorakitError, match="is the input adapter"):
        export_gguf(tmp_path / "a.safetensors", tmp_path / "a.safetensors", overwrite=True)
    assert other.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.gguf",
        "a.safetensors",
        "notes.txt",
    ]


def test_ollama_modelfile_converts_a_chatml_template(tmp_path):
    folder = save_model(tiny_llama(), tmp_path / "llama")
    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    adapter(folder, "q,v", tmp_path / "a.safetensors")
    out = export_gguf(tmp_path / "a.safetensors", tmp_path / "out" / "a.gguf", ollama=True)
    text = (out.parent / "Modelfile").read_text()
    assert f"FROM {folder.resolve()}\nADAPTER {out}\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    # A Modelfile of someone else's is never replaced; lorakit's own is, with --overwrite.
    with pytest.raises(LorakitError, match="Modelfile: exists"):
        export_gguf(tmp_path / "a.safetensors", tmp_path / "out" / "b.gguf", ollama=True)
    export_gguf(tmp_path / "a.safetensors", tmp_path / "out" / "a.gguf", ollama=True, overwrite=True)
    (out.parent / "Modelfile").write_text("FROM mine\n")
    with pytest.raises(LorakitError, match="not written by lorakit"):
        export_gguf(tmp_path / "a.safetensors", tmp_path / "out" / "a.gguf", ollama=True, overwrite=True)


def test_inspect_reads_a_gguf_adapter(bases, tmp_path):
    adapter(bases["gpt2"], "q,v", tmp_path / "a.safetensors", rank=2, alpha=8.0)
    out = export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf", outtype="f16")
    report = inspect_adapter(out)
    assert report["format"] == "gguf" and report["architecture"] == "gpt2" and report["alpha"] == 16.0
    assert [m["name"] for m in report["modules"]] == ["blk.0.attn_qkv.weight", "blk.1.attn_qkv.weight"]
    assert all(m["rank"] == 4 and m["bytes"] == (4 * 32 + 96 * 4) * 2 for m in report["modules"])
    lorakit_report = inspect_adapter(tmp_path / "a.safetensors")
    # The same update norms as the lorakit file's q and v updates together (f16 rounding aside).
    for i, m in enumerate(report["modules"]):
        q, v = lorakit_report["modules"][2 * i : 2 * i + 2]
        assert m["update_norm"] == pytest.approx((q["update_norm"] ** 2 + v["update_norm"] ** 2) ** 0.5, rel=1e-3)
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["targets"] == "q,v"


def test_cli_export_gguf_and_one_line_errors(bases, tmp_path):
    adapter(bases["llama"], "q,v", tmp_path / "a.safetensors")
    out = str(tmp_path / "x.gguf")
    ok = runner.invoke(app, ["export", str(tmp_path / "a.safetensors"), "--format", "gguf", "--out", out])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(
        app, ["export", str(tmp_path / "a.safetensors"), "--format", "gguf", "--out", out, "--outtype", "f16"]
    )
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "file exists" in bad.output
    peft = runner.invoke(app, ["export", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "p"), "--ollama"])
    assert peft.exit_code == 2 and "--format gguf only" in peft.output and not (tmp_path / "p").exists()


def _tiny(kind: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    cfg |= dict(num_key_value_heads=2, max_position_embeddings=64)
    config = getattr(transformers, f"{kind}Config")(**cfg)
    return getattr(transformers, f"{kind}ForCausalLM")(config).eval()


@pytest.mark.parametrize("kind, arch, permuted", [("Mistral", "llama", True), ("Qwen2", "qwen2", False)])
def test_mistral_is_written_as_llama_and_qwen2_unpermuted(tmp_path, kind, arch, permuted):
    folder = save_model(_tiny(kind), tmp_path / kind)
    adapter(folder, "q,k", tmp_path / "a.safetensors")
    fields, tensors, _ = read_gguf(export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf"))
    source = read_adapter(tmp_path / "a.safetensors").tensors
    assert fields["general.architecture"] == arch
    assert sorted(tensors) == [f"blk.0.attn_{x}.weight.lora_{y}" for x in "kq" for y in "ab"]
    b_q, b_k = tensors["blk.0.attn_q.weight.lora_b"], tensors["blk.0.attn_k.weight.lora_b"]
    hf_q, hf_k = (source[f"model.layers.0.self_attn.{x}_proj.lora_B"].numpy() for x in "qk")
    if permuted:
        assert np.array_equal(hf_unpermute(b_q, 4), hf_q) and np.array_equal(hf_unpermute(b_k, 2), hf_k)
    else:
        assert np.array_equal(b_q, hf_q) and np.array_equal(b_k, hf_k)
