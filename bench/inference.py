"""Inference latency: the base model vs the merged model vs the unmerged adapter (lorakit, q,v, r=4).

The three systems run in one process on the same weights and token batches, alternating (the order rotates
every round); the table reports medians. Two workloads at batch 1 and batch 8:
  forward   one forward pass over `--length` tokens (the paper's Table 1 measures this, at length 128);
  decode    greedy decoding with the KV cache: a `--prompt`-token prompt, then `--new-tokens` tokens one at a
            time; reported per generated token (the prompt's forward included).
The merged model is `merge_adapter` + `unwrap`: a plain model of the base's shape, so its latency should be the
base's (the paper's "no additional inference latency").

    python bench/inference.py --quick
    python bench/inference.py --models gpt2-124m,smollm2 --json bench/inference.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
from torch import nn

SYSTEMS = ("base", "merged", "unmerged")


def build_systems(name: str, args: argparse.Namespace) -> tuple[dict[str, nn.Module], float]:
    """base, merged and unmerged models of one base; also max |logits difference| merged vs unmerged."""
    import lorakit
    from lorakit.lora.wrap import unwrap

    base = common.build_model(name, args.seed, args.device)
    unmerged = common.shared_copy(base)  # the adapter leaves the base weights alone: share them
    torch.manual_seed(args.seed)
    lorakit.add_lora(unmerged, args.targets, rank=args.rank, alpha=args.alpha)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the update changes the outputs
        for _, layer in lorakit.lora_layers(unmerged):
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    merged = copy.deepcopy(base)  # its own weights: merging changes them
    with tempfile.TemporaryDirectory() as tmp:  # the adapter goes through its file, as in use
        path = lorakit.save_adapter(unmerged, Path(tmp) / "adapter.safetensors")
        lorakit.load_adapter(merged, path)
    lorakit.merge_adapter(merged)
    unwrap(merged)  # a plain model again: the base's modules with the merged weights
    ids = common.random_ids(base.config.vocab_size, 2, 16, args.seed, args.device)
    with torch.inference_mode():
        diff = (merged(input_ids=ids).logits - unmerged(input_ids=ids).logits).abs().max().item()
    return {"base": base, "merged": merged, "unmerged": unmerged}, diff


def forward_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    return run


def decode_fn(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Greedy decoding with the KV cache: the prompt's forward, then one token at a time."""

    def run() -> None:
        with torch.inference_mode():
            out = model(input_ids=prompt, use_cache=True)
            for _ in range(new_tokens):
                token = out.logits[:, -1:].argmax(-1)  # (batch, 1)
                # transformers >= 5.24 calls the KV cache `cache`; earlier versions `past_key_values`
                cache = {"cache": out.cache} if "cache" in out else {"past_key_values": out.past_key_values}
                out = model(input_ids=token, use_cache=True, **cache)

    return run


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    models, diff = build_systems(name, args)
    vocab = models["base"].config.vocab_size
    print(f"{name}: merged vs unmerged logits differ by at most {diff:.2g}", flush=True)
    results = []
    for workload in args.workloads:
        for batch in args.batches:
            if workload == "forward":
                ids = common.random_ids(vocab, batch, args.length, args.seed, args.device)
                fns = {s: forward_fn(m, ids) for s, m in models.items()}
                per, unit = 1, "ms"
            else:
                prompt = common.random_ids(vocab, batch, args.prompt, args.seed, args.device)
                fns = {s: decode_fn(m, prompt, args.new_tokens) for s, m in models.items()}
                per, unit = args.new_tokens, "ms/token"
            times = common.alternate(
                fns, args.rounds, args.warmup, args.device, args.repeat, args.quiet, args.max_rounds
            )
            stats = {system: common.summarize(t) for system, t in times.items()}
            ms = {system: st["median_s"] * 1000 / per for system, st in stats.items()}
            results.append(
                {
                    "model": name,
                    "workload": workload,
                    "batch": batch,
                    "unit": unit,
                    "ms": ms,
                    "cpu_ms": {system: st["cpu_median_s"] * 1000 / per for system, st in stats.items()},
                    "merged_vs_base": common.paired_ratio(times["merged"], times["base"], args.quiet),
                    "unmerged_vs_base": common.paired_ratio(times["unmerged"], times["base"], args.quiet),
                    "merged_vs_base_cpu": common.paired_ratio(
                        times["merged"], times["base"], args.quiet, "cpu_seconds"
                    ),
                    "unmerged_vs_base_cpu": common.paired_ratio(
                        times["unmerged"], times["base"], args.quiet, "cpu_seconds"
                    ),
                    "stats": stats,
                    "times": times,
                    "merged_unmerged_max_abs_diff": diff,
                }
            )
            print(
                f"  {workload} batch {batch}: base {ms['base']:.1f} merged {ms['merged']:.1f} "
                f"unmerged {ms['unmerged']:.1f} {unit}",
                flush=True,
            )
    del models
    return results


def table(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> None:
    columns = ["model", "workload", "batch", "unit", "base", "merged", "unmerged", "quiet calls"]
    columns += ["merged / base", "unmerged / base", "CPU merged / base", "CPU unmerged / base"]
    rows = []
    for r in results:
        rows.append(
            [
                r["model"],
                r["workload"],
                str(r["batch"]),
                r["unit"],
                *(f"{r['ms'][s]:.1f} +-{r['stats'][s]['spread'] * 100:.0f}%" for s in SYSTEMS),
                "/".join(str(r["stats"][s]["quiet_calls"]) for s in SYSTEMS),
                f"{r['merged_vs_base']:.3f}",
                f"{r['unmerged_vs_base']:.3f}",
                f"{r['merged_vs_base_cpu']:.3f}",
                f"{r['unmerged_vs_base_cpu']:.3f}",
            ]
        )
    title = (
        f"Inference latency, fp32; forward: {args.length} tokens; decode: {args.prompt}-token prompt + "
        f"{args.new_tokens} new tokens; adapter lorakit {args.targets} r={args.rank}; alternating rounds, median "
        f"over the quiet calls (other processes used <= {args.quiet:.0%} of the CPUs), +- half the IQR; ratios: median "
        f"over rounds of the ratio within a round, of wall seconds or (CPU) this process's CPU seconds"
    )
    common.print_table(title, columns, rows, markdown=args.markdown)
    print(f"machine: {common.describe(info)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models = ", ".join(common.MODELS)
    p.add_argument("--models", default="gpt2-124m,smollm2", help=f"comma-separated: {models}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workloads", default="forward,decode", help="comma-separated: forward, decode")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--length", type=int, default=128, help="tokens of the forward workload")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens of the decode workload")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens of the decode workload")
    p.add_argument("--targets", default="q,v")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per system")
    p.add_argument("--rounds", type=int, default=15, help="quiet timed calls wanted per system (at most --max-rounds)")
    p.add_argument("--max-rounds", type=int, help="stop after this many rounds (default: 2x rounds)")
    p.add_argument(
        "--quiet",
        type=float,
        help="a call is quiet if other processes used <= this CPU share (default: "
        "what torch's threads leave free, less 0.1; at least 0.1)",
    )
    p.add_argument("--repeat", type=int, default=0, help="back-to-back calls per timing (0: enough for ~0.3 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny GPT-2 and Llama, few rounds: a smoke test")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.warmup, args.length, args.new_tokens = "quick-gpt2,quick-llama", 3, 1, 32, 8
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(args.workloads) - {"forward", "decode"}:
        p.error(f"unknown workloads in {args.workloads}; expected forward, decode")
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet is None:
        args.quiet = common.quiet_share()
    info = common.machine(args.device)
    print(f"machine: {common.describe(info)}", flush=True)
    results = []
    for name in args.models.split(","):
        results += bench_model(name.strip(), args)
    table(results, info, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
    common.write_json(args.json, {"machine": info, "settings": settings, "command": sys.argv, "results": results})


if __name__ == "__main__":
    main()
