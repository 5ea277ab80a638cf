"""--fsdp on CPU (gloo, 2 processes through torchrun): the frozen base sharded per transformer block, each rank
holding about half of it; the same adapter as one process with the same effective batch (gradient checkpointing
and accumulation on); an exact resume after the whole run is killed; another process count refused by name."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import OPTIONS, ROWS, env, kill_after_checkpoint, metrics, rows, run_lorakit
from tiny import save_model, tiny_llama
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.training.config import build_config
from lorakit.training.loop import train

runner = CliRunner()
needs_torchrun = pytest.mark.skipif(
    not torch.distributed.is_available() or not sys.platform.startswith("linux"),
    reason="needs torch.distributed (gloo) and Linux (/proc, process groups)",
)
FSDP = dict(OPTIONS, max_steps=8, eval_every=4, gradient_checkpointing=True)  # 2 epochs, each with a short batch
STEPS, FIRST_CHECKPOINT = FSDP["max_steps"], FSDP["save_every"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    files = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    for (name, path), n in zip(files.items(), (ROWS, 7)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed=len(name))))
    return {"model": save_model(tiny_llama(), root / "llama"), "root": root, **files}


def cli_args(setup: dict[str, Path], out: Path) -> list[str]:
    args = ["train", "--model", str(setup["model"]), "--data", str(setup["train"])]
    args += ["--eval-data", str(setup["eval"]), "--out", str(out), "--fsdp"]
    for key, value in FSDP.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


@pytest.fixture(scope="module")
def sharded(setup) -> Path:
    """An uninterrupted 2-process --fsdp run."""
    out = setup["root"] / "two"
    run_lorakit([*cli_args(setup, out), "--nproc", "2"], setup["root"], setup["root"] / "two.log")
    return out


@pytest.mark.multiprocess
@needs_torchrun
def test_fsdp_two_processes_train_the_adapter_of_one_process_with_the_same_effective_batch(setup, sharded, tmp_path):
    options = {k: v for k, v in FSDP.items() if k != "save_every"}
    base = dict(model=str(setup["model"]), data=str(setup["train"]), eval_data=str(setup["eval"]))
    one = train(build_config({**base, "out": str(tmp_path / "one")}, {**options, "batch_size": 4}, source="test"))
    a, b = load_file(str(one.adapter)), load_file(str(sharded / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    single, double = metrics(tmp_path / "one"), metrics(sharded)
    assert [r["step"] for r in double] == [r["step"] for r in single]
    for r1, r2 in zip(single, double):
        for key in r1.keys() & {"loss", "eval_loss", "lr"}:
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), (r1["step"], key)
    config = (sharded / "config.yaml").read_text()
    assert "fsdp: true" in config and "nproc: 2" in config


@pytest.mark.multiprocess
@needs_torchrun
def test_each_rank_holds_about_half_of_the_base(setup):
    """Measured on the local shards of every parameter, as each rank builds the model of a --fsdp run."""
    script = Path(__file__).with_name("fsdp_shards.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(
        [*command, str(setup["model"]), str(setup["train"]), "fsdp"],
        env={**env(setup["root"]), "PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    ranks = json.loads(line.removeprefix("RESULT "))
    assert len(ranks) == 2
    whole = ranks[0]["whole_bytes"]
    assert sum(r["local_bytes"] for r in ranks) == whole  # every byte on exactly one rank
    for r in ranks:
        assert r["local_bytes"] == pytest.approx(whole / 2, rel=0.05)


@pytest.mark.multiprocess
@needs_torchrun
def test_a_killed_fsdp_run_resumes_bit_identical(setup, sharded):
    cut, root = setup["root"] / "cut", setup["root"]
    kill_after_checkpoint(cli_args(setup, cut), root, cut, FIRST_CHECKPOINT, STEPS)
    run_lorakit(["train", "--resume", "--out", str(cut)], root, root / "resume.log")  # nproc 2 from config.yaml
    full, resumed = load_file(str(sharded / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    assert metrics(cut) == metrics(sharded)


@pytest.mark.multiprocess
@needs_torchrun
def test_resuming_an_fsdp_run_with_another_number_of_processes_is_refused(setup, sharded, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(sharded, out)
    result = runner.invoke(app, ["train", "--resume", "--out", str(out), "--nproc", "1"])
    checkpoint = out / "checkpoints" / f"step-{STEPS:06d}"
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {checkpoint}: saved by a run on 2 process(es), this run has 1; resume with --nproc 2"
    ]


def test_fsdp_in_one_process_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(setup["model"]), "--data", str(setup["train"]), "--out", str(out), "--fsdp"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: --fsdp shards the base over several processes: run it with --nproc N")


@pytest.mark.parametrize(
    "flag, says",
    [
        ("--load-in-4bit", "fsdp and load_in_4bit: FSDP cannot shard a bitsandbytes base"),
        ("--load-in-8bit", "fsdp and load_in_8bit: FSDP cannot shard a bitsandbytes base"),
        ("--eval-generate", "fsdp and eval_generate: generation runs in one process"),
    ],
)
def test_fsdp_with_what_it_cannot_do_is_refused_before_anything_loads(setup, tmp_path, flag, says):
    out = tmp_path / "run"
    args = ["train", "--model", str(setup["model"]), "--data", str(setup["train"]), "--out", str(out)]
    args += ["--eval-data", str(setup["eval"])]
    result = runner.invoke(app, [*args, "--fsdp", "--nproc", "2", flag])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and says in line
    assert not out.exists()


def test_the_dry_run_gives_memory_per_process_under_fsdp(setup):
    """1/N of the frozen weights, plus two gathered blocks and the embeddings and head (the root group), per
    process; without launching processes."""
    from lorakit.training.memory import estimate_memory

    config = tiny_llama().config
    whole = estimate_memory(config, "q,v", 4)
    model = tiny_llama()
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    rest = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n) * 4
    for n in (2, 8):
        sharded = estimate_memory(config, "q,v", 4, fsdp=n)
        assert sharded.weights_bytes == -(-whole.weights_bytes // n) + 2 * block + rest
        assert sharded.lora_state_bytes == whole.lora_state_bytes  # LoRA stays whole on every process
    args = ["train", "--model", str(setup["model"]), "--data", str(setup["train"]), "--dry-run", "--fsdp"]
    result = runner.invoke(app, [*args, "--nproc", "2"])  # a dry run launches no processes
    assert result.exit_code == 0, result.output
