"""The LoRA layer: a frozen base projection plus `scaling * B(A(dropout(x)))` (Hu et al. 2021, eq. 3).

One class wraps `nn.Linear`, transformers' `Conv1D` (weight stored (in, out)) and bitsandbytes'
`Linear8bitLt` / `Linear4bit`. A fused projection such as GPT-2's `c_attn` (q, k and v stacked on the output axis) can
carry one A/B pair per output slice, so `q,v` adapts those two slices and leaves k bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError
from .base import base_shape, four_bit_type, is_conv1d, is_linear_like, is_quantized, quantized_bits
from .fingerprint import DIGEST, base_digest, base_fingerprint, fingerprint_all


@dataclass(frozen=True)
class Slice:
    """An output range of the base projection adapted by one A/B pair; `name` is None for the whole output."""

    name: str | None
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


# One adapter of a layer's bank: its A list (each (r, in)), B list (each (out_slice, r)), scaling and output ranges.
BankEntry = tuple[list[torch.Tensor], list[torch.Tensor], float, tuple[tuple[int, int], ...]]


def all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in `t`. A float32 sum is finite when every element is (inf and NaN propagate) and far
    cheaper than an elementwise test; only a sum that overflows needs the elementwise confirmation."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def _low_rank_grads(g: torch.Tensor, b: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(g B)^T` (r, tokens) and `(g^T low)^T` (r, out): the backward's two products of the output gradient g
    (tokens, out) with the r-wide B (out, r) and low-rank activations `low` (tokens, r).

    Each is formed with r rows rather than r columns: at small r the CPU's GEMM runs `g @ B`, (tokens, out) x
    (out, r), several times slower than the same numbers as (r, out) x (out, tokens), and likewise `g^T @ low`
    against (r, tokens) x (tokens, out) (bench/layer_speed.py measures it). Callers transpose the results back
    as they need them.
    """
    return b.t() @ g.t(), low.t() @ g


class _AddLowRankToSlices(torch.autograd.Function):
    """`out` with `a_i B_i^T` added to output columns `ranges[i]` (a_i: the i-th group of r columns of `a`),
    other columns copied bit for bit.

    Autograd over `out[..., start:stop] += F.linear(a_i, B_i)` costs more twice over: its backward (CopySlices)
    copies the whole gradient once per slice (a q,v layer's step cost more than one adapting all of `c_attn`), and
    each (..., out_slice) product is written out before it is added. Here one addmm per slice accumulates the
    product straight into the output, and the backward reads the gradient's slices as views. With mixed dtypes
    (autocast, a bf16 base) each product is formed in the dtype F.linear would use, then cast and added.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, a: torch.Tensor, ranges: tuple[tuple[int, int], ...], *bs: torch.Tensor):
        rank = bs[0].shape[1]
        a2 = a.reshape(-1, a.shape[-1])  # (tokens, n_slices * r)
        result = out.reshape(-1, out.shape[-1]).clone()  # (tokens, out)
        dtype = result.dtype
        for i, (start, stop) in enumerate(ranges):
            a_i, b = a2[:, i * rank : (i + 1) * rank], bs[i]
            if a_i.dtype == b.dtype == result.dtype:
                result[:, start:stop].addmm_(a_i, b.t())
            else:
                product = F.linear(a_i, b)  # (tokens, out_slice)
                dtype = product.dtype
                result[:, start:stop] += product.to(result.dtype)
        ctx.ranges, ctx.rank, ctx.dtype, ctx.a_shape = ranges, rank, dtype, a.shape
        ctx.save_for_backward(a2, *bs)
        return result.view(out.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a2, *bs = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        r, dtype = ctx.rank, ctx.dtype
        grad_a, grad_bs = [], []
        for i, (start, stop) in enumerate(ctx.ranges):
            g = grad2[:, start:stop].to(dtype)  # (tokens, out_slice), a view when no cast is needed
            grad_a_t, grad_b_t = _low_rank_grads(g, bs[i].to(dtype), a2[:, i * r : (i + 1) * r].to(dtype))
            grad_a.append(grad_a_t.t())  # (tokens, r)
            grad_bs.append(grad_b_t.t().to(bs[i].dtype))  # (out_slice, r)
        return grad, torch.cat(grad_a, dim=1).to(a2.dtype).view(ctx.a_shape), None, *grad_bs


class _LoRALinear(torch.autograd.Function):
    """A frozen dense base plus its low-rank updates, `y = base(x) + scaling * (h A_i^T) B_i^T` on each output
    range i (h: the LoRA input, `x` itself or its dropout), with the backward written by hand.

    What autograd over the same ops would do, with less memory traffic: the products go straight into the base
    output (addmm), and the input gradient `g W + (g B) A`
    is formed in one buffer instead of two that autograd then adds; the r-wide products with the gradient are
    formed as `_low_rank_grads` forms them. Only for plain nn.Linear / Conv1D bases with frozen weights, one
    dtype throughout and no autocast (`LoRALayer._fusable`); equal to autograd over the same ops up to float
    rounding. The forward adds `scaling * low @ B^T` in one addmm: bit-identical to autograd's separate multiply
    and add only when scaling (alpha/r) is a power of two, which multiplies exactly; otherwise within one rounding.
    """

    @staticmethod
    def forward(ctx, x, h, weight, bias, scaling, conv, ranges, *params):
        n = len(ranges)
        a_list, b_list = params[:n], params[n:]
        rank = a_list[0].shape[0]
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        h2 = x2 if h is x else h.reshape(-1, h.shape[-1])
        a = torch.cat(a_list) if n > 1 else a_list[0]  # (n r, in)
        out = torch.addmm(bias, x2, weight) if conv else F.linear(x2, weight, bias)  # as the base computes it
        low = h2 @ a.t()  # (tokens, n r)
        for i, (start, stop) in enumerate(ranges):
            out[:, start:stop].addmm_(low[:, i * rank : (i + 1) * rank], b_list[i].t(), alpha=scaling)
        ctx.shared, ctx.conv, ctx.scaling, ctx.ranges, ctx.rank = h is x, conv, scaling, ranges, rank
        ctx.x_shape, ctx.h_shape = x.shape, h.shape
        ctx.save_for_backward(h2, weight, a, low, *b_list)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        h2, weight, a, low, *b_list = ctx.saved_tensors
        r, n = ctx.rank, len(ctx.ranges)
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_low_t, grad_b = [], []
        for i, (start, stop) in enumerate(ctx.ranges):
            grad_low_i, grad_b_t = _low_rank_grads(g[:, start:stop], b_list[i], low[:, i * r : (i + 1) * r])
            grad_low_t.append(grad_low_i)  # (r, tokens)
            grad_b.append(grad_b_t.mul_(ctx.scaling).t())  # (out_i, r)
        grad_low_t = (torch.cat(grad_low_t) if n > 1 else grad_low_t[0]).mul_(ctx.scaling)  # (n r, tokens)
        grad_a = grad_low_t @ h2  # (n r, in)
        grad_x = grad_h = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = g @ (weight.t() if ctx.conv else weight)  # (tokens, in)
            if ctx.shared:
                grad_x.addmm_(grad_low_t.t(), a)
            else:
                grad_h = (grad_low_t.t() @ a).view(ctx.h_shape)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_h, None, None, None, None, None, *grad_a.split(r), *grad_b


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class LoRALayer(nn.Module):
    """A frozen linear-like `base` plus a trainable low-rank update on one or more output slices.

    Args:
        base: `nn.Linear`, transformers `Conv1D` or bitsandbytes `Linear8bitLt`; frozen in place.
        rank: r, the inner dimension of each A/B pair.
        alpha: the update is scaled by alpha / rank.
        dropout: dropout probability on the input of the low-rank path only.
        slices: output ranges to adapt, each with its own A/B; None adapts the whole output.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        slices: list[Slice] | None = None,
    ) -> None:
        super().__init__()
        if not is_linear_like(base):
            expected = "nn.Linear, Conv1D, Linear8bitLt or Linear4bit"
            raise LorakitError(f"cannot wrap {type(base).__name__}: expected {expected}")
        if rank < 1:
            raise LorakitError(f"rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise LorakitError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = base_shape(base)
        self.slices = tuple(slices) if slices else (Slice(None, 0, self.out_features),)
        for s in self.slices:
            if not 0 <= s.start < s.stop <= self.out_features:
                raise LorakitError(f"slice {s.name} [{s.start}, {s.stop}) outside output size {self.out_features}")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # no work when p = 0
        device = base.weight.device
        # LoRA parameters stay fp32 whatever the base dtype.
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(self.rank, self.in_features, device=device)) for _ in self.slices]
        )  # each (r, in)
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.empty(s.size, self.rank, device=device)) for s in self.slices]
        )  # each (out_slice, r)
        self.merged = False
        self.enabled = True
        # Several adapters at once (lora/multi.py): per adapter (A list, B list, scaling, output ranges), or None
        # where it leaves this module alone; and which adapter each batch row takes (-1: none).
        self.bank: list[BankEntry | None] | None = None
        self.row_adapter: torch.Tensor | int | None = None
        self.reset_parameters()
        self.train(base.training)  # a layer added to a model in eval mode must not start dropping out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A Kaiming-uniform (as nn.Linear's default), B zero: the wrapped model starts as the base."""
        for a, b in zip(self.lora_A, self.lora_B):
            if a.device.type != "meta":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)

    @property
    def is_full(self) -> bool:
        """One A/B pair over the whole output (no slices)."""
        return len(self.slices) == 1 and self.slices[0].name is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base(x)
        if self.bank is not None:
            return self._forward_rows(x)
        ranges = tuple((s.start, s.stop) for s in self.slices) if not self.is_full else ((0, self.out_features),)
        if self._fusable(x):
            base = self.base
            conv = is_conv1d(base)
            params = (*self.lora_A, *self.lora_B)
            return _LoRALinear.apply(x, self.dropout(x), base.weight, base.bias, self.scaling, conv, ranges, *params)
        out = self.base(x)  # (..., out)
        h = self.dropout(x).to(self.lora_A[0].dtype)  # (..., in), fp32 unless autocast says otherwise
        a = F.linear(h, torch.cat(list(self.lora_A))) * self.scaling  # (..., n_slices * r), one matmul
        if self.is_full:
            return out + F.linear(a, self.lora_B[0]).to(out.dtype)
        return _AddLowRankToSlices.apply(out, a, ranges, *self.lora_B)

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The base output, plus on each batch row the update of the bank's adapter that `row_adapter` names."""
        rows = self.row_adapter
        if rows is None:
            raise LorakitError("this model holds several adapters; choose each row's with adapter_per_row")
        if isinstance(rows, int):
            rows = torch.full((x.shape[0],), rows, device=x.device)
        elif x.shape[0] != rows.numel():  # beam search repeats each row in place
            if x.shape[0] % rows.numel():
                raise LorakitError(f"{rows.numel()} row adapters for a batch of {x.shape[0]} rows")
            rows = rows.to(x.device).repeat_interleave(x.shape[0] // rows.numel())
        out = self.base(x)  # (batch, ..., out)
        for j, entry in enumerate(self.bank or []):
            picked = (rows == j).nonzero().flatten().to(x.device)
            if entry is None or picked.numel() == 0:
                continue
            a_list, b_list, scaling, ranges = entry
            r = a_list[0].shape[0]
            h = self.dropout(x[picked]).to(a_list[0].dtype)  # (n, ..., in)
            low = F.linear(h, torch.cat(a_list)) * scaling  # (n, ..., n_slices * r)
            part = out[picked]
            for i, (start, stop) in enumerate(ranges):
                part[..., start:stop] += F.linear(low[..., i * r : (i + 1) * r], b_list[i]).to(out.dtype)
            out[picked] = part
        return out

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether `_LoRALinear` computes this call: a plain frozen nn.Linear / Conv1D base without hooks, the
        input, base and LoRA in one dtype, no autocast, not under torch.compile. Otherwise (8-bit or bf16 bases
        under fp32 LoRA, autocast, a compiled forward) autograd runs over the same ops."""
        base = self.base
        weight, bias = base.weight, getattr(base, "bias", None)
        return (
            (type(base) is nn.Linear or is_conv1d(base))
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
            and x.dtype == weight.dtype == self.lora_A[0].dtype
            and not base._forward_hooks
            and not base._forward_pre_hooks
            and not _autocast_on(x.device.type)
            and not torch.compiler.is_compiling()  # compiled: plain ops, which the compiler fuses (no graph break)
        )

    def delta_weight(self, index: int) -> torch.Tensor:
        """scaling * B A for slice `index`, fp32, shape (out_slice, in)."""
        a, b = self.lora_A[index], self.lora_B[index]
        return (b.detach().float() @ a.detach().float()) * self.scaling

    def base_fingerprint(self) -> tuple[str, list[float]]:
        """(digest, sketch) of the unmerged base weight (remembered from before a merge changed it)."""
        if self.merged:
            return base_fingerprint(self.base, refuse_new=True)
        return base_fingerprint(self.base)

    def base_digest(self, algorithm: str = DIGEST) -> str:
        """The unmerged base weight's digest by `algorithm` (the remembered one, or computed for an old adapter)."""
        if algorithm == DIGEST:
            return self.base_fingerprint()[0]
        if self.merged:
            raise LorakitError("cannot fingerprint a merged layer; unmerge it first")
        return base_digest(self.base, algorithm)

    @staticmethod
    def fingerprint_all(layers: Iterable[LoRALayer]) -> None:
        """Compute the base fingerprints of many layers at once (hashing is the slow part of saving or checking
        an adapter; it runs on all threads)."""
        fingerprint_all([layer.base for layer in layers if not layer.merged])

    @property
    def base_dtype(self) -> str:
        """The base weight's dtype (float32, int8, ...); `nf4` / `fp4` for a 4-bit base."""
        return four_bit_type(self.base) or str(self.base.weight.dtype).removeprefix("torch.")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (fp32 arithmetic, finite-checked). Idempotent."""
        if self.merged:
            return
        base_fingerprint(self.base)  # remember the pristine base before changing it
        self._add_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again. Idempotent."""
        if not self.merged:
            return
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        if is_quantized(self.base):
            raise LorakitError(
                f"cannot merge into a quantized ({quantized_bits(self.base)}) base: reload the base in full precision "
                "(`lorakit merge` does this) and merge there"
            )
        weight = self.base.weight
        conv = is_conv1d(self.base)
        updates = []
        for i, s in enumerate(self.slices):
            # In the weight's own layout: Conv1D stores (in, out), so its slice is a block of columns and the
            # update is (B A)^T = A^T B^T; walking a transposed view instead costs several times more.
            part = weight[:, s.start : s.stop] if conv else weight[s.start : s.stop]
            a = self.lora_A[i].detach().float().to(weight.device) * (sign * self.scaling)  # (r, in)
            b = self.lora_B[i].detach().float().to(weight.device)  # (out_s, r)
            new = (part.float() + (a.T @ b.T if conv else b @ a)).to(weight.dtype)
            if not all_finite(new):
                raise LorakitError(f"merging slice {s.name or 'all'} gives non-finite weights; adapter is corrupt")
            updates.append((part, new))
        for part, new in updates:  # write only once every slice checked out
            part.copy_(new)

    def extra_repr(self) -> str:
        names = ",".join(s.name or "all" for s in self.slices)
        return (
            f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout_p:g}, slices={names}, merged={self.merged}"
        )
