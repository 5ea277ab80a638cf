"""`make gpu-check`: lorakit's GPU tests, then a short GPU throughput benchmark, in one table.

1. `pytest -m gpu`: every test marked `gpu` (tests/test_gpu.py: the fused LoRA layer on CUDA, three training steps
   per precision and task, 8/4-bit bases, no host-device sync between logging steps, TF32, packing per attention
   kernel, --compile against eager, merge on CUDA against the CPU, the --dry-run estimate against the real peak,
   generation on the GPU, DDP over NCCL when 2 GPUs are visible).
2. bench/epoch_speed.py on the GPU: one epoch over the first --rows rows of E2E with the packaged SmolLM2-135M in
   fp32 (TF32 where the GPU has it, for TRL too): lorakit, lorakit --packing, lorakit --compile, TRL + PEFT.

Designed to take under 8 minutes on one H100/H200 once the packages are installed (the default 2,000 rows are 250
steps per system). The table goes to stdout and, with its details, to bench/results/gpu_check.{json,md}.

    python bench/gpu_check.py                 # both parts
    python bench/gpu_check.py --rows 500      # a shorter epoch
    python bench/gpu_check.py --no-bench      # the tests only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SYSTEMS = "lorakit,lorakit-packing,lorakit-compile,trl"


def run_tests(work: Path) -> dict:
    """The gpu-marked tests; counts and the names of the failures, from pytest's JUnit report."""
    report = work / "gpu-tests.xml"
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}"]
    proc = subprocess.run(command, cwd=ROOT)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "seconds": time.perf_counter() - started, "failures": []}
    if not report.is_file():
        counts["failed"] = 1
        counts["failures"] = [f"pytest exited {proc.returncode} without a report"]
        return counts
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def run_bench(args: argparse.Namespace, work: Path) -> dict | None:
    out = work / "epoch_speed.json"
    command = [sys.executable, str(ROOT / "bench" / "epoch_speed.py"), "--systems", args.systems]
    command += ["--rows", str(args.rows), "--threads", str(args.threads), "--work", str(work / "runs")]
    command += ["--json", str(out)]
    proc = subprocess.run(command, cwd=ROOT)
    if proc.returncode != 0 or not out.is_file():
        return None
    return json.loads(out.read_text())


def table(tests: dict, bench: dict | None) -> list[str]:
    """One Markdown table: the tests' line, then one line per benchmarked system."""
    lines = ["| part | result | epoch s | real tok/s | 2nd-half tok/s | padding | steps | mean loss |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    failed = f", FAILED: {', '.join(tests['failures'])}" if tests["failures"] else ""
    result = f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped{failed}"
    lines.append(f"| gpu tests (pytest -m gpu) | {result} | {tests['seconds']:.0f} | | | | | |")
    if bench is None:
        lines.append("| epoch benchmark | FAILED (see its output above) | | | | | | |")
        return lines
    for s in bench["results"]:
        steady = f"{s['steady_tokens_per_s']:,.0f}" if s.get("steady_tokens_per_s") else "-"
        padding = f"{s['padding_share']:.1%}" if s.get("padding_share") is not None else "-"
        lines.append(
            f"| {s['label']} | epoch of {bench['data']['examples']:,} E2E rows | {s['epoch_s']:.1f} | "
            f"{s['real_tokens_per_s']:,.0f} | {steady} | {padding} | {s['steps']} | {s['loss_mean']:.4f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000, help="E2E rows in the benchmark's epoch (default 2000)")
    p.add_argument("--systems", default=SYSTEMS, help=f"benchmarked systems (default {SYSTEMS})")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="CPU threads per worker")
    p.add_argument("--no-bench", action="store_true", help="the tests only")
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu_check"), help="reports, run folders and logs")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device visible: make gpu-check needs an NVIDIA GPU and a CUDA build of torch")
        return 2
    gpu = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tests = run_tests(work)
    bench = None if args.no_bench else run_bench(args, work)
    title = f"**make gpu-check on {gpu}** ({time.perf_counter() - started:.0f} s in all)"
    lines = [title, "", *table(tests, bench)]
    print("\n" + "\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gpu_check.json").write_text(json.dumps({"gpu": gpu, "tests": tests, "bench": bench}, indent=2) + "\n")
    return 0 if tests["failed"] == 0 and (bench is not None or args.no_bench) else 1


if __name__ == "__main__":
    sys.exit(main())
