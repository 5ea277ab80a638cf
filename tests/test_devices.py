"""The GPU code paths that a CPU can check: refusals made up front (processes beyond the visible GPUs, bf16 on a GPU
without it, flash-attention or --compile where they cannot run), TF32's switch, the per-device RNG state, which
rank prints a distributed run's error, and the loss read from the device at logging steps only. CUDA itself is
faked with monkeypatch where a decision depends on it; tests/test_gpu.py runs the real thing."""

import math

import pytest
import torch
from tiny import learnable_rows, save_model, tiny_gpt2, write_jsonl
from typer.testing import CliRunner

from lorakit import devices
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.models import load_base
from lorakit.training import attention, compiling, failure, steploss
from lorakit.training.checkpoint import rng_state, set_rng_state
from lorakit.training.config import build_config
from lorakit.training.distributed import World, check_nproc
from lorakit.training.loop import train

runner = CliRunner()
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA "available" with one GPU of a settable compute capability."""
    gpu = {"capability": (8, 0), "count": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpu["count"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    return gpu


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_more_processes_than_visible_gpus_are_refused_by_name(fake_gpu, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(LorakitError) as e:
        check_nproc(2)
    assert str(e.value) == (
        "--nproc 2: only 1 GPU(s) visible (CUDA_VISIBLE_DEVICES=3); one process per GPU: use --nproc 1 or fewer"
    )
    fake_gpu["count"] = 2
    check_nproc(2)


def test_the_cli_refuses_nproc_beyond_the_gpus_before_anything_starts(fake_gpu, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "--nproc", "4"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --nproc 4: only 1 GPU(s) visible")
    assert len(result.stderr.splitlines()) == 1 and not out.exists()


def test_any_number_of_processes_runs_on_the_cpu():
    check_nproc(64)  # gloo: processes share the cores


def test_bf16_on_a_gpu_before_ampere_is_one_clear_error(fake_gpu):
    fake_gpu["capability"] = (7, 5)
    with pytest.raises(LorakitError, match=r"--precision bf16: Tesla T4 \(compute capability 7.5\) has no bf16"):
        devices.check_bf16("bf16", CUDA0)
    devices.check_bf16("fp16", CUDA0)
    devices.check_bf16("bf16", torch.device("cpu"))  # the CPU's autocast runs bf16
    fake_gpu["capability"] = (8, 0)
    devices.check_bf16("bf16", CUDA0)


def test_tf32_is_on_for_fp32_on_ampere_and_off_when_asked_or_unavailable(fake_gpu, tf32_flags):
    assert devices.set_tf32(CUDA0, "fp32", allowed=True) is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert devices.set_tf32(CUDA0, "fp32", allowed=False) is False  # --no-tf32
    assert not torch.backends.cuda.matmul.allow_tf32
    assert devices.set_tf32(CUDA0, "bf16", allowed=True) is False
    fake_gpu["capability"] = (7, 0)
    assert devices.set_tf32(CUDA0, "fp32", allowed=True) is False
    assert devices.set_tf32(torch.device("cpu"), "fp32", allowed=True) is False


def test_no_tf32_is_a_flag_and_a_recipe_key():
    assert build_config({}).tf32 is True
    assert build_config({"tf32": False}).tf32 is False


def test_flash_attention_where_it_cannot_run_is_refused_and_never_the_default(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(attention, "flash_installed", lambda: False)
    with pytest.raises(LorakitError, match="--attn-implementation flash_attention_2: the flash-attn package is not"):
        attention.resolve("flash_attention_2", cpu, "bf16")
    monkeypatch.setattr(attention, "flash_installed", lambda: True)
    assert attention.flash_problem(cpu, "bf16") == "it needs a CUDA GPU and this run is on the CPU"
    assert attention.flash_problem(CUDA0, "fp32").startswith("it runs in bf16 or fp16 only")
    assert attention.flash_problem(CUDA0, "bf16") is None
    assert attention.resolve("auto", cpu, "bf16") is None
    assert attention.resolve(None, cpu, "bf16") is None  # transformers' default (sdpa where supported)
    assert attention.resolve("eager", cpu, "fp32") == "eager"


def test_the_default_picks_flash_attention_where_it_runs_for_a_model_that_has_it(monkeypatch):
    monkeypatch.setattr(attention, "flash_installed", lambda: True)
    config = tiny_gpt2().config  # GPT-2 has a flash-attention path in transformers 5
    assert attention.resolve(None, CUDA0, "bf16", config, "causal-lm") == "flash_attention_2"
    assert attention.resolve(None, CUDA0, "fp32", config, "causal-lm") is None


def test_the_attention_implementation_reaches_the_model(tmp_path):
    folder = save_model(tiny_gpt2(), tmp_path / "gpt2")
    assert load_base(str(folder), attn_implementation="eager").config._attn_implementation == "eager"
    assert load_base(str(folder), attn_implementation="sdpa").config._attn_implementation == "sdpa"


def test_compile_is_refused_where_it_cannot_work(monkeypatch):
    cpu = torch.device("cpu")
    assert compiling.compile_problem(cpu, 8).startswith("a base in 8 bits (bitsandbytes)")
    assert compiling.compile_problem(cpu, 4).endswith("drop --compile or --load-in-4bit")
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    assert compiling.compile_problem(cpu, None).startswith("compiling on the CPU needs a C++ compiler")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(LorakitError, match="--compile: torch .* cannot compile on"):
        compiling.check(cpu, None)


def test_a_checkpoint_holds_one_gpu_state_per_process_and_the_cpu_only_on_the_cpu():
    assert set(rng_state(torch.device("cpu"))) == {"rng.cpu"}
    state = torch.get_rng_state()
    draw = torch.rand(3)
    set_rng_state({"rank1.rng.cpu": state, "rank1.rng.cuda.5": torch.zeros(8, dtype=torch.uint8)}, 1)
    assert torch.equal(torch.rand(3), draw)  # a legacy GPU state of another index is ignored on the CPU


def test_only_the_first_failing_rank_prints_and_rank0_otherwise(monkeypatch):
    monkeypatch.setitem(failure._reporter, "rank", None)
    monkeypatch.delenv("RANK", raising=False)
    assert failure.error_prefix() == ""
    monkeypatch.setenv("RANK", "1")
    assert failure.error_prefix() is None

    class Store:
        def __init__(self):
            self.values = {}

        def add(self, key, n):
            self.values[key] = self.values.get(key, 0) + n
            return self.values[key]

        def set(self, key, value):
            self.values[key] = value

    store = Store()
    failure._claim(store, World(1, 1, 2), 2)
    assert failure.error_prefix() == "rank 1: " and store.values[failure.CODE_KEY] == "2"
    monkeypatch.setitem(failure._reporter, "rank", None)
    failure._claim(store, World(0, 0, 2), 1)  # a second failure: silent, the first one's code stays
    assert failure.error_prefix() is None and store.values[failure.CODE_KEY] == "2"


def test_the_loss_tracker_finds_the_first_non_finite_step_on_the_device():
    tracker = steploss.LossTracker(World(), torch.device("cpu"))
    for step, value in enumerate([2.0, 1.0, math.nan, 0.5, math.inf], start=1):
        tracker.add(step, torch.tensor(value * 10, dtype=torch.float64), 10)
    loss, first_bad, bad_loss = tracker.read()
    assert first_bad == 3 and math.isnan(bad_loss) and math.isinf(loss)


def test_the_loss_is_read_from_the_device_at_logging_steps_only(tmp_path, monkeypatch):
    """8 steps logged every 4th: two reads for the log lines and one before the final evaluation and checkpoint."""
    reads = []
    original = steploss.LossTracker.read
    monkeypatch.setattr(steploss.LossTracker, "read", lambda self: reads.append(1) or original(self))
    folder = save_model(tiny_gpt2(), tmp_path / "gpt2")
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(16, seed=0))
    cfg = build_config({"model": str(folder), "data": str(data), "out": str(tmp_path / "run")})
    result = train(build_config({**cfg.__dict__, "max_steps": 8, "batch_size": 2, "log_every": 4}))
    assert result.steps == 8 and len(reads) == 3


def test_a_diverged_loss_is_caught_at_the_next_read_naming_its_step(tmp_path, monkeypatch):
    from lorakit.errors import TrainingDiverged

    folder = save_model(tiny_gpt2(), tmp_path / "gpt2")
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(16, seed=0))
    original = steploss.LossTracker.add

    def add(self, step, loss_sum, n_labels):  # step 3's loss is NaN
        original(self, step, loss_sum * (math.nan if step == 3 else 1.0), n_labels)

    monkeypatch.setattr(steploss.LossTracker, "add", add)
    options = {"model": str(folder), "data": str(data), "out": str(tmp_path / "run"), "max_steps": 8}
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3; training stopped"):
        train(build_config({**options, "batch_size": 2, "log_every": 4}))
