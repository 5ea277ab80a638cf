"""lorakit: LoRA fine-tuning exact to the paper (Hu et al. 2021), with small self-describing adapter files.

The public API is imported lazily so that `lorakit --help` does not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "add_lora": "lora.wrap",
    "merge_adapter": "lora.wrap",
    "unmerge_adapter": "lora.wrap",
    "set_adapter_enabled": "lora.wrap",
    "lora_layers": "lora.wrap",
    "save_adapter": "lora.adapter",
    "load_adapter": "lora.adapter",
    "read_adapter": "lora.adapter",
    "LoRALayer": "lora.layer",
    "LorakitError": "errors",
    "CheckFailed": "errors",
    "TrainingInterrupted": "errors",
    "TrainingDiverged": "errors",
    "train": "training.loop",
    "TrainConfig": "training.config",
    "build_config": "training.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
