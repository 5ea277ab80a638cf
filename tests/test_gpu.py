"""What only a CUDA device can show (every test is marked `gpu` and skipped without one; `make gpu-check` runs them):
the fused LoRA layer on CUDA, a few training steps in every precision for both tasks, 8-bit and 4-bit bases, DDP
over NCCL, the --dry-run estimate against the real peak, merging on the GPU, no host-device synchronisation
between logging steps, TF32, packing and compiling on the GPU, generation on the GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import learnable_rows, randomize_lora, save_model, tiny_bert, tiny_gpt2, tiny_llama, write_jsonl

import lorakit
from lorakit.lora.layer import LoRALayer
from lorakit.training import loop
from lorakit.training.config import FIELDS, build_config

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)
needs_bf16 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability(0) < (8, 0), reason="bf16 needs Ampere or newer"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    classes = [{"text": r["prompt"], "label": i % 2} for i, r in enumerate(learnable_rows(16, seed=2))]
    return {
        "gpt2": save_model(tiny_gpt2(), root / "gpt2"),
        "llama": save_model(tiny_llama(), root / "llama"),
        "bert": save_model(tiny_bert(), root / "bert"),
        "train": write_jsonl(root / "train.jsonl", learnable_rows(16, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", learnable_rows(6, seed=1)),
        "classes": write_jsonl(root / "classes.jsonl", classes),
    }


def run(tmp_path, **options):
    cfg = build_config({"out": str(tmp_path / "run"), "batch_size": 4, "lr": 1e-2, **options}, source="test")
    return loop.train(cfg)


def reference(layer, x):
    """The LoRA layer as plain autograd ops (no fused function)."""
    out = layer.base(x)
    for s, a, b in zip(layer.slices, layer.lora_A, layer.lora_B):
        start, stop = (0, out.shape[-1]) if s.name is None else (s.start, s.stop)
        part = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a) * layer.scaling, b)
        out = torch.cat([out[..., :start], out[..., start:stop] + part.to(out.dtype), out[..., stop:]], dim=-1)
    return out


@pytest.mark.parametrize("autocast", [False, pytest.param(True, marks=needs_bf16)], ids=["fp32", "bf16-autocast"])
def test_the_fused_lora_layer_equals_plain_autograd_on_cuda(autocast):
    torch.manual_seed(0)
    layer = LoRALayer(torch.nn.Linear(64, 96, device=CUDA), rank=8, alpha=16).to(CUDA)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(4, 7, 64, device=CUDA)
    grad = torch.randn(4, 7, 96, device=CUDA)
    results = []
    for forward in (layer.forward, lambda x: reference(layer, x)):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = forward(xi)
        out.backward(grad.to(out.dtype))
        results.append([out.float(), xi.grad.float(), *(p.grad.float() for p in layer.parameters() if p.requires_grad)])
    tol = 2e-2 if autocast else 1e-4  # fp32 on CUDA: TF32 may be on for other tests' matmuls
    for mine, expected in zip(*results):
        torch.testing.assert_close(mine, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16), "fp16"])
@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_three_steps_train_on_the_gpu_in_every_precision(files, tmp_path, precision, task):
    data = {"model": str(files["gpt2"]), "data": str(files["train"])}
    if task == "classification":
        data = {"model": str(files["bert"]), "data": str(files["classes"]), "task": task}
    result = run(tmp_path, **data, precision=precision, max_steps=3)
    assert result.steps == 3 and result.lora_changed
    assert 0 < result.peak_memory_mb <= result.peak_reserved_mb  # CUDA's allocated and reserved peaks
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("peak_reserved_mb" in r for r in records if "loss" in r)


def test_an_8bit_base_trains_on_the_gpu(files, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = run(tmp_path, model=str(files["llama"]), data=str(files["train"]), load_in_8bit=True, max_steps=3)
    assert result.steps == 3 and result.lora_changed


def test_a_4bit_base_trains_on_the_gpu(files, tmp_path):
    pytest.importorskip("bitsandbytes")
    if "load_in_4bit" not in FIELDS:
        pytest.skip("--load-in-4bit has not landed in this checkout")
    options = {"load_in_4bit": True, "precision": "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"}
    result = run(tmp_path, model=str(files["llama"]), data=str(files["train"]), max_steps=3, **options)
    assert result.steps == 3 and result.lora_changed


def test_no_host_device_sync_between_logging_steps(files, tmp_path, monkeypatch):
    """torch's sync debug mode reports every host-device synchronisation inside a training step (after the first,
    which sets up AdamW's state) as a warning with the Python line that caused it: none is lorakit's (the loss is
    read at logging steps only, outside the step). transformers' own mask code may synchronise; that is not
    counted here."""
    import warnings

    original = loop.train_step
    calls, caught = [], []

    def watched(run_, state, stream, lr, tracker):
        calls.append(state.step)
        if len(calls) == 1:
            return original(run_, state, stream, lr, tracker)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(run_, state, stream, lr, tracker)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                caught.extend(w for w in seen if "synchroniz" in str(w.message))

    monkeypatch.setattr(loop, "train_step", watched)
    result = run(tmp_path, model=str(files["llama"]), data=str(files["train"]), max_steps=6, log_every=3)
    assert result.steps == 6 and len(calls) == 6
    package = os.path.dirname(lorakit.__file__)
    ours = [f"{w.filename}:{w.lineno}" for w in caught if os.path.abspath(w.filename).startswith(package)]
    assert not ours, ours


def test_tf32_is_on_for_fp32_and_off_with_no_tf32(files, tmp_path):
    if torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("TF32 needs Ampere or newer")
    run(tmp_path, model=str(files["gpt2"]), data=str(files["train"]), max_steps=1)
    assert torch.backends.cuda.matmul.allow_tf32
    run(tmp_path, model=str(files["gpt2"]), data=str(files["train"]), max_steps=1, tf32=False, overwrite=True)
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flash_attention_2"])
def test_packing_trains_on_the_gpu_with_each_attention(files, tmp_path, attn):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    precision = "bf16" if attn == "flash_attention_2" else "fp32"
    options = dict(packing=True, attn_implementation=attn, precision=precision, max_steps=3, max_length=64)
    result = run(tmp_path, model=str(files["llama"]), data=str(files["train"]), **options)
    assert result.steps == 3 and result.lora_changed


def test_compile_trains_on_the_gpu_to_the_loss_of_eager(files, tmp_path):
    pytest.importorskip("triton")
    options = dict(model=str(files["llama"]), data=str(files["train"]), max_steps=4, tf32=False)
    eager = run(tmp_path / "eager", **options)
    compiled = run(tmp_path / "compiled", **options, compile=True)
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-3)


def test_merge_on_the_gpu_equals_merge_on_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    merged = []
    for device in ("cpu", "cuda"):
        model = tiny_llama()
        lorakit.add_lora(model, "all-linear", rank=4)
        randomize_lora(model)
        model.to(device)
        lorakit.merge_adapter(model)
        merged.append({k: v.float().cpu() for k, v in model.state_dict().items() if "lora_" not in k})
    for name, value in merged[0].items():
        torch.testing.assert_close(merged[1][name], value, rtol=1e-6, atol=1e-6)


def test_dry_run_estimate_is_within_15_percent_of_the_real_peak(tmp_path):
    """The packaged SmolLM2-135M on the demo data (one epoch, batch 8): the estimate against what CUDA allocated at
    most while training (counted from after the base's evaluation)."""
    from lorakit.demo import write_demo_data
    from lorakit.training.memory import dry_run_estimate

    (tmp_path / "demo").mkdir()
    train, _ = write_demo_data(tmp_path / "demo")
    cfg = build_config({"data": str(train), "out": str(tmp_path / "run"), "batch_size": 8, "max_steps": 20})
    estimate = dry_run_estimate(cfg).peak_bytes / 2**20
    result = loop.train(cfg)
    assert result.peak_memory_mb == pytest.approx(estimate, rel=0.15), (estimate, result.peak_memory_mb)


def test_generation_and_the_demo_run_on_the_gpu(tmp_path, monkeypatch):
    import lorakit.models
    from lorakit.demo import before_after_examples, write_demo_data
    from lorakit.evaluation.generation import load_adapted

    adapted = load_adapted(None, None)  # what `lorakit generate` and `chat` use
    assert next(adapted.model.parameters()).device.type == "cuda"

    class Loaded(Exception):
        pass

    asked = {}

    def load_base(source, **options):
        asked.update(options)
        raise Loaded

    monkeypatch.setattr(lorakit.models, "load_base", load_base)
    (tmp_path / "demo").mkdir()
    _, eval_path = write_demo_data(tmp_path / "demo")
    with pytest.raises(Loaded):
        before_after_examples(tmp_path / "adapter.safetensors", eval_path)
    assert asked["device"].type == "cuda"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 visible GPUs")
def test_ddp_over_nccl_trains_on_two_gpus(files, tmp_path):
    out = tmp_path / "ddp"
    args = ["train", "--model", str(files["llama"]), "--data", str(files["train"]), "--out", str(out)]
    args += ["--max-steps", "4", "--batch-size", "2", "--nproc", "2"]
    proc = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 2 x 2 process(es)" in proc.stdout.replace("\n", " ")
    assert (out / "adapter.safetensors").is_file()


def test_more_processes_than_gpus_are_refused(files, tmp_path):
    n = torch.cuda.device_count() + 1
    args = ["train", "--model", str(files["llama"]), "--data", str(files["train"]), "--out", str(tmp_path / "x")]
    proc = subprocess.run([sys.executable, "-m", "lorakit", *args, "--nproc", str(n)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --nproc {n}: only")
