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
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from ..errors import LorakitError
from .adapter import Adapter, ModuleInfo, read_adapter
from .layer import Slice

TOP_SINGULAR_VALUES = 4  # how many singular values the table shows per module
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


def _shape(module: dict[str, Any]) -> str:
    """`in×out`, plus the slice as `q [0:1024)` for a fused projection."""
    shape = f"{module['in_features']}×{module['out_features']}"
    if module["slice"] is None:
        return shape
    start, stop = module["slice"]
    part = module["name"][len(module["path"]) + 1 :]
    return f"{shape} {part} [{start}:{stop})"


def _modules_table(report: dict[str, Any]) -> Table:
    modules = report["modules"]
    with_svd = bool(modules) and "singular_values" in modules[0]
    table = Table(title=escape(report["file"]), show_footer=True)
    # On a narrow terminal module paths fold and shapes wrap; the numbers never do.
    table.add_column("module", footer="total", overflow="fold")
    table.add_column("in×out")
    for label in ("r", "α", "α/r"):
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("params", justify="right", footer=f"{report['trainable_params']:,}", no_wrap=True)
    table.add_column("bytes", justify="right", footer=f"{report['tensor_bytes']:,}", no_wrap=True)
    table.add_column("‖ΔW‖", justify="right", no_wrap=True)
    if with_svd:
        table.add_column(f"top σ (of {report['rank']})")
        table.add_column("eff. rank", justify="right")
    for m in modules:
        row = [
            escape(m["name"]),
            escape(_shape(m)),
            str(m["rank"]),
            f"{m['alpha']:g}",
            f"{m['scaling']:.4g}",
            f"{m['params']:,}",
            f"{m['bytes']:,}",
            f"{m['update_norm']:.4g}",
        ]
        if with_svd:
            row.append(" ".join(f"{s:.3g}" for s in m["singular_values"][:TOP_SINGULAR_VALUES]))
            row.append(f"{m['effective_rank']:.2f}")
        table.add_row(*row)
    return table


def _metadata_panel(report: dict[str, Any]) -> Panel:
    scaling = report["alpha"] / report["rank"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("trainable parameters", f"{report['trainable_params']:,}"),
        ("file size", f"{report['file_bytes']:,} bytes ({decimal(report['file_bytes'])})"),
        ("header", f"{report['header_bytes']:,} bytes (metadata; tensors {report['tensor_bytes']:,} bytes)"),
        ("rank / alpha", f"{report['rank']} / {report['alpha']:g} (scaling {scaling:.4g})"),
        ("targets", report["targets"] or "-"),
        ("dropout", f"{report['dropout']:g}"),
        ("base model", report["base_model"] or "-"),
        ("base class", report["base_class"] or "-"),
        ("base fingerprint", report["base_fingerprint"] or "-"),
        ("base dtype", report["base_dtype"] or "-"),
        ("lorakit / format", f"{report['lorakit_version'] or '?'} / {report['format_version']}"),
    ]
    for key, value in rows:
        grid.add_row(key, escape(str(value)))
    return Panel(grid, title="adapter", expand=False)


def _compare_table(report: dict[str, Any]) -> Table:
    compare = report["compare"]
    table = Table(title=f"subspace similarity φ of A: {escape(report['file'])} vs {escape(compare['other'])}")
    table.add_column("module", overflow="fold", min_width=12)
    table.add_column("rank", justify="right")
    table.add_column("other rank", justify="right")
    table.add_column("φ top (1, 1)", justify="right")
    table.add_column("φ (m, m), m = min rank", justify="right")
    for m in compare["modules"]:
        phis = f"{m['phi_top']:.3f}", f"{m['phi']:.3f}"
        table.add_row(escape(m["name"]), str(m["rank"]), str(m["other_rank"]), *phis)
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    """Print an inspect_adapter report as rich tables.

    Args:
        report: what inspect_adapter returned.
        console: where to print.
    """
    console.print(_modules_table(report))
    console.print(_metadata_panel(report))
    if "compare" not in report:
        return
    compare = report["compare"]
    console.print(_compare_table(report))
    if not compare["modules"]:
        console.print("no module is adapted in both files")
    for where, names in ((report["file"], compare["only_here"]), (compare["other"], compare["only_other"])):
        if names:
            console.print(f"only in {escape(where)}: {escape(', '.join(names))}")


__all__ = [
    "inspect_adapter",
    "print_report",
    "update_singular_values",
    "effective_rank",
    "subspace_similarity",
]
