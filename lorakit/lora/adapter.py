"""The adapter file: A/B tensors named after base module paths, plus self-describing metadata.

Layout of `adapter.safetensors`:
- tensors `<path>.lora_A` (r, in) and `<path>.lora_B` (out, r), or `<path>.<slice>.lora_A/B` for a slice of
  a fused projection (GPT-2 `transformer.h.0.attn.c_attn.q.lora_A`), written in fp32 (fp16 and bf16 are read too);
- string metadata: `format`, `format_version`, `lorakit_version`, `rank`, `alpha`, `dropout`, `targets`,
  `base_model`, `base_class`, `base_fingerprint`, `base_dtype` and `modules` (JSON, one object per adapted
  module with its shape, slices, rank, alpha and the fingerprint of its base weight);
- a new task head trained in full next to the adapter (e.g. the classifier of a sequence-classification
  model, which the base checkpoint does not have) is stored as its parameters under their own names
  (`classifier.weight`), listed in the metadata key `trained_params` (JSON: name -> shape).
Nothing is ever unpickled: safetensors holds raw tensors only. `read_adapter` checks every metadata value
and tensor before anything uses them; a bad one is a LorakitError naming the file, the key and the value.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import LorakitError
from ..files import write_atomic
from .base import linear_at
from .fingerprint import combine_digests, digest_algorithm, sketch_kind, sketches_match
from .layer import LoRALayer, Slice
from .targets import Target
from .wrap import lora_layers, target_of, unmerge_adapter, unwrap, wrap_targets

FORMAT = "lorakit-adapter"
FORMAT_VERSION = 1
TENSOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes an adapter's tensors may have (torch counts fp8 and fp64 as floating point too; they are refused)."""
MAX_FEATURES = 1 << 24
"""Widest base layer a file may record: the tensors do not bound the output size of a sliced module, and export
allocates it (the widest real layers, vocabulary heads, have ~2**18 outputs)."""


@dataclass
class ModuleInfo:
    """One adapted base module as recorded in the file."""

    path: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    dropout: float
    slices: list[Slice] | None
    base_type: str
    digest: str
    sketch: list[float]
    dtype: str

    @property
    def names(self) -> list[str]:
        """Tensor-name prefixes: `path` or `path.slice` per A/B pair."""
        if self.slices is None:
            return [self.path]
        return [f"{self.path}.{s.name}" for s in self.slices]

    @property
    def out_sizes(self) -> list[int]:
        return [self.out_features] if self.slices is None else [s.size for s in self.slices]

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["slices"] = None if self.slices is None else [[s.name, s.start, s.stop] for s in self.slices]
        return d

    @classmethod
    def from_json(cls, d: Any, index: int = 0) -> ModuleInfo:
        """The record `modules[index]` of a file's metadata, every value checked (raises MetadataError)."""
        _expect(isinstance(d, dict), f"modules[{index}]", d, "an object (a module record)")
        path = _name(f"modules[{index}].path", d.get("path", _MISSING))
        where = f"module {path}: "
        out_features = _integer(where + "out_features", d.get("out_features", _MISSING), maximum=MAX_FEATURES)
        slices = d.get("slices")
        return cls(
            path=path,
            in_features=_integer(where + "in_features", d.get("in_features", _MISSING), maximum=MAX_FEATURES),
            out_features=out_features,
            rank=check_rank(where + "rank", d.get("rank", _MISSING)),
            alpha=check_alpha(where + "alpha", d.get("alpha", _MISSING)),
            dropout=check_dropout(where + "dropout", d.get("dropout", _MISSING)),
            slices=None if slices is None else _slices(where + "slices", slices, out_features),
            base_type=_string(where + "base_type", d.get("base_type", _MISSING)),
            digest=_string(where + "digest", d.get("digest", _MISSING)),
            sketch=_numbers(where + "sketch", d.get("sketch", _MISSING)),
            dtype=_string(where + "dtype", d.get("dtype", _MISSING)),
        )


@dataclass
class Adapter:
    """An adapter file read into memory."""

    path: Path
    metadata: dict[str, str]
    modules: list[ModuleInfo]
    tensors: dict[str, torch.Tensor]
    trained_params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Fully trained (non-LoRA) parameters stored in the file: name -> shape."""

    # read_adapter has checked these metadata values.
    @property
    def rank(self) -> int:
        return int(self.metadata["rank"])

    @property
    def alpha(self) -> float:
        return float(self.metadata["alpha"])

    @property
    def dropout(self) -> float:
        return float(self.metadata.get("dropout", 0.0))

    @property
    def base_model(self) -> str:
        return self.metadata.get("base_model", "")

    @property
    def trainable_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _module_info(path: str, layer: LoRALayer) -> ModuleInfo:
    digest, sketch = layer.base_fingerprint()
    return ModuleInfo(
        path=path,
        in_features=layer.in_features,
        out_features=layer.out_features,
        rank=layer.rank,
        alpha=layer.alpha,
        dropout=layer.dropout_p,
        slices=None if layer.is_full else list(layer.slices),
        base_type=type(layer.base).__name__,
        digest=digest,
        sketch=sketch,
        dtype=layer.base_dtype,
    )


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[ModuleInfo]]:
    """The A/B tensors (named after base paths, fp32, CPU) and module records of a wrapped model."""
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    LoRALayer.fingerprint_all(layer for _, layer in lora_layers(model))
    for path, layer in lora_layers(model):
        info = _module_info(path, layer)
        modules.append(info)
        for name, a, b in zip(info.names, layer.lora_A, layer.lora_B):
            tensors[f"{name}.lora_A"] = a.detach().float().cpu().contiguous()
            tensors[f"{name}.lora_B"] = b.detach().float().cpu().contiguous()
    if not modules:
        raise LorakitError("model has no LoRA layers to save; call add_lora first")
    for name, param in trained_params(model).items():
        tensors[name] = param.detach().float().cpu().contiguous()
    return tensors, modules


def trained_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters outside the LoRA layers that require gradients (e.g. a new classification head)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}


def build_metadata(
    model: nn.Module, modules: list[ModuleInfo], base_model: str | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The file's string metadata."""
    config = getattr(model, "config", None)
    first = modules[0]
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "lorakit_version": __version__,
        "rank": str(first.rank),
        "alpha": f"{first.alpha:g}",
        "dropout": f"{first.dropout:g}",
        "targets": str(getattr(model, "lorakit_targets", "") or ""),
        "base_model": str(base_model or getattr(config, "_name_or_path", "") or ""),
        "base_class": type(model).__name__,  # the class it was trained with (its head), not the checkpoint's
        "base_fingerprint": combine_digests({m.path: m.digest for m in modules}),
        "base_dtype": first.dtype,
        "modules": json.dumps([m.to_json() for m in modules], separators=(",", ":")),
    }
    heads = {n: list(p.shape) for n, p in trained_params(model).items()}
    if heads:
        meta["trained_params"] = json.dumps(heads, separators=(",", ":"))
        if getattr(config, "num_labels", None) is not None:
            meta["num_labels"] = str(config.num_labels)
    meta.update(extra or {})
    return meta


def save_adapter(
    model: nn.Module, path: str | os.PathLike, base_model: str | None = None, extra: dict[str, str] | None = None
) -> Path:
    """Write the model's A/B tensors and metadata to one safetensors file, atomically.

    Args:
        model: a model wrapped by add_lora (merged or not).
        path: the `.safetensors` file to write.
        base_model: the base's hub id or folder, recorded for merge/export (default: `config._name_or_path`).
        extra: more string metadata (e.g. the training configuration).
    """
    from safetensors.torch import save

    tensors, modules = adapter_state(model)
    meta = build_metadata(model, modules, base_model, extra)
    path = Path(path)
    write_atomic(path, save(tensors, metadata=meta))
    return path


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read and validate an adapter file without a model: metadata, module records and tensors.

    Raises:
        LorakitError: one line naming the file and what is wrong in it (unreadable, not a lorakit adapter, a
            newer format, a metadata value out of range, a tensor missing, misshapen, of another dtype or
            not finite).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path}: no such adapter file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LorakitError(f"{path}: not a readable safetensors file ({reason}); expected a lorakit adapter") from None
    if metadata.get("format") != FORMAT:
        hint = " (a PEFT adapter? convert it with `lorakit import`)" if "adapter_model" in path.name else ""
        raise LorakitError(f"{path}: safetensors file without lorakit adapter metadata{hint}")
    try:
        version = _integer("format_version", _parsed(metadata.get("format_version", _MISSING)))
        if version > FORMAT_VERSION:
            raise LorakitError(
                f"{path}: adapter format version {version} is newer than this lorakit supports "
                f"({FORMAT_VERSION}); upgrade lorakit"
            )
        modules, heads = _parse_metadata(metadata)
        expected = _tensor_shapes(modules, heads)
    except MetadataError as e:
        raise LorakitError(f"{path}: corrupt adapter metadata: {e}") from None
    _check_tensors(path, expected, tensors)
    return Adapter(path, metadata, modules, tensors, heads)


# ---------------------------------------------------------------- metadata checks


class MetadataError(LorakitError):
    """A bad value in an adapter's metadata (read_adapter adds the file name)."""


class _Missing:
    def __repr__(self) -> str:
        return "missing"


_MISSING: Any = _Missing()
_NAME = re.compile(r"[\w-]+(?:\.[\w-]+)*")  # a module or parameter path: word characters and dots


def show_value(value: Any, width: int = 60) -> str:
    """repr of a value read from a file, cut to one short line (crafted values can be huge or deeply nested)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # ValueError: an int too long to print
        text = f"<{type(value).__name__}>"
    return _clip(text, width)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _expect(ok: Any, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise MetadataError(f"{key} is {show_value(value)}, expected {expected}")


def _integer(key: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """A JSON integer in [minimum, maximum]."""
    ok = _is_int(value) and value >= minimum and (maximum is None or value <= maximum)
    _expect(ok, key, value, f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(
    key: str, value: Any, expected: str = "a finite number", ok: Callable[[float], bool] = lambda x: True
) -> float:
    """A finite JSON number for which `ok` holds."""
    try:
        x = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int beyond float range
        x = math.inf
    _expect(math.isfinite(x) and ok(x), key, value, expected)
    return x


def check_rank(key: str, value: Any) -> int:
    """A LoRA rank: an integer >= 1 (raises MetadataError)."""
    return _integer(key, value)


def check_alpha(key: str, value: Any) -> float:
    """A LoRA alpha: a finite number > 0 (raises MetadataError)."""
    return _real(key, value, "a finite number > 0", lambda x: x > 0)


def check_dropout(key: str, value: Any) -> float:
    """A dropout probability: a number in [0, 1) (raises MetadataError)."""
    return _real(key, value, "a number in [0, 1)", lambda x: 0 <= x < 1)


def _parsed(text: Any) -> Any:
    """A top-level metadata string as the int or float it spells, else unchanged (then refused by the check)."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def _numbers(key: str, value: Any) -> list[float]:
    _expect(isinstance(value, list), key, value, "a list of finite numbers")
    return [_real(f"{key}[{i}]", x) for i, x in enumerate(value)]


def _string(key: str, value: Any) -> str:
    _expect(isinstance(value, str), key, value, "a string")
    return value


def _name(key: str, value: Any) -> str:
    _expect(isinstance(value, str) and _NAME.fullmatch(value), key, value, "a name of word characters and dots")
    return value


def _json(key: str, text: Any, expected: str) -> Any:
    _expect(isinstance(text, str), key, text, expected)
    try:
        return json.loads(text)
    except RecursionError:
        raise MetadataError(f"{key} is JSON nested too deeply, expected {expected}") from None
    except ValueError as e:
        raise MetadataError(f"{key} is not valid JSON ({_clip(str(e), 80)}), expected {expected}") from None


def _slices(key: str, value: Any, out_features: int) -> list[Slice]:
    """[[name, start, stop], ...]: disjoint, non-empty output ranges within [0, out_features), names unique."""
    _expect(isinstance(value, list) and value, key, value, "null or a non-empty list of [name, start, stop]")
    slices = []
    for i, item in enumerate(value):
        _expect(isinstance(item, list) and len(item) == 3, f"{key}[{i}]", item, "[name, start, stop]")
        name = _name(f"{key}[{i}] name", item[0])
        start, stop = _integer(f"{key}[{i}] start", item[1], 0), _integer(f"{key}[{i}] stop", item[2], 0)
        _expect(
            start < stop <= out_features, f"{key}[{i}]", item, f"a non-empty range [start, stop) in [0, {out_features})"
        )
        slices.append(Slice(name, start, stop))
    ordered = sorted(slices, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.stop:
            raise MetadataError(
                f"{key}: {a.name} [{a.start}, {a.stop}) and {b.name} [{b.start}, {b.stop}) overlap, "
                "expected disjoint output ranges"
            )
    names = [s.name for s in slices]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise MetadataError(f"{key}: slice name {twice} appears twice, expected distinct names")
    return slices


def _parse_metadata(metadata: dict[str, str]) -> tuple[list[ModuleInfo], dict[str, tuple[int, ...]]]:
    """The module records and trained parameters (name -> shape) of a file's metadata, every value checked."""
    check_rank("rank", _parsed(metadata.get("rank", _MISSING)))
    check_alpha("alpha", _parsed(metadata.get("alpha", _MISSING)))
    check_dropout("dropout", _parsed(metadata.get("dropout", "0")))
    if "num_labels" in metadata:
        _integer("num_labels", _parsed(metadata["num_labels"]))
    if "train_config" in metadata:
        config = _json("train_config", metadata["train_config"], "a JSON object")
        _expect(isinstance(config, dict), "train_config", config, "a JSON object")
    records = _json("modules", metadata.get("modules", _MISSING), "a JSON list of module records")
    _expect(isinstance(records, list) and records, "modules", records, "a non-empty list of module records")
    modules = [ModuleInfo.from_json(d, i) for i, d in enumerate(records)]
    paths = [m.path for m in modules]
    twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if twice is not None:
        raise MetadataError(f"module {twice} is listed twice, expected each module once")
    heads = _json("trained_params", metadata.get("trained_params", "{}"), "a JSON object of name -> shape")
    _expect(isinstance(heads, dict), "trained_params", heads, "an object of name -> shape")
    for name, shape in heads.items():
        _name("trained_params name", name)
        dims_ok = isinstance(shape, list) and all(_is_int(n) and n > 0 for n in shape)
        _expect(dims_ok, f"trained_params {name}", shape, "a shape: a list of integers >= 1")
    return modules, {name: tuple(shape) for name, shape in heads.items()}


def _tensor_shapes(modules: list[ModuleInfo], heads: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The tensors the metadata names: name -> shape; each name claimed once."""
    expected: dict[str, tuple[int, ...]] = {}

    def claim(name: str, shape: tuple[int, ...]) -> None:
        if name in expected:
            raise MetadataError(f"tensor {name} is named by two records, expected each tensor name once")
        expected[name] = shape

    for m in modules:
        for name, out in zip(m.names, m.out_sizes):
            claim(f"{name}.lora_A", (m.rank, m.in_features))
            claim(f"{name}.lora_B", (out, m.rank))
    for name, shape in heads.items():
        claim(name, shape)
    return expected


def _check_tensors(path: Path, expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise LorakitError(f"{path}: missing tensors {_few(missing)} named in its metadata")
    if unexpected:
        raise LorakitError(f"{path}: unexpected tensors {_few(unexpected)} not named in its metadata")
    for k, shape in expected.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise LorakitError(f"{path}: tensor {k} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype not in TENSOR_DTYPES:
            raise LorakitError(
                f"{path}: tensor {k} has dtype {t.dtype}, expected a float type: float32, float16 or bfloat16"
            )
        if not torch.isfinite(t).all():
            raise LorakitError(f"{path}: tensor {k} holds NaN or inf values")


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(name if name.isprintable() else show_value(name) for name in names[:n])  # names from a file
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _same_structure(info: ModuleInfo, layer: LoRALayer) -> bool:
    slices = None if layer.is_full else list(layer.slices)
    return (
        info.rank == layer.rank
        and info.slices == slices
        and (info.in_features, info.out_features) == (layer.in_features, layer.out_features)
    )


def check_base(adapter: Adapter, model: nn.Module) -> None:
    """Refuse an adapter trained on other base weights (exact digest in the same dtype, sketch otherwise)."""
    layers = dict(lora_layers(model))
    LoRALayer.fingerprint_all(layers[info.path] for info in adapter.modules)
    for info in adapter.modules:
        layer = layers[info.path]
        digest, sketch = layer.base_fingerprint()
        if layer.base_dtype == info.dtype:
            same = layer.base_digest(digest_algorithm(info.digest)) == info.digest
        else:
            same = sketches_match(sketch, info.sketch, sketch_kind(layer.base_dtype, info.dtype))
        if not same:
            raise LorakitError(
                f"{adapter.path}: trained on another base ({adapter.base_model or 'unnamed'}, fingerprint "
                f"{adapter.metadata.get('base_fingerprint')}); this model's weight at {info.path} differs"
            )


def load_adapter(model: nn.Module, path: str | os.PathLike, verify_base: bool = True) -> list[str]:
    """Load an adapter file onto a model.

    A plain base gets the LoRA layers the file's metadata names; an already wrapped model (same
    modules, slices and ranks) gets its A/B swapped in place: task switching without reloading the base.
    A merged model is unmerged first. Nothing changes when a check fails.

    Args:
        model: the base model, plain or wrapped.
        path: the adapter `.safetensors` file.
        verify_base: refuse an adapter whose recorded base fingerprint does not match this model.

    Returns:
        The adapted names, as add_lora returns them.
    """
    adapter = read_adapter(path)
    return apply_adapter(model, adapter, verify_base)


def apply_adapter(model: nn.Module, adapter: Adapter, verify_base: bool = True) -> list[str]:
    """load_adapter for an Adapter already in memory."""
    existing = dict(lora_layers(model))
    params = dict(model.named_parameters())
    for name, shape in adapter.trained_params.items():
        if name not in params or tuple(params[name].shape) != shape:
            found = tuple(params[name].shape) if name in params else "absent"
            raise LorakitError(
                f"{adapter.path}: holds a trained {name} of shape {shape}; this model's is {found} "
                "(another task head or number of labels?)"
            )
    wrapped_here = False
    if not existing:
        targets = []
        for info in adapter.modules:
            linear_at(model, info.path, (info.in_features, info.out_features), str(adapter.path))
            targets.append((info, Target(info.path, None if info.slices is None else tuple(info.slices))))
        model.requires_grad_(False)
        for info, target in targets:
            wrap_targets(model, [target], info.rank, info.alpha, info.dropout)
        model.lorakit_targets = adapter.metadata.get("targets", "")
        wrapped_here = True
    else:
        paths = [info.path for info in adapter.modules]
        if sorted(paths) != sorted(existing):
            raise LorakitError(
                f"{adapter.path}: adapts {_few(paths)}, the model's LoRA layers are {_few(list(existing))}; "
                "load it onto a plain base instead"
            )
        for info in adapter.modules:
            if not _same_structure(info, existing[info.path]):
                raise LorakitError(
                    f"{adapter.path}: {info.path} has another rank or slices than the model's LoRA layer"
                )
        unmerge_adapter(model)
    try:
        if verify_base:
            check_base(adapter, model)
    except LorakitError:
        if wrapped_here:
            unwrap(model)
        raise
    layers = dict(lora_layers(model))
    names = []
    with torch.no_grad():
        for info in adapter.modules:
            layer = layers[info.path]
            layer.alpha, layer.scaling = info.alpha, info.alpha / info.rank
            for name, a, b in zip(info.names, layer.lora_A, layer.lora_B):
                a.copy_(adapter.tensors[f"{name}.lora_A"])
                b.copy_(adapter.tensors[f"{name}.lora_B"])
                names.append(name)
        for name in adapter.trained_params:  # a trained head replaces the base's (randomly initialized) one
            params[name].copy_(adapter.tensors[name])
    return names


__all__ = ["Adapter", "ModuleInfo", "read_adapter", "save_adapter", "load_adapter", "apply_adapter", "target_of"]
