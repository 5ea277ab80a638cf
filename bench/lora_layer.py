"""What a LoRA layer adds to one projection: forward + backward of a single layer, lorakit vs PEFT vs the base.

A training step on a whole model (`layer_speed.py`) hides the adapter inside noise of a few percent; this
script isolates it. Each case is one real projection shape of the benchmarked models with a frozen base
(random weights), batch x length tokens, fp32; a call runs the forward and the backward to the layer's input
(what every LoRA layer inside a network does), plus the A/B gradients for the LoRA systems. The systems
alternate, the order rotating every round; the table reports median milliseconds per call and the overhead
over the bare base, and PEFT's overhead divided by lorakit's.

    python bench/lora_layer.py --quick                       # a smoke test: tiny shapes, one round
    python bench/lora_layer.py --markdown --json bench/results/lora_layer.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import common
import torch
from torch import nn

# name: (in, out, GPT-2 Conv1D?, lorakit slices or None for the whole output)
CASES: dict[str, tuple[int, int, bool, str | None]] = {
    "gpt2-124m c_attn": (768, 2304, True, None),
    "gpt2-124m c_attn q,v": (768, 2304, True, "q,v"),
    "gpt2-355m c_attn": (1024, 3072, True, None),
    "gpt2-355m c_attn q,v": (1024, 3072, True, "q,v"),
    "smollm2 q_proj": (576, 576, False, None),
    "smollm2 v_proj": (576, 192, False, None),
}
QUICK_CASES = {
    "quick c_attn": (64, 192, True, None),
    "quick c_attn q,v": (64, 192, True, "q,v"),
    "quick q_proj": (64, 64, False, None),
}


class Holder(nn.Module):
    """A one-module model, so that PEFT can find the projection by name."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


def systems_for(case: tuple[int, int, bool, str | None], args: argparse.Namespace) -> dict[str, nn.Module]:
    """The bare base, PEFT LoRA on the whole projection (not for q,v slices: PEFT has none) and lorakit LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from lorakit.lora.layer import LoRALayer, Slice

    n_in, n_out, conv, slices = case
    torch.manual_seed(args.seed)
    base = Conv1D(n_out, n_in) if conv else nn.Linear(n_in, n_out, bias=False)  # Llama projections have no bias
    base.requires_grad_(False)
    name = "c_attn" if conv else "proj"
    third = n_out // 3
    chosen = [Slice("q", 0, third), Slice("v", 2 * third, n_out)] if slices == "q,v" else None
    ours = LoRALayer(base, rank=args.rank, alpha=args.alpha, dropout=0.0, slices=chosen)
    systems: dict[str, nn.Module] = {"base": base}
    if slices is None:
        config = LoraConfig(
            r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=[name], fan_in_fan_out=conv
        )
        systems["peft"] = get_peft_model(Holder(name, base), config)
    systems["lorakit"] = ours
    common.random_B([ours], args.seed + 1)  # non-zero B, the same for both libraries where both run
    if "peft" in systems:
        layer = getattr(systems["peft"].base_model.model, name)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(ours.lora_A[0])
            layer.lora_B["default"].weight.copy_(ours.lora_B[0])
    return systems


def make_call(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        xi = x.detach().requires_grad_()
        module(xi).backward(grad)
        for p in module.parameters():
            p.grad = None
        return xi.grad

    return call


def bench_case(label: str, case: tuple[int, int, bool, str | None], args: argparse.Namespace) -> list[dict[str, Any]]:
    systems = systems_for(case, args)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.length, case[0], generator=g)
    grad = torch.randn(args.batch, args.length, case[1], generator=g)
    calls = {name: make_call(module, x, grad) for name, module in systems.items()}
    if "peft" in calls:  # the same A, B and input: the same input gradient
        diff = float((calls["peft"]() - calls["lorakit"]()).abs().max())
        if diff > 1e-4:
            raise SystemExit(f"{label}: PEFT and lorakit input gradients differ by {diff:.3g}")
    times = common.alternate(calls, args.rounds, args.warmup, "cpu", args.repeat, args.quiet, args.max_rounds)
    stats = {name: common.summarize(t) for name, t in times.items()}
    base = stats["base"]["median_s"]
    rows = {
        name: {
            "case": label,
            "system": name,
            "median_ms": s["median_s"] * 1000,
            "spread": s["spread"],
            "overhead_ms": (s["median_s"] - base) * 1000,
            "overhead_vs_base": s["median_s"] / base - 1,
        }
        for name, s in stats.items()
    }
    if "peft" in rows and rows["lorakit"]["overhead_ms"] > 0:
        rows["lorakit"]["peft_overhead_over_lorakit"] = rows["peft"]["overhead_ms"] / rows["lorakit"]["overhead_ms"]
    return list(rows.values())


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, list[str], list[list[str]]]:
    columns = ["projection", "system", "ms per call", "+-", "overhead ms", "overhead / base"]
    columns += ["PEFT overhead / lorakit's"]
    rows = [
        [
            r["case"],
            r["system"],
            f"{r['median_ms']:.2f}",
            f"{r['spread'] * 100:.1f}%",
            f"{r['overhead_ms']:.2f}" if r["system"] != "base" else "-",
            f"{r['overhead_vs_base'] * 100:.1f}%" if r["system"] != "base" else "-",
            f"{r['peft_overhead_over_lorakit']:.2f}" if "peft_overhead_over_lorakit" in r else "-",
        ]
        for r in results
    ]
    title = (
        f"One frozen projection + LoRA r={args.rank}: forward and backward (to the input and A/B), "
        f"{args.batch} x {args.length} tokens, fp32; median over {args.rounds} alternating rounds, +- half the IQR"
    )
    return title, columns, rows


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    common.lora_args(p, targets=False)
    common.timing_args(p, rounds=30, warmup=5, repeat=0)
    args = common.parse(p, argv, quick=dict(common.QUICK_TIMING, batch=2, length=16))
    info = common.start(args)
    results = []
    for label, case in (QUICK_CASES if args.quick else CASES).items():
        results += bench_case(label, case, args)
    common.finish(args, info, *table(results, args), results)


if __name__ == "__main__":
    main()
