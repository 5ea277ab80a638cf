"""A failure on one rank of a 2-process run (gloo on CPU) ends every rank within seconds, with that rank's one-line
error and its exit code, instead of leaving the other rank waiting in a collective. Failures are injected with
LORAKIT_FAIL_AT=RANK:POINT (training/failure.py): rank 0 finds a bad input while rank 1 goes on to wait in DDP's
first broadcast; rank 1 runs out of memory in step 3 while rank 0 waits in the gradient all-reduce."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import learnable_rows, save_model, tiny_llama, write_jsonl

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not sys.platform.startswith("linux"),
        reason="needs torch.distributed (gloo) and Linux",
    ),
]
ENDS_WITHIN = 10.0  # seconds from the error line to the end of every process (a collective waits 30 min)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fail")
    return {
        "root": root,
        "model": save_model(tiny_llama(), root / "llama"),
        "train": write_jsonl(root / "train.jsonl", learnable_rows(24, seed=0)),
    }


@pytest.mark.parametrize(
    "spec, code, message",
    [
        ("0:data", 2, "error: rank 0: injected failure at data (LORAKIT_FAIL_AT)"),
        (
            "1:step3:oom",
            1,
            "error: rank 1: out of memory: CUDA out of memory (injected by LORAKIT_FAIL_AT at step3); try a smaller "
            "--batch-size or --max-length, --gradient-checkpointing, or --load-in-8bit",
        ),
    ],
    ids=["rank0-bad-input", "rank1-oom"],
)
def test_a_failing_rank_ends_the_run_at_once_with_its_one_line_error(setup, spec, code, message):
    out = setup["root"] / spec.replace(":", "-")
    args = ["train", "--model", str(setup["model"]), "--data", str(setup["train"]), "--out", str(out)]
    args += ["--max-steps", "8", "--batch-size", "2", "--nproc", "2", "--threads", "1"]
    env = {**os.environ, "LORAKIT_FAIL_AT": spec, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    errors, seen = [], None
    for line in proc.stderr:  # the error line, then the end of every process
        if line.startswith("error:"):
            errors.append(line.rstrip("\n"))
            seen = seen or time.monotonic()
    code_seen = proc.wait(timeout=60)
    ended = time.monotonic()
    stdout = proc.stdout.read()
    assert errors == [message], stdout
    assert code_seen == code
    assert seen is not None and ended - seen < ENDS_WITHIN
    assert "Traceback" not in stdout and "ChildFailedError" not in stdout  # no report from torchrun's launcher
    assert not (out / "adapter.safetensors").exists()
