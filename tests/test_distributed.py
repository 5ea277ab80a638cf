"""Data-parallel training on CPU (gloo, 2 processes through torchrun): the same adapter as one process with the
same effective batch, an exact resume after the whole run is killed, and a clear refusal to resume with another
number of processes. Every process imports torch + transformers, so each 2-process run costs ~10-15 s."""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_model, tiny_llama
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.training.checkpoint import RunState, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lorakit.training.config import build_config
from lorakit.training.distributed import World, without_nproc
from lorakit.training.loop import rank_share, train

runner = CliRunner()
pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not sys.platform.startswith("linux"),
        reason="needs torch.distributed (gloo) and Linux (/proc, process groups)",
    ),
]

ROWS = 37  # global micro-batches of 2 x 2 = 4: each epoch has one 1-example batch, where rank 1 runs a stand-in
OPTIONS = dict(batch_size=2, grad_accum=2, max_steps=20, lr=1e-2, warmup_steps=2, save_every=4, eval_every=10)
STEPS, FIRST_CHECKPOINT = OPTIONS["max_steps"], OPTIONS["save_every"]


def rows(n: int, seed: int) -> list[dict]:
    """Prompt/completion rows of varied lengths over the tiny vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.randrange(4, 80) for _ in range(rng.randrange(2, 7))]
        completion = " ".join(f"w{k + 10}" for k in words[:3])
        out.append({"prompt": " ".join(f"w{k}" for k in words), "completion": completion})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    files = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    for (name, path), n in zip(files.items(), (ROWS, 7)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed=len(name))))
    return {"model": save_model(tiny_llama(), root / "llama"), "root": root, **files}


def cli_args(setup: dict[str, Path], out: Path, **options) -> list[str]:
    args = ["train", "--model", str(setup["model"]), "--data", str(setup["train"])]
    args += ["--eval-data", str(setup["eval"]), "--out", str(out)]
    for key, value in {**OPTIONS, **options}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def env(root: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_CACHE": str(root / "cache")}


def lorakit_process(args: list[str], root: Path, log: Path, **popen) -> subprocess.Popen:
    """`python -m lorakit ARGS` in a fresh process (with --nproc it re-launches itself through torchrun)."""
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "lorakit", *args], env=env(root), stdout=f, stderr=subprocess.STDOUT, **popen
        )


def run_lorakit(args: list[str], root: Path, log: Path) -> None:
    code = lorakit_process(args, root, log).wait(timeout=300)
    assert code == 0, log.read_text()[-3000:]


def metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_mb")} for r in records]


def latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    except (OSError, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children first found, grandchildren after)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher, torchrun and the workers, as a machine failure would: nothing gets to clean up.

    torchrun starts each worker in a session of its own, so killing the launcher's process group alone would
    leave the workers training: stop the group first, then kill the workers, then the group.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGSTOP)
    for pid in [*descendants(proc.pid), -proc.pid]:  # a negative pid: the whole process group
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def kill_after_checkpoint(args: list[str], root: Path, cut: Path, first: int, steps: int) -> int:
    """Start `lorakit train ARGS` (2 processes), SIGKILL everything once checkpoint `first` exists in `cut`; the
    step of the newest checkpoint, checked to be before the run's end."""
    proc = lorakit_process([*args, "--nproc", "2"], root, root / "cut.log", start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while latest_step(cut) < first and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        kill_run(proc)
    killed_at = latest_step(cut)
    assert first <= killed_at < steps, (root / "cut.log").read_text()[-3000:]
    return killed_at


@pytest.fixture(scope="module")
def two_processes(setup) -> Path:
    """An uninterrupted 2-process run: `lorakit train --nproc 2`."""
    out = setup["root"] / "two"
    run_lorakit([*cli_args(setup, out), "--nproc", "2"], setup["root"], setup["root"] / "two.log")
    return out


def test_a_rank_with_nothing_left_in_a_short_batch_runs_a_stand_in_with_weight_zero():
    assert rank_share([7, 8, 9], World(0, 0, 2)) == ([7, 9], 1.0)
    assert rank_share([7, 8, 9], World(1, 1, 2)) == ([8], 1.0)
    assert rank_share([7], World(1, 1, 2)) == ([7], 0.0)


def test_a_checkpoint_restores_each_rank_its_own_random_state(tmp_path):
    """Dropout masks differ between ranks: every rank's generator is saved, and each rank gets its own back."""
    model = tiny_llama()
    lorakit.add_lora(model, "q,v", dropout=0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    states, draws = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state())
        draws.append(torch.rand(4))
    path = save_checkpoint(tmp_path, model, optimizer, RunState(step=3, world_size=2), rng=states)
    tensors = load_checkpoint(path).tensors
    for rank in (1, 0):
        set_rng_state(tensors, rank)
        assert torch.equal(torch.rand(4), draws[rank])


def test_launch_passes_the_command_line_without_nproc():
    argv = ["train", "--nproc", "2", "--data", "d.jsonl", "--nproc=4", "--resume"]
    assert without_nproc(argv) == ["train", "--data", "d.jsonl", "--resume"]


def test_two_processes_train_the_adapter_of_one_process_with_the_same_effective_batch(setup, two_processes, tmp_path):
    """2 processes x batch 2 = 1 process x batch 4, with accumulation, epochs that end in a short batch, and a
    distributed evaluation: same losses, same adapter up to float rounding."""
    options = {k: v for k, v in OPTIONS.items() if k != "save_every"}
    base = dict(model=str(setup["model"]), data=str(setup["train"]), eval_data=str(setup["eval"]))
    one = train(build_config({**base, "out": str(tmp_path / "one")}, {**options, "batch_size": 4}, source="test"))
    assert one.steps == STEPS and ROWS % 4 == 1  # 4 epochs, each with a 1-example batch

    a, b = load_file(str(one.adapter)), load_file(str(two_processes / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    single, double = metrics(tmp_path / "one"), metrics(two_processes)
    assert [r["step"] for r in double] == [r["step"] for r in single]
    for r1, r2 in zip(single, double):
        assert r1.keys() == r2.keys()
        for key in r1.keys() & {"loss", "eval_loss", "lr"}:
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), (r1["step"], key)
    assert sum("eval_loss" in r for r in double) == 3  # before training, at step 10, at the end


def test_a_killed_two_process_run_resumes_to_the_adapter_of_an_uninterrupted_one(setup, two_processes):
    """SIGKILL everything once a checkpoint exists; `--resume` (2 processes again, from config.yaml) ends with the
    same adapter bits and metrics as the run that was never interrupted."""
    cut, root = setup["root"] / "cut", setup["root"]
    killed_at = kill_after_checkpoint(cli_args(setup, cut), root, cut, FIRST_CHECKPOINT, STEPS)
    assert not (cut / "adapter.safetensors").exists()  # the run did not get to its end

    run_lorakit(["train", "--resume", "--out", str(cut)], root, root / "resume.log")  # nproc 2 from config.yaml
    assert f"resumed from {cut / 'checkpoints' / f'step-{killed_at:06d}'}" in (root / "resume.log").read_text()
    full, resumed = load_file(str(two_processes / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    assert metrics(cut) == metrics(two_processes)


def test_resuming_with_another_number_of_processes_is_refused(setup, two_processes, tmp_path):
    """The data position counts global batches and the RNG states are per process: the world size must match."""
    out = tmp_path / "copy"
    shutil.copytree(two_processes, out)
    result = runner.invoke(app, ["train", "--resume", "--out", str(out), "--nproc", "1"])
    checkpoint = out / "checkpoints" / f"step-{STEPS:06d}"
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {checkpoint}: saved by a run on 2 process(es), this run has 1; resume with --nproc 2"
    ]
