"""Export a lorakit adapter as a llama.cpp LoRA adapter: one GGUF file that `llama-cli --lora` and Ollama's
`ADAPTER` load on top of the base model's own GGUF.

What llama.cpp's loader (src/llama-adapter.cpp) reads:
- keys `general.type` = "adapter", `adapter.type` = "lora", `general.architecture` equal to the base GGUF's, and
  `adapter.lora.alpha` (float32; one value for the whole file);
- tensor pairs `<base tensor>.lora_a` / `.lora_b` named after the base GGUF's tensors (`blk.3.attn_q.weight`),
  with A (r, in) and B (out, r) as numpy shapes (ggml's ne: A [in, r], B [r, out]); every name must exist in the
  base, so LoRA on the LM head (absent when tied) or on embeddings (read transposed) is not written;
- each update is `alpha / r * B A`, with r read from that pair's own tensors.

How lorakit's adapters become that:
- names come from the `gguf` package's own HF -> GGUF tensor-name map for the base's architecture;
- Llama-family q and k weights are stored in GGUF with their rows permuted per head for llama.cpp's rotary
  layout (convert_hf_to_gguf.py's `LlamaModel.permute`), so B's rows are permuted the same way (A is not: it
  acts on the input side);
- a fused projection adapted on output slices (GPT-2 `c_attn` with q and v) becomes one pair on the whole
  fused tensor (`blk.N.attn_qkv.weight`): A stacks the slices' A, B is block-structured with zero rows for the
  slices not adapted (k), rank k*r;
- alpha is one number per file: the most common effective alpha is written and every other module's B is scaled
  so that its alpha/r update is unchanged (an adapter of lorakit has one alpha, so this only happens for fused
  slices next to whole modules, where the factor is a power of two, exact in floating point).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..errors import LorakitError
from ..files import write_atomic
from ..lora.adapter import Adapter, ModuleInfo, read_adapter

OUTTYPES = ("f32", "f16", "bf16")
GGUF_MAGIC = b"GGUF"
MODELFILE = "Modelfile"
_MODELFILE_MARK = "# written by lorakit export --format gguf --ollama"


@dataclass(frozen=True)
class GgufArch:
    """How a transformers model type is written in GGUF: llama.cpp's architecture name and whether its q/k rows
    are permuted for the rotary layout (convert_hf_to_gguf.py: `LlamaModel.undo_permute`)."""

    name: str
    permute_qk: bool


# The model types whose adapters this exports and llama.cpp loads (each checked against convert_hf_to_gguf.py:
# Llama and Mistral are converted by LlamaModel, arch "llama", q/k permuted; Qwen2 by Qwen2Model, no permutation;
# GPT-2 by GPT2Model, Conv1D weights transposed to (out, in), q/k/v fused as attn_qkv).
ARCHITECTURES = {
    "llama": GgufArch("llama", True),
    "mistral": GgufArch("llama", True),
    "qwen2": GgufArch("qwen2", False),
    "gpt2": GgufArch("gpt2", False),
}


@dataclass
class GgufPair:
    """One LoRA pair as written: the base GGUF tensor it adapts, A (r, in), B (out, r) and its alpha/r."""

    tensor: str
    a: Tensor
    b: Tensor
    scaling: float
    module: str


def export_gguf(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    outtype: str = "f32",
    model: str | None = None,
    overwrite: bool = False,
    ollama: bool = False,
) -> Path:
    """Write a lorakit adapter as a llama.cpp LoRA adapter GGUF file.

    Args:
        adapter: the lorakit `.safetensors` adapter file.
        out: the `.gguf` file to write.
        outtype: f32, f16 or bf16: the dtype of the written A and B tensors.
        model: the base's hub id or folder (default: the one the adapter records); only its config is read.
        overwrite: replace an existing `out` that is a GGUF adapter (and, with `ollama`, a Modelfile lorakit wrote).
        ollama: also write `Modelfile` beside `out` (FROM the base, ADAPTER `out`, the chat template).

    Returns:
        The written file.
    """
    if outtype not in OUTTYPES:
        raise LorakitError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    out = check_out_file(Path(out), overwrite, Path(adapter))
    modelfile = check_modelfile(out.parent / MODELFILE, overwrite) if ollama else None
    source = read_adapter(adapter)
    refuse_unloadable(source)
    base = model or _recorded(source)
    config = _config(base)
    arch = gguf_arch(source, config)
    pairs = gguf_pairs(source, config, arch)
    alpha = _file_alpha(pairs)
    data = _gguf_bytes(source, arch, pairs, alpha, outtype)
    if modelfile is not None:  # everything checked before either file is written
        text = modelfile_text(base, out)
    write_atomic(out, data)
    if modelfile is not None:
        write_atomic(modelfile, text)
    return out


# ---------------------------------------------------------------- checks


def check_out_file(out: Path, overwrite: bool, adapter: Path) -> Path:
    """The file to write (a symbolic link: the file it names), checked before anything loads: a new name, or with
    `overwrite` a GGUF adapter file; never a folder, a broken link, the input adapter or another file."""
    if out.is_symlink() and not out.exists():
        raise LorakitError(f"{out}: is a broken symbolic link; expected a .gguf file path")
    target = Path(os.path.realpath(out))
    if target.is_dir():
        raise LorakitError(f"{out}: is a folder; expected a .gguf file path for --format gguf")
    if adapter.exists() and target == Path(os.path.realpath(adapter)):
        raise LorakitError(f"{out}: is the input adapter; choose another --out")
    if not target.exists():
        return target
    if not overwrite:
        raise LorakitError(f"{out}: file exists; choose another --out or pass --overwrite")
    if not is_gguf_adapter(target):
        raise LorakitError(f"{out}: is not a GGUF adapter file; --overwrite replaces only a GGUF LoRA adapter")
    return target


def check_modelfile(path: Path, overwrite: bool) -> Path:
    """The Modelfile to write beside the adapter: a new one, or with `overwrite` one that lorakit wrote."""
    if not path.exists() and not path.is_symlink():
        return path
    if path.is_dir() or not overwrite:
        raise LorakitError(f"{path}: exists; write the adapter into another folder or pass --overwrite")
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        first = []
    if first != [_MODELFILE_MARK]:
        raise LorakitError(f"{path}: was not written by lorakit; --overwrite replaces only a Modelfile lorakit wrote")
    return path


def is_gguf_adapter(path: Path) -> bool:
    """Whether `path` is a GGUF file whose general.type is `adapter`."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return False
        return gguf_fields(path).get("general.type") == "adapter"
    except Exception:  # unreadable, truncated: not one
        return False


def gguf_fields(path: Path) -> dict[str, Any]:
    """The scalar and string keys of a GGUF file (arrays skipped)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        fields[name] = bytes(value).decode("utf-8", "replace") if field.types[0] == GGUFValueType.STRING else value[0]
    return fields


def refuse_unloadable(source: Adapter) -> None:
    """What llama.cpp cannot run, refused with one line: a trained task head (PEFT's modules_to_save)."""
    if source.trained_params:
        names = ", ".join(list(source.trained_params)[:3])
        raise LorakitError(
            f"{source.path}: holds a fully trained {names} (a task head); a llama.cpp LoRA adapter holds only "
            "A/B pairs, so it cannot be exported as GGUF"
        )


def _recorded(source: Adapter) -> str:
    from ..models import recorded_base

    return recorded_base(source.path, source.base_model)


def _config(base: str) -> Any:
    from ..models import load_config

    return load_config(base)


def gguf_arch(source: Adapter, config: Any) -> GgufArch:
    """The GGUF architecture of the adapter's base, refused when llama.cpp cannot run it as a text generator."""
    model_type = getattr(config, "model_type", None)
    base_class = source.metadata.get("base_class", "")
    if base_class and not base_class.endswith(("ForCausalLM", "LMHeadModel")):
        raise LorakitError(f"{source.path}: trained on a {base_class}; llama.cpp runs causal language models only")
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise LorakitError(f"{source.path}: no GGUF mapping for model type {model_type!r}; --format gguf knows {known}")
    return ARCHITECTURES[model_type]


# ---------------------------------------------------------------- tensors


def permute_rows(b: Tensor, n_head: int) -> Tensor:
    """B's rows (out, r) in the order llama.cpp's converter gives the base q/k rows: per head, the first and
    second halves interleaved (HF's rotate-half layout -> GGML's pairwise rotary layout)."""
    out = b.shape[0]
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def unpermute_rows(b: Tensor, n_head: int) -> Tensor:
    """The inverse of permute_rows."""
    out = b.shape[0]
    return b.reshape(n_head, out // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _heads(config: Any) -> tuple[int, int]:
    n_head = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    return int(n_head), int(n_kv)


def gguf_pairs(source: Adapter, config: Any, arch: GgufArch) -> list[GgufPair]:
    """One GgufPair per adapted module, named, merged (fused slices) and permuted as llama.cpp reads them."""
    import gguf

    arch_enum = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.name), None)
    if arch_enum is None:
        raise LorakitError(f"the installed gguf package does not know the architecture {arch.name!r}; upgrade it")
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    names = gguf.get_tensor_name_map(arch_enum, int(n_layers))
    n_head, n_kv = _heads(config)
    pairs = []
    for info in source.modules:
        tensor = names.get_name(info.path)
        if tensor is None or not tensor.startswith("blk."):
            raise LorakitError(
                f"{source.path}: module {info.path} {_what_module(tensor)}; --format gguf exports adapters on the "
                "transformer blocks' linear layers only"
            )
        a, b, rank, alpha = _pair(info, source.tensors)
        heads = {"attn_q": n_head, "attn_k": n_kv}.get(tensor.rpartition(".")[2]) if arch.permute_qk else None
        if heads is not None:
            if b.shape[0] % (2 * heads):
                raise LorakitError(
                    f"{source.path}: module {info.path} has {b.shape[0]} outputs, not a multiple of 2 x {heads} "
                    "heads of the base's config; is the base (--model) the one the adapter was trained on?"
                )
            b = permute_rows(b, heads)
        pairs.append(GgufPair(f"{tensor}.weight", a, b, alpha / rank, info.path))
    return pairs


def _what_module(tensor: str | None) -> str:
    if tensor == "output":  # a tied head (SmolLM2's) has no output.weight in GGUF at all
        return "is the LM head"
    if tensor == "token_embd":
        return "is the token embedding"
    return "has no tensor in llama.cpp's model of this architecture"


def _pair(info: ModuleInfo, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, int, float]:
    """(A (r_eff, in), B (out, r_eff), r_eff, alpha_eff) of one module as a single pair; alpha_eff / r_eff is the
    module's alpha / r, so the update is unchanged."""
    if info.slices is None:
        return tensors[f"{info.path}.lora_A"].float(), tensors[f"{info.path}.lora_B"].float(), info.rank, info.alpha
    r, k = info.rank, len(info.slices)
    a = torch.cat([tensors[f"{name}.lora_A"].float() for name in info.names])  # (k*r, in)
    b = torch.zeros(info.out_features, k * r)  # (out, k*r): rows of slices not adapted stay zero
    for i, (s, name) in enumerate(zip(info.slices, info.names, strict=True)):
        b[s.start : s.stop, i * r : (i + 1) * r] = tensors[f"{name}.lora_B"].float()  # (out_slice, r) block
    return a, b, k * r, k * info.alpha


def _file_alpha(pairs: list[GgufPair]) -> float:
    """The file's one alpha: the most common alpha_eff = scaling * r_eff; other pairs get B scaled to keep their
    update."""
    alphas = [p.scaling * p.a.shape[0] for p in pairs]
    alpha = Counter(alphas).most_common(1)[0][0]
    for p, own in zip(pairs, alphas):
        if own != alpha:
            p.b = p.b * (own / alpha)
    return alpha


def _numpy(t: Tensor, outtype: str) -> tuple[Any, Any]:
    """(array, raw_dtype for GGUFWriter.add_tensor): f32 / f16 as numpy floats, bf16 as its raw bytes."""
    import numpy as np
    from gguf import GGMLQuantizationType

    t = t.detach().float().contiguous()
    if outtype == "f32":
        return t.numpy(), None
    if outtype == "f16":
        return t.half().numpy(), None
    raw = t.bfloat16().view(torch.int16).numpy().view(np.uint8)  # (rows, 2*cols) bytes
    return raw, GGMLQuantizationType.BF16


def _gguf_bytes(source: Adapter, arch: GgufArch, pairs: list[GgufPair], alpha: float, outtype: str) -> bytes:
    """The whole GGUF file, built in a temporary folder (GGUFWriter writes to a path)."""
    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory(prefix="lorakit-gguf-") as tmp:
        path = Path(tmp) / "adapter.gguf"
        writer = GGUFWriter(path, arch.name)  # writes general.architecture
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        # lorakit's own record (llama.cpp lists and ignores unknown keys); `lorakit inspect` shows them.
        meta = source.metadata
        for key in ("base_model", "base_fingerprint", "targets", "dropout", "rank"):
            if meta.get(key):
                writer.add_string(f"lorakit.{key}", str(meta[key]))
        writer.add_string("lorakit.version", __version__)
        for p in pairs:
            for suffix, t in (("lora_a", p.a), ("lora_b", p.b)):
                array, raw = _numpy(t, outtype)
                writer.add_tensor(f"{p.tensor}.{suffix}", array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


# ---------------------------------------------------------------- Ollama


def modelfile_text(base: str, adapter: Path) -> str:
    """An Ollama Modelfile: FROM the base (the packaged GGUF, or the base's local folder), ADAPTER the exported
    file, and for a ChatML chat template (SmolLM2, Qwen2) the same template in Ollama's Go-template syntax."""
    from ..models import PACKAGED, packaged_gguf

    if base == PACKAGED:
        from_line = str(packaged_gguf())
    elif Path(base).expanduser().exists():
        from_line = str(Path(base).expanduser().resolve())
    else:
        raise LorakitError(
            f"--ollama: the base {base} is a hub id; Ollama needs a local base: pass --model with its folder"
        )
    lines = [_MODELFILE_MARK, f"FROM {from_line}", f"ADAPTER {adapter.resolve()}"]
    template = _chat_template(base)
    if template is not None and _is_chatml(template):
        system = _default_system(template)
        lines += ["", f'TEMPLATE """{_CHATML}"""']
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines += ['PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    else:
        lines += ["# no ChatML chat template: Ollama uses the template it finds in the base (if any)"]
    return "\n".join(lines) + "\n"


# ChatML in Ollama's Go templates: every message (Ollama puts SYSTEM first as a system message), then the
# assistant's turn; the same text the Jinja template gives with add_generation_prompt.
_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def _chat_template(base: str) -> str | None:
    from ..models import load_tokenizer

    template = getattr(load_tokenizer(base), "chat_template", None)
    return template if isinstance(template, str) else None


def _is_chatml(template: str) -> bool:
    return "<|im_start|>" in template and "<|im_end|>" in template


def _default_system(template: str) -> str | None:
    """The system message a ChatML template inserts when the conversation has none (SmolLM2's does)."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^{}]*?)<\|im_end\|>", template)
    return m.group(1) if m else None


__all__ = ["export_gguf", "gguf_pairs", "permute_rows", "unpermute_rows", "is_gguf_adapter", "ARCHITECTURES"]
