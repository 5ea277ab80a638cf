"""Loading a base model and its tokenizer from a Hugging Face hub id or a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LorakitError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | str:
    """`auto` (the checkpoint's own dtype) or one of fp32, bf16, fp16."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise LorakitError(f"unknown dtype {name!r}; expected auto, fp32, bf16 or fp16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """fp32 / bf16 / fp16 for a torch dtype (its torch name otherwise)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def _model_class(config: Any, task: str | None) -> Any:
    import transformers

    if task == "classification":
        return transformers.AutoModelForSequenceClassification
    if task == "causal-lm":
        return transformers.AutoModelForCausalLM
    # The class the checkpoint was saved from, so that heads (LM, classification) come back as they were.
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def load_base(source: str, dtype: str = "auto", task: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a pretrained model in eval mode.

    Args:
        source: a hub id (`gpt2-medium`) or a local folder with `config.json`.
        dtype: `auto` (as stored), fp32, bf16 or fp16.
        task: None (the class named in the config), `causal-lm` or `classification`.
        trust_remote_code: allow custom model code from the hub (off unless asked for).
    """
    from transformers import AutoConfig

    torch_dtype = parse_dtype(dtype)
    if not source:
        raise LorakitError("no base model given; pass --model (a hub id or a model folder)")
    path = Path(source)
    if path.exists() and not (path / "config.json").is_file():
        raise LorakitError(f"{source}: folder has no config.json; expected a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        cls = _model_class(config, task)
        model = cls.from_pretrained(source, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LorakitError(f"cannot load model {source!r}: {first}") from None
    model.eval()
    return model


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer stored with a model, or None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None
