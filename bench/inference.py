"""Inference latency: the base model vs the merged model vs the unmerged adapter (lorakit, q,v, r=4).

The three systems run in one process on the same weights and token batches, alternating (the order rotates
every round); the table reports medians. Two workloads at batch 1 and batch 8:
  forward   one forward pass over `--length` tokens (the paper's Table 1 measures this, at length 128);
  decode    greedy decoding with the KV cache: a `--prompt`-token prompt, then `--new-tokens` tokens one at a
            time; reported per generated token (the prompt's forward included).
The merged model is `merge_adapter` + `unwrap`: a plain model of the base's shape, so its latency should be the
base's (the paper's "no additional inference latency").

    python bench/inference.py --quick                        # a smoke test: tiny GPT-2 and Llama, one round
    python bench/inference.py --threads 1 --rounds 16 --max-rounds 20 --markdown --json bench/results/inference.json
"""

from __future__ import annotations

import argparse
import copy
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
    unmerged = common.adapt(common.shared_copy(base), args)  # the adapter leaves the base weights alone: share them
    merged = copy.deepcopy(base)  # its own weights: merging changes them
    with tempfile.TemporaryDirectory() as tmp:  # the adapter goes through its file, as in use
        lorakit.load_adapter(merged, lorakit.save_adapter(unmerged, Path(tmp) / "adapter.safetensors"))
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
                    **{
                        f"{system}_{key}": value
                        for system in ("merged", "unmerged")
                        for key, value in common.ratios(times, system, "base", args.quiet).items()
                    },
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


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, list[str], list[list[str]]]:
    columns = ["model", "workload", "batch", "unit", "base", "merged", "unmerged", "quiet calls"]
    columns += ["merged / base", "unmerged / base", "CPU merged / base", "CPU unmerged / base"]
    ratio_keys = ("merged_vs_base", "unmerged_vs_base", "merged_vs_base_cpu", "unmerged_vs_base_cpu")
    rows = [
        [
            r["model"],
            r["workload"],
            str(r["batch"]),
            r["unit"],
            *(f"{r['ms'][s]:.1f} +-{r['stats'][s]['spread'] * 100:.0f}%" for s in SYSTEMS),
            "/".join(str(r["stats"][s]["quiet_calls"]) for s in SYSTEMS),
            *(f"{r[k]:.3f}" for k in ratio_keys),
        ]
        for r in results
    ]
    title = (
        f"Inference latency, fp32; forward: {args.length} tokens; decode: {args.prompt}-token prompt + "
        f"{args.new_tokens} new tokens; adapter lorakit {args.targets} r={args.rank}; {common.how_timed(args.quiet)}"
    )
    return title, columns, rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    common.model_args(p, "gpt2-124m,smollm2")
    p.add_argument("--workloads", default="forward,decode", help="comma-separated: forward, decode")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--length", type=int, default=128, help="tokens of the forward workload")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens of the decode workload")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens of the decode workload")
    common.lora_args(p)
    common.timing_args(p, rounds=15, warmup=2, repeat=0)
    quick = dict(common.QUICK_TIMING, models="quick-gpt2,quick-llama", batches="1,2", length=32, new_tokens=8)
    args = common.parse(p, argv, quick)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(args.workloads) - {"forward", "decode"}:
        p.error(f"unknown workloads in {args.workloads}; expected forward, decode")
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = common.start(args, args.device)
    results = [r for name in args.models.split(",") for r in bench_model(name.strip(), args)]
    common.finish(args, info, *table(results, args), results)


if __name__ == "__main__":
    main()
