"""Merge time and peak memory of `merge_to_folder` on a GPT-2 355M (gpt2-medium shape, random weights).

Set-up (not timed): the base is saved as a model folder, wrapped with lorakit q,v r=4, given a non-zero B and
saved as an adapter that records that folder. Then each repeat runs, in a fresh child process, the import of
transformers' model code for that architecture (timed on its own: seconds that any tool loading the model pays
once per process, and that vary with the machine's file cache), then `merge_to_folder(adapter, out)`, reporting
the seconds of that call, its peak RSS, the RSS before it and the seconds spent in each stage. Last, the whole
`lorakit merge` command is timed as a user runs it (Python start-up and every import included). The base file was
written just before, so it is read from the page cache, as after a training run.

    python bench/merge.py --quick
    python bench/merge.py --json bench/merge.json
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
import torch

STAGES = ("read_adapter", "load_base", "apply_adapter", "logits_of", "merge_adapter", "unwrap", "atomic_dir")
STAGE_LABELS = {
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
    torch.manual_seed(args.seed)
    lorakit.add_lora(model, args.targets, rank=args.rank, alpha=args.alpha)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    adapter = lorakit.save_adapter(model, folder / "adapter.safetensors", base_model=str(base_dir))
    return base_dir, adapter


def _timed_stage(fn: Callable[..., Any], name: str, seconds: dict[str, float]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def _timed_dir(fn: Callable[..., Any], seconds: dict[str, float]) -> Callable[..., Any]:
    @contextlib.contextmanager
    def wrapper(*a: Any, **kw: Any) -> Iterator[Path]:
        start = time.perf_counter()
        with fn(*a, **kw) as tmp:
            yield tmp
        seconds["atomic_dir"] = time.perf_counter() - start

    return wrapper


def child(adapter: str, out: str) -> dict[str, Any]:
    """One `merge_to_folder` in this fresh process: seconds, peak RSS, and seconds per stage; before it, the
    seconds to import transformers and the base's model class."""
    import lorakit.deploy.merge as merge

    start = time.perf_counter()
    from transformers import AutoConfig

    from lorakit.lora.adapter import read_adapter
    from lorakit.models import _model_class

    loaded = read_adapter(adapter)
    _model_class(AutoConfig.from_pretrained(loaded.base_model), None, loaded.metadata.get("base_class"))
    imports = time.perf_counter() - start
    seconds: dict[str, float] = {}
    for name in STAGES[:-1]:  # the names merge_to_folder looks up in its module: wrap them with a timer
        setattr(merge, name, _timed_stage(getattr(merge, name), name, seconds))
    merge.atomic_dir = _timed_dir(merge.atomic_dir, seconds)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-355m", help=f"one of {', '.join(common.MODELS)}")
    p.add_argument("--targets", default="q,v")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--repeats", type=int, default=3, help="fresh child processes, one merge each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the merging process (0: torch's default)")
    p.add_argument("--dir", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--quick", action="store_true", help="tiny GPT-2, one repeat: a smoke test")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--child", nargs=2, metavar=("ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.quick:
        args.model, args.repeats = "quick-gpt2", 1

    info = common.machine("cpu")
    print(f"machine: {common.describe(info)}", flush=True)
    with contextlib.ExitStack() as stack:
        folder = Path(args.dir) if args.dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base_dir, adapter = prepare(folder, args)
        base_mb, adapter_mb = folder_mb(base_dir), adapter.stat().st_size / 2**20
        print(f"base {base_mb:.0f} MiB on disk, adapter {adapter_mb:.2f} MiB; merging {args.repeats}x", flush=True)
        runs = []
        for i in range(args.repeats):
            runs.append(
                common.run_child(
                    __file__, ["--threads", str(args.threads), "--child", str(adapter), str(folder / f"merged-{i}")]
                )
            )
            print(f"  run {i + 1}: {runs[-1]['seconds']:.2f} s, peak RSS {runs[-1]['peak_mb']:.0f} MiB", flush=True)
        merged_mb = folder_mb(folder / "merged-0")
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

    seconds = common.median([r["seconds"] for r in runs])
    peak = max(r["peak_mb"] for r in runs)
    before = common.median([r["before_mb"] for r in runs])
    stages = {s: common.median([r["stages"].get(s, 0.0) for r in runs]) for s in STAGES}
    imports = common.median([r["import_seconds"] for r in runs])
    columns = ["quantity", "value"]
    rows = [
        ["merge_to_folder seconds (median)", f"{seconds:.2f}"],
        ["  runs", ", ".join(f"{r['seconds']:.2f}" for r in runs)],
        *([f"  {STAGE_LABELS[s]}", f"{stages[s]:.2f}"] for s in STAGES),
        ["  a plain write() of the same bytes to a new file there (median)", f"{common.median(plain):.2f}"],
        ["import of transformers' model code, before the call (median)", f"{imports:.2f}"],
        ["`lorakit merge` command, wall seconds (median)", f"{common.median(cli):.2f}"],
        ["  runs", ", ".join(f"{c:.2f}" for c in cli)],
        ["peak RSS MiB (max of runs)", f"{peak:.0f}"],
        ["RSS before the call MiB (imports)", f"{before:.0f}"],
        ["peak - before MiB", f"{peak - before:.0f}"],
        ["base on disk MiB", f"{base_mb:.0f}"],
        ["(peak - before) / base", f"{(peak - before) / base_mb:.2f}"],
        ["merged folder MiB", f"{merged_mb:.0f}"],
        ["adapter MiB", f"{adapter_mb:.2f}"],
        ["adapted modules", str(runs[0]["modules"])],
        ["probe max |logits diff|", f"{runs[0]['max_abs_diff']:.2g}"],
    ]
    common.print_table(
        f"merge_to_folder, {args.model}, lorakit {args.targets} r={args.rank}, fp32", columns, rows, args.markdown
    )
    print(f"machine: {common.describe(info)}")
    results = {
        "model": args.model,
        "seconds_median": seconds,
        "import_seconds_median": imports,
        "cli_seconds_median": common.median(cli),
        "cli_seconds": cli,
        "plain_write_seconds": plain,
        "plain_write_seconds_median": common.median(plain),
        "peak_mb": peak,
        "before_mb": before,
        "base_mb": base_mb,
        "merged_mb": merged_mb,
        "adapter_mb": adapter_mb,
        "stages_median": stages,
        "runs": runs,
    }
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "json", "markdown")}
    common.write_json(args.json, {"machine": info, "settings": settings, "command": sys.argv, "results": results})


if __name__ == "__main__":
    main()
