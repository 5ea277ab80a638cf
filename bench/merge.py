"""Merge time and peak memory of `merge_to_folder` on a GPT-2 355M (gpt2-medium shape, random weights).

Set-up (not timed): the base is saved as a model folder, wrapped with lorakit q,v r=4, given a non-zero B and
saved as an adapter that records that folder. Then each repeat runs, in a fresh child process, the import of
transformers' model code for that architecture (timed on its own: seconds that any tool loading the model pays
once per process, and that vary with the machine's file cache), then `merge_to_folder(adapter, out)`, reporting
the seconds of that call, its peak RSS, the RSS before it and the seconds spent in each stage. Last, the whole
`lorakit merge` command is timed as a user runs it (Python start-up and every import included), and a plain
write() of as many bytes as the merged weights to the same folder, to show what the file system alone takes. The
base file was written just before, so it is read from the page cache, as after a training run.

    python bench/merge.py --quick                            # a smoke test: tiny GPT-2, one repeat
    python bench/merge.py --markdown --json bench/results/merge.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common

# The functions merge_to_folder looks up in its module, in the order it calls them: a child wraps each one with
# a timer. atomic_dir is the context manager that writes the folder.
STAGES = {
    "read_adapter": "read adapter",
    "load_base": "load base",
    "apply_adapter": "apply adapter (fingerprint check)",
    "logits_of": "probe logits (2x)",
    "merge_adapter": "merge",
    "unwrap": "unwrap",
    "atomic_dir": "write folder",
}


def prepare(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A saved random base and a saved lorakit adapter for it; returns (base folder, adapter file)."""
    import lorakit

    model = common.build_model(args.model, args.seed)
    base_dir = folder / "base"
    model.save_pretrained(base_dir)
    adapter = lorakit.save_adapter(common.adapt(model, args), folder / "adapter.safetensors", base_model=str(base_dir))
    return base_dir, adapter


def stage_timer(fn: Callable[..., Any], name: str, seconds: dict[str, float]) -> Callable[..., Any]:
    """`fn` adding its seconds to seconds[name]; a context manager (atomic_dir) is timed from enter to exit."""
    if name == "atomic_dir":

        @contextlib.contextmanager
        def timed_dir(*a: Any, **kw: Any) -> Iterator[Path]:
            start = time.perf_counter()
            with fn(*a, **kw) as tmp:
                yield tmp
            seconds[name] = time.perf_counter() - start

        return timed_dir

    @functools.wraps(fn)
    def timed(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    return timed


def child(adapter: str, out: str) -> dict[str, Any]:
    """One `merge_to_folder` in this fresh process: seconds, peak RSS, and seconds per stage; before it, the
    seconds to import transformers and the base's model class."""
    import lorakit.deploy.merge as merge

    start = time.perf_counter()
    import transformers

    from lorakit import read_adapter

    loaded = read_adapter(adapter)
    transformers.AutoConfig.from_pretrained(loaded.base_model)
    getattr(transformers, loaded.metadata["base_class"])  # imports the architecture's model code
    imports = time.perf_counter() - start
    seconds: dict[str, float] = {}
    for name in STAGES:
        setattr(merge, name, stage_timer(getattr(merge, name), name, seconds))
    before = common.current_memory_mb("cpu")
    common.reset_peak_memory("cpu")
    start = time.perf_counter()
    result = merge.merge_to_folder(adapter, out)
    total = time.perf_counter() - start
    return {
        "seconds": total,
        "import_seconds": imports,
        "peak_mb": common.peak_memory_mb("cpu"),
        "before_mb": before,
        "stages": seconds,
        "modules": result.modules,
        "max_abs_diff": result.max_abs_diff,
    }


def plain_write_seconds(folder: Path, size: int, repeats: int) -> list[float]:
    """Seconds to write `size` bytes to a new file in `folder` with one plain write(), `repeats` times: what the
    file system alone takes for a file as large as the merged weights (no fsync, like save_pretrained)."""
    data = bytes(size)
    seconds = []
    for i in range(repeats):
        path = folder / f"plain-{i}.bin"
        start = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
        seconds.append(time.perf_counter() - start)
        path.unlink()
    return seconds


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def measure(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in the work folder."""
    base_dir, adapter = prepare(folder, args)
    base_mb, adapter_mb = folder_mb(base_dir), adapter.stat().st_size / 2**20
    print(f"base {base_mb:.0f} MiB on disk, adapter {adapter_mb:.2f} MiB; merging {args.repeats}x", flush=True)
    runs = []
    for i in range(args.repeats):
        child_args = ["--threads", str(args.threads), "--child", str(adapter), str(folder / f"merged-{i}")]
        runs.append(common.run_child(__file__, child_args))
        print(f"  run {i + 1}: {runs[-1]['seconds']:.2f} s, peak RSS {runs[-1]['peak_mb']:.0f} MiB", flush=True)
    cli = []
    for i in range(args.repeats):
        command = [sys.executable, "-m", "lorakit", "merge", str(adapter), "--out", str(folder / f"cli-{i}")]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        cli.append(time.perf_counter() - start)
        print(f"  `lorakit merge` command {i + 1}: {cli[-1]:.2f} s", flush=True)
    weights = sum(f.stat().st_size for f in (folder / "merged-0").glob("*.safetensors"))
    plain = plain_write_seconds(folder, weights, args.repeats)
    print(f"  plain write of {weights / 2**20:.0f} MiB: {', '.join(f'{s:.2f}' for s in plain)} s", flush=True)
    return {
        "model": args.model,
        "seconds_median": common.median(r["seconds"] for r in runs),
        "import_seconds_median": common.median(r["import_seconds"] for r in runs),
        "cli_seconds_median": common.median(cli),
        "cli_seconds": cli,
        "plain_write_seconds": plain,
        "plain_write_seconds_median": common.median(plain),
        "peak_mb": max(r["peak_mb"] for r in runs),
        "before_mb": common.median(r["before_mb"] for r in runs),
        "base_mb": base_mb,
        "merged_mb": folder_mb(folder / "merged-0"),
        "adapter_mb": adapter_mb,
        "stages_median": {s: common.median(r["stages"].get(s, 0.0) for r in runs) for s in STAGES},
        "runs": runs,
    }


def table(r: dict[str, Any], args: argparse.Namespace) -> tuple[str, list[str], list[list[str]]]:
    peak, before, base = r["peak_mb"], r["before_mb"], r["base_mb"]
    rows = [
        ["merge_to_folder seconds (median)", f"{r['seconds_median']:.2f}"],
        ["  runs", ", ".join(f"{run['seconds']:.2f}" for run in r["runs"])],
        *([f"  {label}", f"{r['stages_median'][s]:.2f}"] for s, label in STAGES.items()),
        ["  a plain write() of the same bytes to a new file there (median)", f"{r['plain_write_seconds_median']:.2f}"],
        ["import of transformers' model code, before the call (median)", f"{r['import_seconds_median']:.2f}"],
        ["`lorakit merge` command, wall seconds (median)", f"{r['cli_seconds_median']:.2f}"],
        ["  runs", ", ".join(f"{c:.2f}" for c in r["cli_seconds"])],
        ["peak RSS MiB (max of runs)", f"{peak:.0f}"],
        ["RSS before the call MiB (imports)", f"{before:.0f}"],
        ["peak - before MiB", f"{peak - before:.0f}"],
        ["base on disk MiB", f"{base:.0f}"],
        ["(peak - before) / base", f"{(peak - before) / base:.2f}"],
        ["merged folder MiB", f"{r['merged_mb']:.0f}"],
        ["adapter MiB", f"{r['adapter_mb']:.2f}"],
        ["adapted modules", str(r["runs"][0]["modules"])],
        ["probe max |logits diff|", f"{r['runs'][0]['max_abs_diff']:.2g}"],
    ]
    return f"merge_to_folder, {args.model}, lorakit {args.targets} r={args.rank}, fp32", ["quantity", "value"], rows


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, threads="torch threads in the merging process (0: torch's default)")
    p.add_argument("--model", default="gpt2-355m", help=f"one of {', '.join(common.MODELS)}")
    common.lora_args(p)
    p.add_argument("--repeats", type=int, default=3, help="fresh child processes, one merge each")
    p.add_argument("--dir", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--child", nargs=2, metavar=("ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = common.parse(p, argv, quick=dict(model="quick-gpt2", repeats=1))
    info = common.start(args, child=bool(args.child))
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with contextlib.ExitStack() as stack:
        folder = Path(args.dir) if args.dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        results = measure(folder, args)
    common.finish(args, info, *table(results, args), results)


if __name__ == "__main__":
    main()
