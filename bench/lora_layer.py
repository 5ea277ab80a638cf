"""What a LoRA layer adds to one projection: forward + backward of a single layer, lorakit vs PEFT vs the base.

A training step on a whole model (`layer_speed.py`) hides the adapter inside noise of a few percent; this
script isolates it. Each case is one real projection shape of the benchmarked models with a frozen base
(random weights), batch x length tokens, fp32; a call runs the forward and the backward to the layer's input
(what every LoRA layer inside a network does), plus the A/B gradients for the LoRA systems. The systems
alternate, the order rotating every round; the table reports median milliseconds per call and the overhead
over the bare base, and PEFT's overhead divided by lorakit's.

    python bench/lora_layer.py --quick
    python bench/lora_layer.py --markdown --json bench/results/lora_layer.json
"""

from __future__ import annotations

import argparse
import sys
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
QUICK = {
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
    chosen = None
    if slices == "q,v":
        third = n_out // 3
        chosen = [Slice("q", 0, third), Slice("v", 2 * third, n_out)]
    ours = LoRALayer(base, rank=args.rank, alpha=args.alpha, dropout=0.0, slices=chosen)
    systems: dict[str, nn.Module] = {"base": base}
    if slices is None:
        config = LoraConfig(
            r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=[name], fan_in_fan_out=conv
        )
        systems["peft"] = get_peft_model(Holder(name, base), config)
    systems["lorakit"] = ours
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():  # non-zero B, the same for both libraries where both run
        for b in ours.lora_B:
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        if "peft" in systems:
            layer = getattr(systems["peft"].base_model.model, name)
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
    times = common.alternate(calls, args.rounds, args.warmup, "cpu", repeat=0, quiet=args.quiet)
    stats = {name: common.summarize(t) for name, t in times.items()}
    base = stats["base"]["median_s"]
    rows = []
    for name, s in stats.items():
        rows.append(
            {
                "case": label,
                "system": name,
                "median_ms": s["median_s"] * 1000,
                "spread": s["spread"],
                "overhead_ms": (s["median_s"] - base) * 1000,
                "overhead_vs_base": s["median_s"] / base - 1,
            }
        )
    by = {r["system"]: r for r in rows}
    if "peft" in by and by["lorakit"]["overhead_ms"] > 0:
        by["lorakit"]["peft_overhead_over_lorakit"] = by["peft"]["overhead_ms"] / by["lorakit"]["overhead_ms"]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--rounds", type=int, default=30, help="quiet timed calls wanted per system")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quiet", type=float, help="see layer_speed.py (default: what torch's threads leave free)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds: a smoke test")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet is None:
        args.quiet = common.quiet_share()
    cases = CASES
    if args.quick:
        cases, args.rounds, args.warmup = QUICK, 3, 1
    info = common.machine("cpu")
    print(f"machine: {common.describe(info)}", flush=True)
    results = []
    for label, case in cases.items():
        results += bench_case(label, case, args)
    columns = [
        "projection",
        "system",
        "ms per call",
        "+-",
        "overhead ms",
        "overhead / base",
        "PEFT overhead / lorakit's",
    ]
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
    common.print_table(title, columns, rows, markdown=args.markdown)
    print(f"machine: {common.describe(info)}")
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
    common.write_json(args.json, {"machine": info, "settings": settings, "command": sys.argv, "results": results})


if __name__ == "__main__":
    main()
