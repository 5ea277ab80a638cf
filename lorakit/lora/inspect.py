"""`lorakit inspect`: what an adapter file holds, per module, without loading a base model.

Sizes and parameter counts are exact. Each update dW = scaling * B A (out, in) is analysed through its small
r x r core (QR of B and of A^T), so a 4096 x 4096 layer never has to be formed. With `svd` the report adds
the singular values and effective rank of every update; with `compare` it adds the paper's normalized
subspace similarity phi between the A matrices of two adapters (Hu et al. 2021, section 7).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..errors import LorakitError
from .adapter import Adapter, ModuleInfo, read_adapter
from .layer import Slice

Pair = tuple[str, ModuleInfo, Slice | None]  # one A/B pair: tensor-name prefix, its module, its slice


def update_singular_values(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of scaling * B A, descending, float64, padded with zeros to r.

    Args:
        a: lora_A, (r, in).
        b: lora_B, (out, r).
        scaling: alpha / rank.
    """
    rank = a.shape[0]
    # B = Q_B R_B and A^T = Q_A R_A with orthonormal Q, so B A = Q_B (R_B R_A^T) Q_A^T: same singular values
    # as the core R_B R_A^T, which is at most (r, r).
    r_b = torch.linalg.qr(b.double(), mode="r").R  # (min(out, r), r)
    r_a = torch.linalg.qr(a.double().T, mode="r").R  # (min(in, r), r)
    s = torch.linalg.svdvals(r_b @ r_a.T) * abs(scaling)  # (min(out, in, r),)
    return torch.cat([s, s.new_zeros(rank - s.numel())])  # (r,)


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the Shannon entropy of s_i / sum(s) (Roy & Vetterli 2007); 0.0 for an all-zero update."""
    s = singular_values.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), in [0, 1].

    U are the right-singular vectors of each A (r, in): how much of the top-i directions of A1's row
    space lie in the top-j directions of A2's.
    """
    v1 = torch.linalg.svd(a1.double(), full_matrices=False).Vh[:i]  # (i, in), rows = top-i directions
    v2 = torch.linalg.svd(a2.double(), full_matrices=False).Vh[:j]  # (j, in)
    phi = float(torch.linalg.matrix_norm(v1 @ v2.T) ** 2) / min(i, j)
    return min(max(phi, 0.0), 1.0)  # rounding can leave 1 + 1e-16


def _pairs(adapter: Adapter) -> list[Pair]:
    """(name, module, slice) per A/B pair, in file order; slice is None for a whole module."""
    pairs = []
    for m in adapter.modules:
        for k, name in enumerate(m.names):
            pairs.append((name, m, None if m.slices is None else m.slices[k]))
    return pairs


def _module_report(adapter: Adapter, pair: Pair, svd: bool) -> dict[str, Any]:
    name, info, part = pair
    a = adapter.tensors[f"{name}.lora_A"]  # (r, in)
    b = adapter.tensors[f"{name}.lora_B"]  # (out_slice, r)
    scaling = info.alpha / info.rank
    s = update_singular_values(a, b, scaling)
    norm = float(torch.linalg.vector_norm(s))  # ||dW||_F = sqrt(sum s_i^2)
    if not (math.isfinite(norm) and math.isfinite(float(s.sum()))):  # finite A, B and alpha, but an absurd alpha
        raise LorakitError(f"{adapter.path}: {name}: the update alpha/r * B A overflows (alpha {info.alpha:g})")
    report: dict[str, Any] = {
        "name": name,
        "path": info.path,
        "slice": None if part is None else [part.start, part.stop],
        "in_features": info.in_features,
        "out_features": info.out_features,
        "rank": info.rank,
        "alpha": info.alpha,
        "scaling": scaling,
        "params": a.numel() + b.numel(),
        "bytes": a.numel() * a.element_size() + b.numel() * b.element_size(),
        "update_norm": norm,
    }
    if svd:
        report["singular_values"] = [float(x) for x in s]
        report["effective_rank"] = effective_rank(s)
    return report


def _compare_report(adapter: Adapter, other: Adapter) -> dict[str, Any]:
    here = [name for name, _, _ in _pairs(adapter)]
    there = [name for name, _, _ in _pairs(other)]
    modules = []
    for name in (n for n in here if n in there):
        a1, a2 = adapter.tensors[f"{name}.lora_A"], other.tensors[f"{name}.lora_A"]  # (r1, in), (r2, in)
        if a1.shape[1] != a2.shape[1]:
            raise LorakitError(
                f"{other.path}: {name} has input size {a2.shape[1]}, {adapter.path} has {a1.shape[1]}; "
                "adapters for different bases cannot be compared"
            )
        r1, r2 = a1.shape[0], a2.shape[0]
        m = min(r1, r2)
        modules.append(
            {
                "name": name,
                "rank": r1,
                "other_rank": r2,
                "phi_top": subspace_similarity(a1, a2, 1, 1),
                "phi": subspace_similarity(a1, a2, m, m),
            }
        )
    return {
        "other": str(other.path),
        "modules": modules,
        "only_here": [n for n in here if n not in there],
        "only_other": [n for n in there if n not in here],
    }


def inspect_adapter(
    path: str | os.PathLike, svd: bool = False, compare: str | os.PathLike | None = None
) -> dict[str, Any]:
    """A JSON-serializable report of an adapter file: sizes, metadata and one entry per A/B pair.

    Args:
        path: the adapter `.safetensors` file.
        svd: add each update's singular values and effective rank.
        compare: another adapter; add phi, the subspace similarity of the A matrices, per common module.
    """
    if _is_gguf(path):
        if compare is not None:
            raise LorakitError(f"{path}: --compare reads lorakit .safetensors adapters only, not GGUF")
        return inspect_gguf(path, svd)
    adapter = read_adapter(path)
    meta = adapter.metadata
    file_bytes = os.path.getsize(adapter.path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
    report: dict[str, Any] = {
        "file": str(adapter.path),
        "file_bytes": file_bytes,
        "trainable_params": adapter.trainable_params,
        "tensor_bytes": tensor_bytes,
        "header_bytes": file_bytes - tensor_bytes,  # length prefix + JSON header (metadata, offsets)
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "dropout": adapter.dropout,
        "targets": meta.get("targets", ""),
        "base_model": adapter.base_model,
        "base_class": meta.get("base_class", ""),
        "base_fingerprint": meta.get("base_fingerprint", ""),
        "base_dtype": meta.get("base_dtype", ""),
        "lorakit_version": meta.get("lorakit_version", ""),
        "format_version": int(meta["format_version"]),
        "modules": [_module_report(adapter, pair, svd) for pair in _pairs(adapter)],
    }
    if compare is not None:
        report["compare"] = _compare_report(adapter, read_adapter(compare))
    return report


def _is_gguf(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # read_adapter names what is wrong
        return False


def inspect_gguf(path: str | os.PathLike, svd: bool = False) -> dict[str, Any]:
    """inspect_adapter's report for a llama.cpp LoRA adapter GGUF file (`lorakit export --format gguf`, or
    llama.cpp's own convert_lora_to_gguf.py): one entry per `.lora_a` / `.lora_b` pair, named after the base
    tensor it adapts; alpha is the file's `adapter.lora.alpha` (0: llama.cpp scales by 1, not alpha/r)."""
    pairs, fields = _gguf_pairs(path)
    alpha = float(fields.get("adapter.lora.alpha", 0.0))
    modules = []
    for name, (a, b) in pairs.items():
        rank = a.shape[0]
        scaling = alpha / rank if alpha else 1.0
        s = update_singular_values(a, b, scaling)
        report = {
            "name": name,
            "path": name,
            "slice": None,
            "in_features": a.shape[1],
            "out_features": b.shape[0],
            "rank": rank,
            "alpha": alpha,
            "scaling": scaling,
            "params": a.numel() + b.numel(),
            "bytes": sum(_gguf_nbytes(t) for t in (a, b)),
            "update_norm": float(torch.linalg.vector_norm(s)),
        }
        if svd:
            report["singular_values"] = [float(x) for x in s]
            report["effective_rank"] = effective_rank(s)
        modules.append(report)
    ranks = [m["rank"] for m in modules]
    file_bytes = os.path.getsize(path)
    tensor_bytes = sum(m["bytes"] for m in modules)
    return {
        "file": str(path),
        "format": "gguf",
        "architecture": fields.get("general.architecture", ""),
        "file_bytes": file_bytes,
        "trainable_params": sum(m["params"] for m in modules),
        "tensor_bytes": tensor_bytes,
        "header_bytes": file_bytes - tensor_bytes,  # header, metadata, tensor infos and alignment padding
        "rank": max(set(ranks), key=ranks.count),
        "alpha": alpha,
        "dropout": float(fields.get("lorakit.dropout", 0.0)),
        "targets": fields.get("lorakit.targets", ""),
        "base_model": fields.get("lorakit.base_model", ""),
        "base_class": "",
        "base_fingerprint": fields.get("lorakit.base_fingerprint", ""),
        "base_dtype": "",
        "lorakit_version": fields.get("lorakit.version", ""),
        "format_version": int(fields.get("GGUF.version", 0)),
        "modules": modules,
    }


def _gguf_nbytes(t: torch.Tensor) -> int:
    return int(getattr(t, "gguf_nbytes", t.numel() * t.element_size()))


def _gguf_pairs(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """{base tensor: (A (r, in), B (out, r)) as float32} and the file's scalar keys, checked to be a LoRA adapter."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except Exception as e:  # a truncated or corrupt file: gguf raises ValueError, struct.error, ...
        raise LorakitError(f"{path}: not a readable GGUF file ({_first_line(e)})") from None
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        string = field.types[0] == GGUFValueType.STRING
        fields[key] = bytes(value).decode("utf-8", "replace") if string else value.tolist()[0]
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        kind = fields.get("general.type")
        raise LorakitError(f"{path}: a GGUF file that is not a LoRA adapter (general.type {kind!r})")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, dot, kind = t.name.rpartition(".")
        if kind not in ("lora_a", "lora_b"):
            continue  # llama.cpp skips norm vectors as well
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne -> numpy order
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            array = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            array = dequantize(t.data, t.tensor_type).reshape(shape)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        tensor.gguf_nbytes = int(t.n_bytes)
        found.setdefault(base, {})[kind] = tensor
    pairs = {}
    for base, kinds in found.items():
        if set(kinds) != {"lora_a", "lora_b"}:
            raise LorakitError(f"{path}: {base} has only {', '.join(kinds)}; expected lora_a and lora_b")
        a, b = kinds["lora_a"], kinds["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LorakitError(f"{path}: {base} has lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)}")
        pairs[base] = (a, b)
    if not pairs:
        raise LorakitError(f"{path}: holds no LoRA tensors")
    return pairs, fields


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = [
    "inspect_adapter",
    "inspect_gguf",
    "update_singular_values",
    "effective_rank",
    "subspace_similarity",
]
