"""`lorakit merge`: fold an adapter into its base and save a plain Hugging Face model folder.

Memory: the base is loaded once; the merge happens in place, one projection at a time (each delta is
computed in fp32 and only as large as that projection), so the peak is about one copy of the base.

An adapter trained on an 8-bit or 4-bit base is merged into the base reloaded in full precision from its source
(int8 or NF4 weights cannot hold W0 + BA). The merged model therefore differs from the quantized model the adapter
was trained with by the quantization error, measured on the probe batch and reported (`quantized_diff`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckFailed, LorakitError
from ..files import atomic_dir, check_out
from ..lora.adapter import Adapter, apply_adapter, read_adapter
from ..lora.wrap import lora_layers, merge_adapter, unwrap
from ..models import DTYPES, base_name, dtype_name, load_base, load_tokenizer, recorded_base
from .card import CARD_NAME, model_card

# Largest accepted |logit difference| between the adapted and the merged model on the probe batch,
# relative to max(1, largest |logit|): rounding of the merged weight in the saved dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
PROBE_SEED = 20210617
QUANTIZED = ("int8", "nf4", "fp4")
"""`base_dtype` of adapters trained on a bitsandbytes base (8-bit; 4-bit NF4 or FP4)."""
KIND = "merged"  # the marker of a merged folder: what `merge --overwrite` may replace


@dataclass
class MergeResult:
    """What `merge_to_folder` did."""

    out: Path
    base_model: str
    dtype: str
    modules: int
    max_abs_diff: float
    tolerance: float
    tokenizer: bool = True
    quantized_diff: float | None = None
    """Adapter trained on an 8-bit or 4-bit base: max |logit difference| on the probe batch between that base with
    the adapter and the merged model (the quantization error; not checked). None otherwise, or without
    bitsandbytes."""
    quantized_bits: str = ""
    """`8-bit` or `4-bit (nf4)`: the base the adapter was trained on, when quantized."""


def probe_batch(model: nn.Module, batch: int = 2, length: int = 16) -> torch.Tensor:
    """A fixed batch of token ids (same for every run) valid for the model's vocabulary."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise LorakitError("cannot build a probe batch: the model config has no vocab_size")
    length = min(length, int(getattr(model.config, "max_position_embeddings", length) or length))
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab, (batch, length), generator=g)


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of the probe batch, on CPU."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def merge_to_folder(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    model: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> MergeResult:
    """Merge an adapter into its base and write config, safetensors weights and tokenizer to `out`.

    Args:
        adapter: the lorakit adapter file.
        out: the folder to write (refused if it exists and is not empty, unless `overwrite`).
        model: the base (hub id or folder); default: the `base_model` recorded in the adapter.
        dtype: saved dtype: `auto` (the base's own) or fp32, bf16, fp16.
        overwrite: replace an existing `out` folder that lorakit merged before.
        allow_pickle: load a base stored only as pickled `pytorch_model.bin`.

    Raises:
        LorakitError: bad adapter, wrong base, an `out` that must not be replaced.
        CheckFailed: merged logits further from the adapted ones than the dtype's tolerance (nothing written).
    """
    out = Path(out)
    if dtype != "auto" and dtype not in DTYPES:
        raise LorakitError(f"unknown dtype {dtype!r}; expected auto, fp32, bf16 or fp16")
    inputs = [adapter] + ([model] if model and Path(model).exists() else [])
    check_out(out, KIND, overwrite, inputs)  # before the slow load
    loaded = read_adapter(adapter)
    source = model or recorded_base(adapter, loaded.base_model)
    if not model and Path(source).exists():
        check_out(out, KIND, overwrite, [source])  # the recorded base is an input too: never replaced
    labels = loaded.metadata.get("num_labels")
    options: dict[str, Any] = dict(model_class=loaded.metadata.get("base_class"), allow_pickle=allow_pickle)
    options["num_labels"] = int(labels) if labels else None
    quantized = None
    if loaded.metadata.get("base_dtype") in QUANTIZED and importlib.util.find_spec("bitsandbytes") is not None:
        quantized = quantized_logits(source, loaded, options)  # before the full-precision load: one model at a time
    base = load_base(source, **options)
    apply_adapter(base, loaded)  # checks the base fingerprint
    loaded_dtype = next(base.parameters()).dtype
    ids = probe_batch(base)
    adapted = logits_of(base, ids)  # (batch, length, vocab) or (batch, labels)
    n_modules = sum(1 for _ in lora_layers(base))
    merge_adapter(base)  # W0 + alpha/r * B A per projection, fp32 arithmetic, in place
    unwrap(base)
    if dtype != "auto":
        base.to(DTYPES[dtype])
    saved = next(base.parameters()).dtype
    merged = logits_of(base, ids)
    diff = float((merged - adapted).abs().max())
    quantized_diff = None if quantized is None else float((merged - quantized).abs().max())
    scale = max(1.0, float(adapted.abs().max()))
    # The adapted logits carry the loaded dtype's rounding, the merged ones the saved dtype's: allow the coarser.
    tolerance = max(TOLERANCE.get(loaded_dtype, 1e-1), TOLERANCE.get(saved, 1e-1)) * scale
    if not diff <= tolerance:  # also catches NaN
        raise CheckFailed(
            f"merge check failed: probe logits of the merged model differ by {diff:.3g} "
            f"(tolerance {tolerance:.3g} for {dtype_name(saved)}); nothing was written"
        )
    if hasattr(base, "lorakit_targets"):
        del base.lorakit_targets
    tokenizer = load_tokenizer(source, required=False)
    with atomic_dir(out, overwrite=overwrite, kind=KIND) as tmp:
        base.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        card = model_card(loaded, KIND, base_name(source), out.name)
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    return MergeResult(
        out, source, dtype_name(saved), n_modules, diff, tolerance, tokenizer is not None, quantized_diff,
        quantized_label(loaded.metadata.get("base_dtype", "")),
    )  # fmt: skip


def quantized_label(base_dtype: str) -> str:
    """How a quantized base stored its weights, for the report: `8-bit`, `4-bit (nf4)`; empty if not quantized."""
    if base_dtype not in QUANTIZED:
        return ""
    return "8-bit" if base_dtype == "int8" else f"4-bit ({base_dtype})"


def quantized_logits(source: str, adapter: Adapter, options: dict[str, Any]) -> torch.Tensor:
    """Probe logits of the base loaded in 8 or 4 bits as it was trained (precision of the run, if recorded) with
    the adapter applied."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        precision = str(json.loads(adapter.metadata.get("train_config", "{}")).get("precision") or "auto")
    except (ValueError, AttributeError):
        precision = "auto"
    dtype = precision if precision in DTYPES else "auto"
    base_dtype = adapter.metadata.get("base_dtype")
    bits = dict(load_in_8bit=True) if base_dtype == "int8" else dict(load_in_4bit=base_dtype)
    model = load_base(source, dtype=dtype, device=device, **bits, **options)
    apply_adapter(model, adapter)
    logits = logits_of(model, probe_batch(model))
    del model
    return logits
