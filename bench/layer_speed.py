"""One training step: lorakit LoRA vs PEFT LoRA vs full fine-tuning vs the frozen-base floor.

All systems run in one process on the same model weights, batch, sequence length, precision and seed,
alternating (the order rotates every round); the table reports the median step time. Peak memory is measured
per system in a fresh child process that runs only that system.

Systems:
  floor       every parameter frozen, but the embeddings' output requires grad, so backward still runs
              through every block: forward + backward, no optimizer. The cost LoRA cannot go below.
  full        full fine-tuning: every parameter trains (AdamW).
  peft        PEFT LoRA: GPT-2 on all of `c_attn`; Llama on q_proj, v_proj.
  lorakit     lorakit LoRA on the same modules as PEFT (GPT-2 `c_attn`, Llama `q,v`).
  lorakit-qv  GPT-2 only: lorakit on the q and v slices of `c_attn` (the paper's setting; k untouched).

    python bench/layer_speed.py --quick                      # a smoke test: tiny GPT-2, one round
    python bench/layer_speed.py --rounds 20 --max-rounds 30 --markdown --json bench/results/layer_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
from collections.abc import Callable
from typing import Any

import common
import torch
from torch import nn

# system: (label, targets on GPT-2, targets on Llama)
SYSTEMS = {
    "floor": ("frozen-base floor", "-", "-"),
    "full": ("full fine-tuning", "all", "all"),
    "peft": ("PEFT LoRA", "c_attn", "q_proj,v_proj"),
    "lorakit": ("lorakit LoRA", "c_attn", "q,v"),
    "lorakit-qv": ("lorakit LoRA q,v slices", "c_attn q,v slices", None),  # GPT-2 only
}


def prepare(system: str, base: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """The model of one system (a copy of `base`) in train mode and its AdamW (None for the floor)."""
    gpt2 = common.is_gpt2(base)
    if system == "full":
        model = copy.deepcopy(base).requires_grad_(True)  # its own weights: the optimizer changes them
    else:
        model = common.shared_copy(base).requires_grad_(False)  # frozen weights shared with the other systems
    torch.manual_seed(args.seed)  # the same A initialization for every LoRA system
    if system == "floor":
        # Gradients flow from the loss back to the embeddings' output: every block runs its backward.
        model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, out: out.requires_grad_())
    elif system == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            target_modules=["c_attn"] if gpt2 else ["q_proj", "v_proj"],
            fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores its weight (in, out)
        )
        model = get_peft_model(model, config)
    elif system in ("lorakit", "lorakit-qv"):
        from lorakit import add_lora

        add_lora(model, "q,v" if system == "lorakit-qv" or not gpt2 else "c_attn", rank=args.rank, alpha=args.alpha)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4) if params else None


def make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, ids: torch.Tensor, args: argparse.Namespace
) -> Callable[[], float]:
    """One training step: forward with the LM loss, backward, AdamW step, grads cleared; returns the loss."""
    device_type = ids.device.type

    def step() -> float:
        autocast = (
            torch.autocast(device_type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
        )
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one system's training steps, in this (fresh) process."""
    # Every child imports the same modules, whichever system it runs, so that their baselines compare.
    import peft  # noqa: F401

    from lorakit import add_lora  # noqa: F401

    base = common.build_model(args.models, args.seed, args.device)
    model, optimizer = prepare(args.child, base, args)
    del base
    gc.collect()
    ids = common.random_ids(model.config.vocab_size, args.batch, args.length, args.seed, args.device)
    step = make_step(model, optimizer, ids, args)
    before = common.current_memory_mb(args.device)  # the model, before any step
    step()  # allocates grads and AdamW's state (they stay) and whatever torch initializes lazily
    common.reset_peak_memory(args.device)  # the peak below still counts what the first step left resident
    for _ in range(args.memory_steps):
        step()
    return {"system": args.child, "peak_mb": common.peak_memory_mb(args.device), "before_mb": before}


def child_args(args: argparse.Namespace, model: str, system: str) -> list[str]:
    """The command line that makes a child process measure one system like this process times it."""
    out = ["--models", model, "--device", args.device, "--batch", str(args.batch), "--length", str(args.length)]
    out += ["--rank", str(args.rank), "--alpha", str(args.alpha), "--seed", str(args.seed)]
    out += ["--precision", args.precision, "--memory-steps", str(args.memory_steps), "--child", system]
    return [*out, "--threads", str(args.threads)] if args.threads else out


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every system on one model, then measure each one's peak memory in a child process."""
    base = common.build_model(name, args.seed, args.device)
    ids = common.random_ids(base.config.vocab_size, args.batch, args.length, args.seed, args.device)
    column = 1 if common.is_gpt2(base) else 2
    systems = [s for s in SYSTEMS if s in args.systems and SYSTEMS[s][column] is not None]
    steps, counts, first_loss = {}, {}, {}
    for system in systems:
        model, optimizer = prepare(system, base, args)
        counts[system] = common.param_counts(model)
        steps[system] = make_step(model, optimizer, ids, args)
        first_loss[system] = steps[system]()  # the first warmup step; the same weights give the same loss
    frozen_total = counts[systems[0]][1] - counts[systems[0]][0]
    print(
        f"{name}: {frozen_total / 1e6:.1f}M parameters; first-step losses agree to "
        f"{max(first_loss.values()) - min(first_loss.values()):.2g} "
        f"({', '.join(f'{s} {v:.4f}' for s, v in first_loss.items())})",
        flush=True,
    )
    warmup = max(0, args.warmup - 1)
    times = common.alternate(steps, args.rounds, warmup, args.device, args.repeat, args.quiet, args.max_rounds)
    del steps, base
    gc.collect()
    memory = {}
    if not args.no_memory:
        memory = {s: common.run_child(__file__, child_args(args, name, s)) for s in systems}
    results = []
    for system in systems:
        stats = common.summarize(times[system])
        results.append(
            {
                "model": name,
                "system": system,
                "label": SYSTEMS[system][0],
                "targets": SYSTEMS[system][column],
                "trainable_params": counts[system][0],
                "total_params": counts[system][1],
                **stats,
                "tokens_per_s": args.batch * args.length / stats["median_s"],
                "first_loss": first_loss[system],
                **times[system],
                **{k: v for k, v in memory.get(system, {}).items() if k != "system"},
            }
        )
    by_system = {r["system"]: r for r in results}
    for r in results:
        for ref in ("floor", "peft", "full"):
            if ref in by_system:
                r.update(common.ratios(times, r["system"], ref, args.quiet))
                r[f"vs_{ref}_of_medians"] = r["median_s"] / by_system[ref]["median_s"]
        if "peft" in by_system and "peak_mb" in r:
            r["peak_vs_peft"] = r["peak_mb"] / by_system["peft"]["peak_mb"]
    return results


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, list[str], list[list[str]]]:
    columns = ["model", "system", "targets", "trainable", "step ms", "+-", "quiet", "tokens/s"]
    columns += ["/ floor", "/ PEFT", "/ full", "CPU / floor", "CPU / PEFT", "peak MiB", "+ over model"]
    ratio_keys = ("vs_floor", "vs_peft", "vs_full", "vs_floor_cpu", "vs_peft_cpu")
    rows = [
        [
            r["model"],
            r["label"],
            r["targets"],
            f"{r['trainable_params']:,}",
            f"{r['median_s'] * 1000:.0f}",
            f"{r['spread'] * 100:.1f}%",
            f"{r['quiet_calls']}/{r['calls']}",
            f"{r['tokens_per_s']:.0f}",
            *(f"{r[k]:.3f}" if k in r else "-" for k in ratio_keys),
            f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-",
            f"{r['peak_mb'] - r['before_mb']:.0f}" if "peak_mb" in r else "-",
        ]
        for r in results
    ]
    title = (
        f"Training step, batch {args.batch} x {args.length} tokens, {args.precision}, LoRA r={args.rank} "
        f"alpha={args.alpha:g}; {args.warmup} warmup steps, then {common.how_timed(args.quiet)}"
    )
    return title, columns, rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    common.model_args(p, "gpt2-124m,gpt2-355m,smollm2")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    common.lora_args(p, targets=False)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    common.timing_args(p, rounds=5, warmup=3)
    p.add_argument("--memory-steps", type=int, default=2, help="steps run by each peak-memory child")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one system's peak memory
    args = common.parse(p, argv, quick=dict(common.QUICK_TIMING, warmup=1, models="quick-gpt2", batch=2, length=32))
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(args.systems) - set(SYSTEMS):
        p.error(f"unknown systems {sorted(set(args.systems) - set(SYSTEMS))}; expected some of {', '.join(SYSTEMS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = common.start(args, args.device, child=bool(args.child))
    if args.child:
        print(json.dumps(child(args)))
        return
    results = [r for name in args.models.split(",") for r in bench_model(name.strip(), args)]
    common.finish(args, info, *table(results, args), results)


if __name__ == "__main__":
    main()
