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

    python bench/layer_speed.py --quick                      # tiny models, seconds
    python bench/layer_speed.py --models gpt2-124m,gpt2-355m,smollm2 --json bench/layer_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import sys
from collections.abc import Callable
from typing import Any

import common
import torch
from torch import nn

LABELS = {
    "floor": "frozen-base floor",
    "full": "full fine-tuning",
    "peft": "PEFT LoRA",
    "lorakit": "lorakit LoRA",
    "lorakit-qv": "lorakit LoRA q,v slices",
}


def systems_for(model: nn.Module, wanted: list[str]) -> list[str]:
    names = [s for s in LABELS if s in wanted]
    return [s for s in names if s != "lorakit-qv" or common.is_gpt2(model)]


def targets_of(system: str, model: nn.Module) -> str:
    """Human-readable target modules of a system on this model."""
    gpt2 = common.is_gpt2(model)
    return {
        "floor": "-",
        "full": "all",
        "peft": "c_attn" if gpt2 else "q_proj,v_proj",
        "lorakit": "c_attn" if gpt2 else "q,v",
        "lorakit-qv": "c_attn q,v slices",
    }[system]


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

        targets = "q,v" if system == "lorakit-qv" or not gpt2 else "c_attn"
        add_lora(model, targets, rank=args.rank, alpha=args.alpha)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, optimizer


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

    import lorakit.lora.wrap  # noqa: F401

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
    peak = common.peak_memory_mb(args.device)
    return {"system": args.child, "peak_mb": peak, "before_mb": before}


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every system on one model, then measure each one's peak memory in a child process."""
    base = common.build_model(name, args.seed, args.device)
    ids = common.random_ids(base.config.vocab_size, args.batch, args.length, args.seed, args.device)
    systems = systems_for(base, args.systems)
    steps, counts, first_loss = {}, {}, {}
    for system in systems:
        model, optimizer = prepare(system, base, args)
        counts[system] = common.param_counts(model)
        steps[system] = make_step(model, optimizer, ids, args)
        first_loss[system] = steps[system]()  # the first warmup step; the same weights give the same loss
    targets = {s: targets_of(s, base) for s in systems}
    frozen_total = counts[systems[0]][1] - counts[systems[0]][0]
    spread_of_first = max(first_loss.values()) - min(first_loss.values())
    print(
        f"{name}: {frozen_total / 1e6:.1f}M parameters; first-step losses agree to {spread_of_first:.2g} "
        f"({', '.join(f'{s} {v:.4f}' for s, v in first_loss.items())})",
        flush=True,
    )
    times = common.alternate(
        steps, args.rounds, max(0, args.warmup - 1), args.device, quiet=args.quiet, max_rounds=args.max_rounds
    )
    del steps, base
    gc.collect()

    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory:
        for system in systems:
            memory[system] = common.run_child(__file__, [*child_args(args, name), "--child", system])
    tokens = args.batch * args.length
    results = []
    for system in systems:
        stats = common.summarize(times[system])
        results.append(
            {
                "model": name,
                "system": system,
                "label": LABELS[system],
                "targets": targets[system],
                "trainable_params": counts[system][0],
                "total_params": counts[system][1],
                **stats,
                "tokens_per_s": tokens / stats["median_s"],
                "first_loss": first_loss[system],
                **times[system],
                **{k: v for k, v in memory.get(system, {}).items() if k != "system"},
            }
        )
    by_system = {r["system"]: r for r in results}
    for r in results:
        for ref in ("floor", "peft", "full"):
            if ref in by_system:
                mine, theirs = times[r["system"]], times[ref]
                r[f"vs_{ref}"] = common.paired_ratio(mine, theirs, args.quiet)
                r[f"vs_{ref}_cpu"] = common.paired_ratio(mine, theirs, args.quiet, key="cpu_seconds")
                r[f"vs_{ref}_of_medians"] = r["median_s"] / by_system[ref]["median_s"]
        if "peft" in by_system and "peak_mb" in r:
            r["peak_vs_peft"] = r["peak_mb"] / by_system["peft"]["peak_mb"]
    return results


def child_args(args: argparse.Namespace, model: str) -> list[str]:
    """The command line that makes a child process measure one system like this process times it."""
    out = ["--models", model, "--device", args.device, "--batch", str(args.batch), "--length", str(args.length)]
    out += ["--rank", str(args.rank), "--alpha", str(args.alpha), "--seed", str(args.seed)]
    out += ["--precision", args.precision, "--memory-steps", str(args.memory_steps)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def table(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> None:
    columns = ["model", "system", "targets", "trainable", "step ms", "+-", "quiet", "tokens/s"]
    columns += ["/ floor", "/ PEFT", "/ full", "CPU / floor", "CPU / PEFT", "peak MiB", "+ over model"]
    rows = []
    for r in results:
        rows.append(
            [
                r["model"],
                r["label"],
                r["targets"],
                f"{r['trainable_params']:,}",
                f"{r['median_s'] * 1000:.0f}",
                f"{r['spread'] * 100:.1f}%",
                f"{r['quiet_calls']}/{r['calls']}",
                f"{r['tokens_per_s']:.0f}",
                *(f"{r[k]:.3f}" if k in r else "-" for k in ("vs_floor", "vs_peft", "vs_full")),
                *(f"{r[k]:.3f}" if k in r else "-" for k in ("vs_floor_cpu", "vs_peft_cpu")),
                f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-",
                f"{r['peak_mb'] - r['before_mb']:.0f}" if "peak_mb" in r else "-",
            ]
        )
    title = (
        f"Training step, batch {args.batch} x {args.length} tokens, {args.precision}, LoRA r={args.rank} "
        f"alpha={args.alpha:g}; {args.warmup} warmup steps, then alternating rounds; median over the quiet calls "
        f"(other processes used <= {args.quiet:.0%} of the CPUs; all calls when fewer than 3), +- half the IQR; "
        f"ratios: median over rounds of the ratio within a round, of wall seconds or (CPU) this process's CPU seconds"
    )
    common.print_table(title, columns, rows, markdown=args.markdown)
    print(f"machine: {common.describe(info)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models = ", ".join(common.MODELS)
    p.add_argument("--models", default="gpt2-124m,gpt2-355m,smollm2", help=f"comma-separated: {models}")
    p.add_argument("--systems", default=",".join(LABELS), help="comma-separated subset of " + ", ".join(LABELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per system")
    p.add_argument("--rounds", type=int, default=5, help="quiet timed calls wanted per system (at most --max-rounds)")
    p.add_argument("--max-rounds", type=int, help="stop after this many rounds (default: 2x rounds)")
    p.add_argument(
        "--quiet",
        type=float,
        help="a call is quiet if other processes used <= this CPU share (default: "
        "what torch's threads leave free, less 0.1; at least 0.1)",
    )
    p.add_argument("--memory-steps", type=int, default=2, help="steps run by each peak-memory child")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny GPT-2, batch 2 x 32: a smoke test")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one system's peak memory
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.length, args.warmup, args.rounds = "quick-gpt2", 2, 32, 1, 3
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(LABELS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; expected some of {', '.join(LABELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet is None:
        args.quiet = common.quiet_share()
    if args.child:
        print(json.dumps(child(args)))
        return
    info = common.machine(args.device)
    print(f"machine: {common.describe(info)}", flush=True)
    results = []
    for name in args.models.split(","):
        results += bench_model(name.strip(), args)
    table(results, info, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "json", "markdown")}
    common.write_json(args.json, {"machine": info, "settings": settings, "command": sys.argv, "results": results})


if __name__ == "__main__":
    main()
