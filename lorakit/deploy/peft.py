"""Convert between lorakit adapter files and Hugging Face PEFT LoRA folders.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors` with tensors
`base_model.model.<path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); the update of a module is
`lora_alpha / r * B A`, with `r` and `lora_alpha` per module from `rank_pattern` / `alpha_pattern`.

A fused projection adapted on k output slices (GPT-2 `c_attn` with q and v) has no PEFT equivalent, so it is
exported as one rank k*r adapter on the whole module: A stacks the slices' A, B is block-structured (slice
i's output rows use only columns i*r:(i+1)*r, other rows stay zero) and alpha becomes k*alpha, so that
alpha/r, and with it the update, is unchanged. This is exact, and import recognises the structure and restores
the slices (same tensors, same file size).

The weights file's safetensors metadata carries what PEFT has no key for (`lorakit_targets`, the targets spec;
`lorakit_base_model`, the base as lorakit names it; `lorakit_base_class`); PEFT and vLLM ignore it. An adapter
on lorakit's packaged default names its hub id as base_model_name_or_path, so that PEFT and transformers can
load it.

A trained head (the `trained_params` of a classification adapter) is PEFT's `modules_to_save`: the config
names the modules owning its parameters and the file holds them as `base_model.model.<param name>`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..files import atomic_dir, check_out
from ..lora.adapter import (
    TENSOR_DTYPES,
    Adapter,
    MetadataError,
    ModuleInfo,
    check_alpha,
    check_dropout,
    check_rank,
    read_adapter,
    save_adapter,
    show_value,
)
from ..lora.base import linear_at
from ..lora.layer import Slice
from ..lora.targets import Target, fused_slices
from ..lora.wrap import wrap_targets
from ..models import PACKAGED, PACKAGED_HUB_ID
from .card import CARD_NAME, model_card

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
KIND = "peft"  # the marker of an exported folder: what `export --overwrite` may replace

# PEFT config keys that change what a LoRA computes (or add trained weights lorakit cannot hold).
_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "arrow_config": "Arrow routing",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication",
}
Pairs = dict[str, tuple[Tensor, Tensor]]  # module path -> (A (r, in), B (out, r))
# init_lora_weights values whose adapters expect a modified (residual or quantized) base weight.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_TENSOR_NAME = re.compile(r"(?P<path>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")


# ---------------------------------------------------------------- export


def export_peft(adapter: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a lorakit adapter as a PEFT LoRA folder that `peft.PeftModel.from_pretrained` loads.

    Args:
        adapter: the lorakit `.safetensors` adapter file.
        out: the folder to write (`adapter_config.json` + `adapter_model.safetensors`).
        overwrite: replace an existing `out` folder that lorakit exported before (never `.`, a folder holding
            the current folder or the adapter, or a folder lorakit did not make).

    Returns:
        The written folder.
    """
    from safetensors.torch import save_file

    check_out(out, KIND, overwrite, [adapter])
    source = read_adapter(adapter)
    heads = _head_modules(source)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for info in source.modules:
        a, b, ranks[info.path], alphas[info.path] = _peft_pair(info, source.tensors)
        if not math.isfinite(alphas[info.path]):  # k * alpha of k slices, for an absurd alpha
            raise LorakitError(f"{source.path}: module {info.path}: alpha {info.alpha:g} is too large to export")
        tensors[f"{PREFIX}{info.path}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{info.path}.lora_B.weight"] = b.float().contiguous()
    for name in source.trained_params:  # PEFT stores a modules_to_save module's weights under their plain names
        tensors[f"{PREFIX}{name}"] = source.tensors[name].float().contiguous()
    config = _peft_config(source, ranks, alphas, heads)
    targets = source.metadata.get("targets", "")
    metadata = {"format": "pt", "lorakit_targets": targets, "lorakit_base_model": source.base_model}
    metadata["lorakit_base_class"] = source.metadata.get("base_class", "")  # what the vLLM check reads
    out = Path(out)
    with atomic_dir(out, overwrite, kind=KIND) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        card = model_card(source, KIND, source.base_model or config.get("base_model_name_or_path") or "", out.name)
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    return out


def peft_base_name(base_model: str) -> str:
    """base_model_name_or_path for an adapter recording `base_model`: the packaged default's hub id (PEFT and
    transformers cannot resolve `lorakit:` names), else the recorded hub id or folder."""
    return PACKAGED_HUB_ID if base_model == PACKAGED else base_model


def _peft_pair(info: ModuleInfo, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, int, float]:
    """(A (r_eff, in), B (out, r_eff), r_eff, alpha_eff) of one module as a single PEFT LoRA pair."""
    if info.slices is None:
        return tensors[f"{info.path}.lora_A"], tensors[f"{info.path}.lora_B"], info.rank, info.alpha
    r, k = info.rank, len(info.slices)
    a = torch.cat([tensors[f"{name}.lora_A"] for name in info.names])  # (k*r, in)
    b = torch.zeros(info.out_features, k * r)  # (out, k*r)
    for i, (s, name) in enumerate(zip(info.slices, info.names, strict=True)):
        b[s.start : s.stop, i * r : (i + 1) * r] = tensors[f"{name}.lora_B"]  # (out_slice, r) block
    return a, b, k * r, k * info.alpha  # (k*alpha) / (k*r) = alpha / r


def _head_modules(source: Adapter) -> list[str]:
    """PEFT's modules_to_save for the adapter's trained head: the modules owning its parameters.

    `classifier.weight` and `classifier.bias` give `classifier`; RoBERTa's `classifier.dense.*` and
    `classifier.out_proj.*` give both of those. PEFT then replaces each listed module by a copy and loads
    the file's parameters into it (non-strictly: a parameter that was not trained keeps the base's value).
    """
    adapted = {info.path for info in source.modules}
    heads = []
    for name in source.trained_params:
        module = name.rpartition(".")[0]
        if not module:
            raise LorakitError(f"{source.path}: trained parameter {name} belongs to no module; PEFT cannot hold it")
        if module in adapted or any(module.startswith(p + ".") for p in adapted):
            raise LorakitError(
                f"{source.path}: trained parameter {name} is inside an adapted module; PEFT cannot hold both"
            )
        if module not in heads:
            heads.append(module)
    return heads


def _task_fields(base_class: str) -> dict[str, Any]:
    """task_type (and auto_mapping) for the base class the adapter was saved from.

    Only causal LMs get a task type. PEFT's SEQ_CLS (like its other head tasks) adds `classifier` and `score`
    to modules_to_save whether or not the file holds their weights (a lorakit adapter holds a head only if
    it trained one, listed in modules_to_save then); with no task type PEFT wraps the model as it is, and
    `auto_mapping` (what PEFT itself writes then) names the class for `AutoPeftModel`.
    """
    if base_class.endswith(("ForCausalLM", "LMHeadModel")):
        return {"task_type": "CAUSAL_LM"}
    auto = {"base_model_class": base_class, "parent_library": "transformers"} if base_class else None
    return {"task_type": None, "auto_mapping": auto}


def _peft_config(source: Adapter, ranks: dict[str, int], alphas: dict[str, float], heads: list[str]) -> dict[str, Any]:
    """adapter_config.json; the most common rank and alpha are global, the others go into the patterns."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    paths = list(ranks)
    return {
        "peft_type": "LORA",
        **_task_fields(source.metadata.get("base_class", "")),
        "base_model_name_or_path": peft_base_name(source.base_model) or None,
        "revision": None,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": source.dropout,
        "target_modules": paths,
        "fan_in_fan_out": any(m.base_type == "Conv1D" for m in source.modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {_pattern_key(p, paths): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern_key(p, paths): _number(v) for p, v in alphas.items() if v != alpha},
        "inference_mode": True,
    }


def _pattern_key(path: str, paths: list[str]) -> str:
    """A rank_pattern / alpha_pattern key that selects exactly `path` among the adapted `paths`.

    peft matches `re.match(rf"(.*\\.)?({key})$", module_name)` (older releases require a prefix before the
    key and then fall back to an exact dict lookup), so the plain path works in both; only if a `.` read as
    a regex wildcard also fits another adapted path is the key anchored and escaped (recent peft only).
    """
    others = [p for p in paths if p != path and re.match(rf"(.*\.)?({path})$", p)]
    return path if not others else "^" + re.escape(path)


def _number(x: float) -> int | float:
    """32.0 -> 32, so that the JSON reads as PEFT writes it."""
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------- import


def import_peft(
    peft_dir: str | os.PathLike, out: str | os.PathLike, model: str | None = None, overwrite: bool = False
) -> Path:
    """Convert a PEFT LoRA folder into a lorakit adapter file that gives the same outputs.

    Args:
        peft_dir: folder with `adapter_config.json` and `adapter_model.safetensors`.
        out: the lorakit `.safetensors` file to write.
        model: the base's hub id or folder (default: the config's `base_model_name_or_path`); it is loaded
            to check the modules and to fingerprint the base weights. With modules_to_save (a trained head),
            it is loaded as the class in the config's `auto_mapping` (or as a sequence classifier for
            task_type SEQ_CLS), with as many labels as the head's weights have.
        overwrite: replace an existing `out` file, if it is a lorakit adapter (a symbolic link: the file it
            names).

    Returns:
        The written adapter file.
    """
    peft_dir, out = Path(peft_dir), _import_out(Path(out), overwrite)
    config = read_peft_config(peft_dir)
    pairs, heads = read_peft_tensors(peft_dir, config.get("modules_to_save") or [])
    alphas = {path: _alpha(peft_dir, config, path, a.shape[0]) for path, (a, _) in pairs.items()}
    dropout = _dropout(peft_dir, config)
    recorded = _lorakit_metadata(peft_dir)
    packaged = recorded.get("lorakit_base_model") == PACKAGED  # exported by lorakit from the packaged default
    source = model or (PACKAGED if packaged else config.get("base_model_name_or_path"))
    if not source:
        raise LorakitError(
            f"{peft_dir / CONFIG_NAME}: records no base_model_name_or_path; pass --model (a hub id or model folder)"
        )
    base = _load_base_for(str(source), config, heads)
    _check_modules(peft_dir, base, pairs)
    base.requires_grad_(False)
    _set_heads(peft_dir, base, heads)
    for path, (a, b) in pairs.items():
        split = _split_blocks(fused_slices(base, path), a, b)
        if split is None:  # one pair on the whole module, at the config's r (checked equal by _alpha)
            slices, parts, alpha = None, [(a, b)], alphas[path]
        else:  # lorakit's export of k slices: rank k*r and alpha k*alpha back to r and alpha
            slices, parts, alpha = tuple(split[0]), split[1], alphas[path] / len(split[0])
        wrap_targets(base, [Target(path, slices)], parts[0][0].shape[0], alpha, dropout)
        layer = base.get_submodule(path)
        with torch.no_grad():
            for i, (a_i, b_i) in enumerate(parts):
                layer.lora_A[i].copy_(a_i.float())  # (r, in)
                layer.lora_B[i].copy_(b_i.float())  # (out_slice, r)
    base.lorakit_targets = recorded.get("lorakit_targets") or _targets_string(config.get("target_modules"), pairs)
    return save_adapter(base, out, base_model=str(source))


def _split_blocks(
    slices: tuple[Slice, ...] | None, a: Tensor, b: Tensor
) -> tuple[list[Slice], list[tuple[Tensor, Tensor]]] | None:
    """The slices and their (A (r, in), B (out_slice, r)) pairs when a pair on a fused projection has the block
    structure export gives k adapted slices: B's rows of the other slices are zero, and the i-th adapted slice's
    rows are zero outside columns i*r:(i+1)*r (r = rank / k); None for any other pair (a dense B, a B of zeros).
    """
    if slices is None:
        return None
    used = [s for s in slices if b[s.start : s.stop].any()]
    k = len(used)
    if k == 0 or a.shape[0] % k:
        return None
    r = a.shape[0] // k
    for i, s in enumerate(used):
        block = b[s.start : s.stop]  # (out_slice, k*r)
        if block[:, : i * r].any() or block[:, (i + 1) * r :].any():
            return None
    return used, [(a[i * r : (i + 1) * r], b[s.start : s.stop, i * r : (i + 1) * r]) for i, s in enumerate(used)]


def _lorakit_metadata(peft_dir: Path) -> dict[str, str]:
    """The `lorakit_*` keys of the weights file's safetensors metadata (a folder lorakit exported), else {}."""
    from safetensors import safe_open

    try:
        with safe_open(str(peft_dir / WEIGHTS_NAME), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # read_peft_tensors has already reported an unreadable file
        return {}
    return {k: v for k, v in metadata.items() if k.startswith("lorakit_") and isinstance(v, str)}


def _import_out(out: Path, overwrite: bool) -> Path:
    """The file import writes (a symbolic link resolved), checked before anything loads: a new name, or with
    `overwrite` a lorakit adapter file; never a folder, a broken link or another file (a PEFT or base weights
    file, say)."""
    if out.is_symlink() and not out.exists():
        raise LorakitError(f"{out}: is a broken symbolic link; expected an adapter .safetensors file path")
    target = Path(os.path.realpath(out)) if out.is_symlink() else out  # a link stays, the file it names changes
    if target.is_dir():
        raise LorakitError(f"{out}: is a folder; expected an adapter .safetensors file path")
    if not target.exists():
        return target
    if not overwrite:
        raise LorakitError(f"{out}: file exists; choose another --out or pass --overwrite")
    if not _is_lorakit_adapter(target):
        raise LorakitError(f"{out}: is not a lorakit adapter file; --overwrite replaces only a lorakit adapter")
    return target


def _is_lorakit_adapter(path: Path) -> bool:
    """Whether `path` is a safetensors file with lorakit's adapter format in its metadata (tensors not read)."""
    from safetensors import safe_open

    from ..lora.adapter import FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors, unreadable: not lorakit's
        return False


def read_peft_config(peft_dir: Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT folder, checked to be plain LoRA with the keys lorakit reads of the right
    types (import_peft checks r and lora_alpha per module, as peft picks them)."""
    if not peft_dir.is_dir():
        raise LorakitError(f"{peft_dir}: no such folder; expected a PEFT adapter folder")
    path = peft_dir / CONFIG_NAME
    if not path.is_file():
        raise LorakitError(f"{peft_dir}: no {CONFIG_NAME}; expected a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise LorakitError(f"{path}: unreadable ({e})") from None
    except RecursionError:
        raise LorakitError(f"{path}: JSON nested too deeply; expected a PEFT adapter config") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise LorakitError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LorakitError(f"{path}: expected a JSON object, got {type(config).__name__}")
    _check_plain_lora(path, config)
    return config


def _check_plain_lora(path: Path, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise LorakitError(f"{path}: has no peft_type; expected a PEFT adapter config")
    if peft_type != "LORA":
        kind = peft_type if isinstance(peft_type, str) and peft_type.isidentifier() else show_value(peft_type)
        raise LorakitError(f"{path}: is a PEFT {kind} adapter; only plain LoRA can be imported")
    if config.get("use_rslora"):
        raise LorakitError(
            f"{path}: use_rslora is true; rsLoRA scaling alpha/sqrt(r) differs from lorakit's alpha/r, "
            "so it is not imported"
        )
    for key, what in _VARIANTS.items():
        if config.get(key):
            raise LorakitError(f"{path}: {key} = {show_value(config[key])} ({what}); only plain LoRA can be imported")
    if config.get("bias", "none") != "none":
        raise LorakitError(
            f"{path}: bias = {show_value(config['bias'])} (trained biases); only bias 'none' can be imported"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_RESIDUAL_INITS):
        raise LorakitError(
            f"{path}: init_lora_weights = {show_value(init)} changes the base weights; save it from PEFT with "
            "path_initial_model_for_weight_conversion to get a plain LoRA first"
        )
    for key, ok, expected in _KEY_TYPES:
        value = config.get(key)
        if value is not None and not ok(value):
            raise LorakitError(f"{path}: {key} = {show_value(value)}, expected {expected}")


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


# Config keys lorakit reads, when not null: (key, test, what is expected).
_KEY_TYPES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("modules_to_save", _names, "a list of module names"),
    ("target_modules", lambda v: isinstance(v, str) or _names(v), "a list of module names or a regex"),
    ("base_model_name_or_path", lambda v: isinstance(v, str), "a hub id or folder"),
    ("rank_pattern", lambda v: isinstance(v, dict), "an object of module patterns"),
    ("alpha_pattern", lambda v: isinstance(v, dict), "an object of module patterns"),
    (
        "auto_mapping",
        lambda v: isinstance(v, dict) and isinstance(v.get("base_model_class") or "", str),
        "an object with a base_model_class name",
    ),
]


def read_peft_tensors(peft_dir: Path, modules_to_save: list[str] | None = None) -> tuple[Pairs, dict[str, Tensor]]:
    """From adapter_model.safetensors (never a pickle): {module path: (A (r, in), B (out, r))} and the fully
    trained parameters of the `modules_to_save` modules, {parameter name: tensor}."""
    from safetensors import SafetensorError, safe_open

    path = peft_dir / WEIGHTS_NAME
    if not path.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            raise LorakitError(
                f"{peft_dir}: has only adapter_model.bin (a pickle, never loaded); save it with "
                "safe_serialization=True to get adapter_model.safetensors"
            )
        raise LorakitError(f"{peft_dir}: no {WEIGHTS_NAME}; expected a PEFT adapter folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LorakitError(f"{path}: not a readable safetensors file ({reason})") from None
    return _pair_tensors(path, tensors, modules_to_save or [])


def _pair_tensors(
    path: Path, tensors: dict[str, Tensor], modules_to_save: list[str]
) -> tuple[Pairs, dict[str, Tensor]]:
    found: dict[str, dict[str, Tensor]] = {}
    heads: dict[str, Tensor] = {}
    adapter_names = set()
    for name, tensor in tensors.items():
        if not name.isprintable():  # so that every message below stays one line
            raise LorakitError(f"{path}: tensor name {show_value(name)} holds control characters")
        m = _TENSOR_NAME.fullmatch(name.removeprefix(PREFIX))
        if name.startswith(PREFIX) and m is None and _in_modules(name.removeprefix(PREFIX), modules_to_save):
            heads[name.removeprefix(PREFIX)] = _checked(path, name, tensor)
            continue
        if not name.startswith(PREFIX) or m is None:
            raise LorakitError(f"{path}: {_unexpected(name)}")
        adapter_names.add(m["adapter"])
        found.setdefault(m["path"], {})[m["kind"]] = tensor
    if len(adapter_names) > 1:
        raise LorakitError(f"{path}: holds several adapters {sorted(map(str, adapter_names))}; expected one")
    if not found:
        raise LorakitError(f"{path}: holds no LoRA tensors")
    pairs = {}
    for module, kinds in found.items():
        if set(kinds) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in kinds else "lora_A"
            raise LorakitError(f"{path}: {module} has no {missing} tensor")
        a, b = kinds["lora_A"], kinds["lora_B"]
        if a.ndim > 2 or b.ndim > 2:
            raise LorakitError(
                f"{path}: {module} has {a.ndim}-D LoRA tensors (LoRA on a convolution); "
                "lorakit adapts linear layers only"
            )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or 0 in a.shape + b.shape:
            raise LorakitError(
                f"{path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected (r, in) and (out, r), none of them 0"
            )
        pairs[module] = (_checked(path, f"{module} lora_A", a), _checked(path, f"{module} lora_B", b))
    return pairs, heads


def _in_modules(name: str, modules_to_save: list[str]) -> bool:
    """Whether parameter `name` lies in a module that modules_to_save names: a key equal to the module's path
    or ending it at a dot (PEFT's own suffix match is looser; a stricter match only refuses more)."""
    parts = name.split(".")[:-1]
    owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(owner == key or owner.endswith("." + key) for owner in owners for key in modules_to_save)


def _checked(path: Path, name: str, tensor: Tensor) -> Tensor:
    """The tensor, if it is float32, float16 or bfloat16 (not fp8, fp64 or ints) and finite."""
    if tensor.dtype not in TENSOR_DTYPES:
        raise LorakitError(f"{path}: {name} is {tensor.dtype}; expected float32, float16 or bfloat16")
    if not torch.isfinite(tensor).all():
        raise LorakitError(f"{path}: {name} holds NaN or inf values")
    return tensor


def _unexpected(name: str) -> str:
    """Why a tensor name is refused, as the end of an error line."""
    if "lora_embedding_" in name:
        return f"tensor {name} is LoRA on an embedding layer; lorakit adapts linear layers only"
    if "lora_magnitude_vector" in name:
        return f"tensor {name} belongs to DoRA; only plain LoRA can be imported"
    if re.search(r"\.lora_[AB]\.", name) and name.endswith(".bias"):
        return f"tensor {name} is a LoRA bias; only plain LoRA can be imported"
    if re.search(r"\.lora_[AB]\.", name) and not name.endswith(".weight"):
        return f"tensor {name} is LoRA on a non-linear layer (conv?); lorakit adapts linear layers only"
    return f"unexpected tensor {name}; expected {PREFIX}<module>.lora_A.weight and .lora_B.weight only"


def _load_base_for(source: str, config: dict[str, Any], heads: dict[str, Tensor]) -> nn.Module:
    """The base as import_peft needs it: as saved, or, with a trained head, the class and label count of
    that head (a PEFT SEQ_CLS adapter usually sits on a base checkpoint without a classifier)."""
    from ..models import load_base

    if not heads:
        return load_base(source)
    model_class = ((config.get("auto_mapping") or {}).get("base_model_class")) or None
    task = "classification" if config.get("task_type") == "SEQ_CLS" and not model_class else None
    base = load_base(source, task=task, model_class=model_class)
    params = dict(base.named_parameters())
    labels = {t.shape[0] for n, t in heads.items() if n in params and params[n].shape != t.shape and t.ndim}
    if len(labels) == 1 and hasattr(base.config, "num_labels"):  # the output layer: (labels, hidden), (labels,)
        base = load_base(source, task=task, model_class=model_class, num_labels=labels.pop())
    return base


def _set_heads(peft_dir: Path, model: nn.Module, heads: dict[str, Tensor]) -> None:
    """Copy the trained head into the base and mark it trained, so that save_adapter stores it."""
    where = peft_dir / WEIGHTS_NAME
    params = dict(model.named_parameters())
    for name, tensor in heads.items():
        if name not in params:
            raise LorakitError(f"{where}: {name} (modules_to_save) is not a parameter of the base model")
        if params[name].shape != tensor.shape:
            raise LorakitError(
                f"{where}: {name} is {tuple(tensor.shape)}, the base's is {tuple(params[name].shape)}; "
                "adapter for another base or number of labels?"
            )
        with torch.no_grad():
            params[name].copy_(tensor)
        params[name].requires_grad_(True)


def _check_modules(peft_dir: Path, model: nn.Module, pairs: Pairs) -> None:
    """Every adapted path exists in the base, is linear, and has the tensors' (in, out)."""
    for path, (a, b) in pairs.items():
        linear_at(model, path, (a.shape[1], b.shape[0]), str(peft_dir / WEIGHTS_NAME))


def _alpha(peft_dir: Path, config: dict[str, Any], path: str, rank: int) -> float:
    """lora_alpha of module `path` as peft picks it: the first alpha_pattern key matching the end of the path
    (or equal to it), else the global lora_alpha (peft's default 8). Its r, picked the same way, must be
    `rank`, the tensors' rank: peft builds the layer from that r and refuses tensors of another rank."""
    where = peft_dir / CONFIG_NAME
    try:
        r = check_rank(f"r for {path}", _pattern_value(where, config, "rank_pattern", "r", path))
        if r != rank:
            raise MetadataError(f"r for {path} is {show_value(r)}, but its lora_A and lora_B have rank {rank}")
        return check_alpha(f"lora_alpha for {path}", _pattern_value(where, config, "alpha_pattern", "lora_alpha", path))
    except MetadataError as e:
        raise LorakitError(f"{where}: {e}") from None


def _pattern_value(where: Path, config: dict[str, Any], patterns: str, key: str, path: str) -> Any:
    """config[patterns][first key matching path], else config[key] (peft's default 8)."""
    for pattern, value in (config.get(patterns) or {}).items():
        try:
            if pattern == path or re.match(rf"(.*\.)?({pattern})$", path):
                return value
        except re.error as e:
            raise LorakitError(f"{where}: invalid {patterns} key {show_value(pattern)} ({e})") from None
    return config.get(key, 8)


def _dropout(peft_dir: Path, config: dict[str, Any]) -> float:
    try:
        return check_dropout("lora_dropout", config.get("lora_dropout") or 0.0)
    except MetadataError as e:
        raise LorakitError(f"{peft_dir / CONFIG_NAME}: {e}") from None


def _targets_string(target_modules: Any, pairs: dict[str, Any]) -> str:
    """lorakit's `targets` record: the config's target_modules (a string is a regex there as with re:)."""
    if isinstance(target_modules, str):
        return f"re:{target_modules}"
    if isinstance(target_modules, list) and target_modules:
        return ",".join(str(t) for t in target_modules)
    return ",".join(pairs)


__all__ = ["export_peft", "import_peft", "read_peft_config", "read_peft_tensors"]
