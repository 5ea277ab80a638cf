"""What the benchmark scripts share: the command line, the machine, the models, timing, peak memory and output.

Each script imports this file as `common` (scripts run as `python bench/<name>.py`, so `bench/` is on the path).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------------
# The command line and the output

# --quick: a smoke test that times nothing worth reading. One timed round, no warmup, one call per timing and no
# extra rounds waiting for a quiet machine: it only runs slower on a busy machine, never longer in rounds.
QUICK_TIMING = dict(rounds=1, max_rounds=1, warmup=0, repeat=1)
INTERNAL = ("child", "worker", "out", "result", "json", "markdown", "verbose")  # options left out of `settings`


def parser(
    doc: str, threads: str | None = "torch threads (0: torch's default)", seed: bool = True
) -> argparse.ArgumentParser:
    """A parser described by the script's first docstring paragraph, with --seed, --threads, --quick, --json and
    --markdown (`threads=None`: the script defines its own --threads; `seed=False`: no --seed)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if seed:
        p.add_argument("--seed", type=int, default=0)
    if threads:
        p.add_argument("--threads", type=int, default=0, help=threads)
    p.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke test (times nothing)")
    p.add_argument("--json", help="write the results here, and their Markdown table beside it (.md)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return p


def lora_args(p: argparse.ArgumentParser, targets: bool = True, alpha: bool = True, rank: int = 4) -> None:
    """--targets (lorakit's), --rank and --alpha of the LoRA adapter."""
    if targets:
        p.add_argument("--targets", default="q,v")
    p.add_argument("--rank", type=int, default=rank)
    if alpha:
        p.add_argument("--alpha", type=float, default=32.0)


def model_args(p: argparse.ArgumentParser, models: str) -> None:
    """--models (names from MODELS) and --device."""
    p.add_argument("--models", default=models, help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def timing_args(p: argparse.ArgumentParser, rounds: int, warmup: int, repeat: int = 1) -> None:
    """The options of `alternate`."""
    p.add_argument("--rounds", type=int, default=rounds, help="quiet timed calls wanted per system")
    p.add_argument("--max-rounds", type=int, help="stop after this many rounds (default: 2x rounds)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls per system")
    p.add_argument("--repeat", type=int, default=repeat, help="back-to-back calls per timing (0: enough for ~0.3 s)")
    p.add_argument(
        "--quiet",
        type=float,
        help="a call is quiet if other processes used <= this CPU share (default: what torch's threads leave "
        "free, less 0.1; at least 0.1)",
    )


def parse(p: argparse.ArgumentParser, argv: list[str] | None, quick: dict[str, Any]) -> argparse.Namespace:
    """Parse; --quick replaces the options named in `quick` by their values."""
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(quick)
    return args


def start(args: argparse.Namespace, device: str = "cpu", child: bool = False, threads: bool = True) -> dict[str, Any]:
    """Set torch's threads (--threads, unless `threads` is False) and the default --quiet share; print and return
    the machine (not in a child process, which prints only its result)."""
    if threads and getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if "quiet" in vars(args) and args.quiet is None:
        args.quiet = quiet_share()
    if child:
        return {}
    info = machine(device)
    print(f"machine: {describe(info)}", flush=True)
    return info


def how_timed(quiet: float) -> str:
    """How `alternate`, `summarize` and `ratios` made the numbers, for a table's title."""
    return (
        f"alternating rounds; median over the quiet calls (other processes used <= {quiet:.0%} of the CPUs; all "
        "calls when fewer than 3), +- half the IQR; ratios: median over rounds of the ratio within a round, of wall "
        "seconds or (CPU) this process's CPU seconds"
    )


def markdown_table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, columns: list[str], rows: list[list[str]], markdown: bool = False) -> None:
    """One table on stdout: rich, or Markdown (for the README) with `markdown`."""
    if markdown:
        print("\n" + markdown_table(title, columns, rows) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def finish(
    args: argparse.Namespace,
    info: dict[str, Any],
    title: str,
    columns: list[str],
    rows: list[list[str]],
    results: Any,
    notes: Sequence[str] = (),
    **extra: Any,
) -> None:
    """Print the table, the notes and the machine; with --json, write the results (with the machine, the
    settings and the command line, plus `extra`) and the Markdown report beside them (.md)."""
    print_table(title, columns, rows, markdown=args.markdown)
    tail = [*notes, f"machine: {describe(info)}"]
    print("\n".join(tail))
    if not args.json:
        return
    settings = {k: v for k, v in vars(args).items() if k not in INTERNAL}
    data = {"machine": info, "settings": settings, "command": sys.argv, **extra, "results": results}
    Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    md = Path(args.json).with_suffix(".md")
    md.write_text(markdown_table(title, columns, rows) + "\n\n" + "\n".join(tail) + "\n")
    print(f"wrote {args.json} and {md}")


# ---------------------------------------------------------------------------------------------------------------
# The machine


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on (package versions read without importing the packages)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "device": device,
    }
    for package in ("peft", "trl"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict[str, Any]) -> str:
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "peft", "trl") if k in info)
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"load average {info['load_average_1m']} at start; device {info['device']}{gpu}; {versions}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Models

# GPT-2 shapes with random weights (no download): the real 124M ("gpt2") and 355M ("gpt2-medium") shapes.
# Dropout is off, as in the paper's GPT-2 recipe; it would cost every system the same.
GPT2_SHAPES: dict[str, dict[str, int]] = {
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-355m": dict(n_layer=24, n_embd=1024, n_head=16),
    "quick-gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256),
}
QUICK_LLAMA = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
MODELS = (*GPT2_SHAPES, "smollm2", "quick-llama")


def build_model(name: str, seed: int = 0, device: str = "cpu") -> nn.Module:
    """A causal LM in eval mode: a random-weight GPT-2 shape, a tiny Llama, or the packaged SmolLM2-135M."""
    torch.manual_seed(seed)
    if name in GPT2_SHAPES:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(**GPT2_SHAPES[name], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    elif name == "quick-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**QUICK_LLAMA))
    elif name == "smollm2":
        from lorakit.models import PACKAGED, load_base

        model = load_base(PACKAGED, dtype="fp32")  # converted once to ~/.cache/lorakit (~30 s the first time)
    else:
        raise SystemExit(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return model.to(device).eval()


def is_gpt2(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == "gpt2"


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose modules are new but whose parameters are the same tensors.

    Systems that keep the base frozen can share one set of weights in the timing process; wrapping a copy's
    modules (lorakit, PEFT) or hooking them leaves the other copies alone.
    """
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def random_ids(vocab: int, batch: int, length: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """A fixed (batch, length) batch of token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def random_B(layers: Iterable[Any], seed: int) -> None:
    """Give LoRA layers a trained-looking update: B ~ N(0, 0.02^2) instead of zeros, from generator `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def adapt(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """lorakit LoRA on `args.targets` (r `args.rank`, alpha `args.alpha`), A from seed `args.seed`, a non-zero B."""
    import lorakit

    torch.manual_seed(args.seed)
    lorakit.add_lora(model, args.targets, rank=args.rank, alpha=args.alpha)
    random_B((layer for _, layer in lorakit.lora_layers(model)), args.seed + 1)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def quiet_share(threads: int | None = None) -> float:
    """The CPU share other processes may take while a call still counts as quiet: what our threads leave free,
    less a margin (0.4 for 1 thread on 2 cores, 0.1 when torch uses every core)."""
    cores = os.cpu_count() or 1
    threads = threads or torch.get_num_threads()
    return max(0.1, 1 - threads / cores - 0.1)


def cpu_jiffies() -> tuple[int, int, int]:
    """(all CPU time, busy CPU time, this process's CPU time) in clock ticks since boot (Linux; zeros elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0, 0
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks[:8]), sum(ticks[:8]) - idle, int(fields[11]) + int(fields[12])  # utime + stime


class Clock:
    """Wall seconds, this process's CPU seconds and the share of all CPUs other processes used, start to stop.

    The share tells a clean measurement from one slowed down by another job on a shared machine; the CPU seconds
    are what the work cost when it was not waiting (with one torch thread they barely change when another job
    takes the CPU from us now and then).
    """

    def start(self) -> None:
        self._jiffies = cpu_jiffies()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float, float]:
        seconds, cpu_seconds = time.perf_counter() - self._wall, time.process_time() - self._cpu
        (all0, busy0, own0), (all1, busy1, own1) = self._jiffies, cpu_jiffies()
        others = max(0, (busy1 - busy0) - (own1 - own0)) / max(1, all1 - all0)
        return seconds, cpu_seconds, others


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float, float]:
    """`Clock` over one call of `fn` (the device synchronized on both sides)."""
    clock = Clock()
    sync(device)
    clock.start()
    fn()
    sync(device)
    return clock.stop()


def alternate(
    systems: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int,
    device: str,
    repeat: int = 1,
    quiet: float = 0.1,
    max_rounds: int | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Run each system `warmup` times, then rounds of all systems, rotating the order every round.

    A call counts as quiet when other processes used at most `quiet` of the machine's CPUs meanwhile. Rounds go
    on until every system has `rounds` quiet calls, or `max_rounds` (default 2 x rounds) rounds are done.

    Returns per system: `seconds` and `cpu_seconds` of every timed call (the mean of `repeat` back-to-back calls;
    `repeat` < 1 picks it so that a call lasts ~0.3 s), `others` (the CPU share other processes took during it),
    and `quiet_seconds`, `quiet_cpu_seconds` (the quiet calls only).
    """
    names = list(systems)
    for _ in range(warmup):
        for name in names:
            systems[name]()
    if repeat < 1:  # automatic: every timed call lasts at least ~0.3 s, long enough for the CPU-share check
        fastest = min(timed(systems[name], device)[0] for name in names)
        repeat = max(1, math.ceil(0.3 / max(fastest, 1e-6)))
    keys = ("seconds", "cpu_seconds", "others", "quiet_seconds", "quiet_cpu_seconds")
    out: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in names}
    for r in range(max_rounds or 2 * rounds):
        if r >= rounds and all(len(out[n]["quiet_seconds"]) >= rounds for n in names):
            break
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, cpu_seconds, others = timed(_repeated(systems[name], repeat), device)
            out[name]["seconds"].append(seconds / repeat)
            out[name]["cpu_seconds"].append(cpu_seconds / repeat)
            out[name]["others"].append(others)
            if others <= quiet:
                out[name]["quiet_seconds"].append(seconds / repeat)
                out[name]["quiet_cpu_seconds"].append(cpu_seconds / repeat)
    return out


def _repeated(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()

    return run


def summarize(times: dict[str, list[float]], min_quiet: int = 3) -> dict[str, Any]:
    """Medians of wall and CPU seconds (over the quiet calls when there are at least `min_quiet`, else all),
    the spread of the wall seconds and their minimum."""
    use_quiet = len(times["quiet_seconds"]) >= min_quiet
    wall = times["quiet_seconds"] if use_quiet else times["seconds"]
    cpu = times["quiet_cpu_seconds"] if use_quiet else times["cpu_seconds"]
    return {
        "median_s": median(wall),
        "spread": spread(wall),
        "cpu_median_s": median(cpu),
        "min_s": min(times["seconds"]),
        "median_all_s": median(times["seconds"]),
        "quiet_calls": len(times["quiet_seconds"]),
        "calls": len(times["seconds"]),
        "median_over": "quiet" if use_quiet else "all",
        "others_median": median(times["others"]),
    }


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """Half the interquartile range relative to the median: a robust +- for a noisy machine."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[2] - q[0]) / 2 / statistics.median(values)


def paired_ratio(
    times: dict[str, list[float]], reference: dict[str, list[float]], quiet: float, key: str = "seconds"
) -> float:
    """Median over rounds of (this system's call / the reference's call in the same round).

    Calls of one round run seconds apart, so a slow phase of a shared machine mostly hits both; rounds in which
    both calls were quiet (others took <= `quiet` of the CPUs) are used when there are at least 3 of them.
    """
    pairs = list(zip(times[key], reference[key], times["others"], reference["others"]))
    quiet_pairs = [(a, b) for a, b, oa, ob in pairs if max(oa, ob) <= quiet]
    chosen = quiet_pairs if len(quiet_pairs) >= 3 else [(a, b) for a, b, _, _ in pairs]
    return median([a / b for a, b in chosen])


def ratios(times: dict[str, dict[str, list[float]]], system: str, reference: str, quiet: float) -> dict[str, float]:
    """`system` over `reference`: paired ratios of wall and CPU seconds (`vs_<reference>`, `vs_<reference>_cpu`)."""
    mine, theirs = times[system], times[reference]
    return {
        f"vs_{reference}": paired_ratio(mine, theirs, quiet),
        f"vs_{reference}_cpu": paired_ratio(mine, theirs, quiet, key="cpu_seconds"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Peak memory
#
# On CPU the resident-set high-water mark is per process, so a peak is taken in a fresh child process that runs
# one system only; writing 5 to /proc/self/clear_refs resets the mark (Linux >= 4.0) so that the peak covers the
# measured work and not model construction. The mark is read as VmHWM from /proc/self/status, not as getrusage's
# ru_maxrss: Linux carries the parent's high-water mark into a child's ru_maxrss when the child execs (the child
# starts on the parent's memory map), so the child of a benchmark holding five models reported the parent's
# peak, and clear_refs does not reset that part. On CUDA the allocator keeps its own peak.


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then includes everything since the process started


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_memory_mb(device: str) -> float:
    """Peak allocated GPU memory, or this process's peak RSS since the last reset (VmHWM), in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_memory_mb(device: str) -> float:
    """Allocated GPU memory, or the process's current RSS, in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    rss = _status_mb("VmRSS")
    return rss if rss is not None else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Child processes and lorakit's training loop


def run_child(script: str, args: list[str], environment: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Run `python script args` in a fresh process, with `environment` changed (None: a variable removed); it
    prints one JSON object as its last stdout line."""
    env = {**os.environ, **(environment or {})}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loop_console(on_start: Callable[[], None], on_end: Callable[[], None]) -> Any:
    """A rich Console for `lorakit.training.loop.train(cfg, console)` that calls `on_start()` when the training
    loop begins and `on_end()` when it ends.

    It relies on one thing train() does: it shows its progress bar (a rich Live display on the console it is
    given) around the loop of optimizer steps, and no other live display. `.loops` counts the displays, so
    that a caller can check there was exactly one.
    """
    from rich.console import Console

    class LoopConsole(Console):
        loops = 0

        def set_live(self, live: Any) -> bool:
            topmost = super().set_live(live)
            self.loops += 1
            on_start()
            return topmost

        def clear_live(self) -> None:
            on_end()
            super().clear_live()

    return LoopConsole(stderr=True)  # as train() makes its own
