"""`--resume` after anything that can stop a run: a kill at each point of a checkpoint write (the newest complete
checkpoint wins, whatever `checkpoints/latest` says), files flushed before they are published, pruning by step
number, damaged checkpoints and metrics, leftovers of killed writers, SIGTERM, changed settings, two runs at once."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_gpt2
from typer.testing import CliRunner

import lorakit
import lorakit.training.checkpoint
import lorakit.training.loop
from lorakit.cli import app
from lorakit.files import folder_lock
from lorakit.training.checkpoint import RunState, latest_checkpoint, load_checkpoint, save_checkpoint, step_folders
from lorakit.training.config import build_config, read_recipe
from lorakit.training.loop import StopFlag, lr_at, train

runner = CliRunner()

# 10 rows in batches of 2; checkpoints at steps 2, 4 and 6 (the end); dropout, so the RNG state matters too.
OPTIONS = dict(max_steps=6, batch_size=2, lr=1e-2, warmup_steps=1, dropout=0.1, save_every=2, eval_every=2)


@pytest.fixture(scope="module", autouse=True)
def cpu_only():
    """Every run here on the CPU in fp32, where a resumed run is bit-identical; and a forked child could not use
    CUDA anyway once its parent started it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


def config(model: Path, data: dict, out: Path, **options):
    base = dict(model=str(model), data=str(data["train"]), eval_data=str(data["eval"]), out=str(out), **OPTIONS)
    return build_config(base, options, source="test")


def cli_args(model: Path, data: dict, out: Path) -> list[str]:
    """`lorakit train` with the same settings as `config(model, data, out)`."""
    args = ["train", "--model", str(model), "--data", str(data["train"]), "--eval-data", str(data["eval"])]
    for key, value in OPTIONS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [*args, "--out", str(out)]


@pytest.fixture(scope="module")
def full(model, data, tmp_path_factory):
    """The run folder of an uninterrupted run: what every resumed run must end with."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(config(model, data, out))
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_mb")} for r in records]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`; the lock's content (its holder's pid) left out."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else b"" if p.name == ".lorakit.lock" else p.read_bytes()
        for p in folder.rglob("*")
    }


def assert_same_run(full: Path, out: Path) -> None:
    """Bit-identical: the adapter, the checkpoints kept (adapter, AdamW moments, RNG, state), metrics, the files."""
    for name in ["adapter.safetensors"] + [f"checkpoints/{p.name}/adapter.safetensors" for p in step_folders(full)]:
        a, b = load_file(str(full / name)), load_file(str(out / name))
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    for folder in step_folders(full):
        a, b = (load_file(str(f / folder.name / "optimizer.safetensors")) for f in (full, out / "checkpoints"))
        a_state, b_state = (
            json.loads((f / folder.name / "state.json").read_text()) for f in (full, out / "checkpoints")
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder.name
        assert a_state == b_state, folder.name
    assert without_timing(metrics(out)) == without_timing(metrics(full))
    assert tree(out) == tree(full)  # nothing left behind, nothing missing
    assert (out / "checkpoints" / "latest").read_text() == (full / "checkpoints" / "latest").read_text()


def run_killed_at(cfg, point: str, occurrence: int) -> None:
    """Train `cfg` in a child process that dies on the spot (os._exit: no clean-up, no finally, no atexit) the
    `occurrence`-th time a checkpoint write reaches `point`."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            reached = []

            def crash(name: str) -> None:
                if name == point:
                    reached.append(name)
                    if len(reached) == occurrence:
                        os._exit(9)

            lorakit.training.checkpoint.crash_point = crash
            train(cfg)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9, f"the run never reached {point!r} #{occurrence}"


def killed_after_step_4(model: Path, data: dict, out: Path) -> Path:
    """A run killed once its checkpoint of step 4 is complete and `latest` names it (steps 5 and 6 not run)."""
    run_killed_at(config(model, data, out), "pointer", 2)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. A kill at any point of a checkpoint write; the pointer never decides

# point -> (the how-many-th time the run reaches it when it is killed, the step --resume continues from).
# Checkpoints are written at steps 2, 4 and 6; the first folder pruned is step 2's, at step 6.
CRASHES = {
    "adapter": (2, 2),  # step 4's folder is half written (a hidden .tmp folder): step 2 is the newest complete
    "optimizer": (2, 2),
    "state": (2, 2),
    "published": (2, 4),  # step-000004 is complete, `latest` still names step-000002
    "pointer": (2, 4),
    "pruned": (1, 6),  # step 6 complete, `latest` names it, step 2 removed: --resume only finishes
}


def test_every_crash_point_of_the_checkpoint_write_is_tested():
    source = Path(lorakit.training.checkpoint.__file__).read_text()
    assert set(re.findall(r"crash_point\(\"(\w+)\"\)", source)) == set(CRASHES)


@pytest.mark.parametrize("point", CRASHES)
def test_a_run_killed_anywhere_in_a_checkpoint_write_resumes_bit_identical(model, data, full, tmp_path, point):
    occurrence, newest_complete = CRASHES[point]
    out = tmp_path / "run"
    run_killed_at(config(model, data, out), point, occurrence)
    assert not (out / "adapter.safetensors").exists()
    assert latest_checkpoint(out) == out / "checkpoints" / f"step-{newest_complete:06d}"

    resumed = train(config(model, data, out, resume=True))
    assert resumed.resumed_from == newest_complete and resumed.steps == OPTIONS["max_steps"]
    assert_same_run(full, out)


POINTERS = {
    "missing folder": "step-000099\n",
    "older folder": "step-000002\n",
    "not a step folder": "../../elsewhere\n",
    "no pointer": None,
}


@pytest.mark.parametrize("pointer", POINTERS.values(), ids=POINTERS.keys())
def test_the_newest_complete_checkpoint_wins_whatever_latest_says(model, data, full, tmp_path, pointer):
    out = killed_after_step_4(model, data, tmp_path / "run")
    latest = out / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_text(pointer)
    assert train(config(model, data, out, resume=True)).resumed_from == 4
    assert_same_run(full, out)


# ---------------------------------------------------------------------------------------------------------------
# 2. Flushed to disk before the rename that publishes them


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsynced descriptor through /proc (Linux)")
def test_files_are_flushed_before_the_rename_that_publishes_them(model, data, tmp_path, monkeypatch):
    """Every `.NAME.*.tmp` renamed to NAME (a checkpoint folder, the adapter, `latest`, config.yaml, metrics.jsonl
    on resume, ...) had its content and, for a folder, every file in it fsynced before the rename; the folder that
    holds NAME is fsynced after it (the rename itself), before anything else is published."""
    events: list[tuple] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def recorded(real):
        def rename(src, dst, *args, **kwargs):
            src, dst = os.path.realpath(src), os.path.realpath(dst)
            inside = [os.path.join(f, n) for f, dirs, files in os.walk(src) for n in dirs + files]
            events.append(("rename", src, dst, inside))
            return real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", recorded(os.replace))
    monkeypatch.setattr(os, "rename", recorded(os.rename))
    out = tmp_path / "run"
    train(config(model, data, out, max_steps=3))  # checkpoints at steps 2 and 3
    train(config(model, data, out, max_steps=3, resume=True))  # rewrites metrics.jsonl (a resume from the end)

    publishing = [
        i for i, e in enumerate(events) if e[0] == "rename" and re.fullmatch(r"\..+\.tmp", os.path.basename(e[1]))
    ]
    published = {os.path.relpath(events[i][2], out.resolve()) for i in publishing}
    expected = {".lorakit", "config.yaml", "metrics.jsonl", "loss.png", "adapter.safetensors", "checkpoints/latest"}
    assert expected | {"checkpoints/step-000002", "checkpoints/step-000003"} <= published
    for n, i in enumerate(publishing):
        _, src, dst, inside = events[i]
        flushed = {e[1] for e in events[:i] if e[0] == "fsync"}
        assert src in flushed, f"{dst} published before it was flushed"
        assert not set(inside) - flushed, f"{dst} published before {sorted(set(inside) - flushed)} were flushed"
        if os.path.basename(dst) == "step-000002":
            assert {os.path.basename(p) for p in inside} >= {"adapter.safetensors", "optimizer.safetensors"}
        until = publishing[n + 1] if n + 1 < len(publishing) else len(events)
        assert ("fsync", os.path.dirname(dst)) in events[i + 1 : until], f"the rename to {dst} was not flushed"


# ---------------------------------------------------------------------------------------------------------------
# 3. Pruning by step number


def test_pruning_keeps_the_newest_checkpoints_by_number_not_by_name(tmp_path):
    """step-1000000 sorts before step-999998 as text: pruning by name would delete the newest checkpoint."""
    net = tiny_gpt2()
    lorakit.add_lora(net, "q,v")
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8]])
    net(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    root = tmp_path / "checkpoints"
    for step in (999_998, 999_999, 1_000_000):
        save_checkpoint(tmp_path, net, optimizer, RunState(step=step))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1000000", "step-999999"]
    assert step_folders(root) == [root / "step-999999", root / "step-1000000"]
    assert latest_checkpoint(tmp_path) == root / "step-1000000"
    assert (root / "latest").read_text() == "step-1000000\n"
    assert load_checkpoint(root / "step-1000000").state.step == 1_000_000

    # Folders made by hand (or by an older version) sort by number as well, whatever their zero padding.
    (root / "step-0999997").mkdir()
    (root / "step-10").mkdir()
    assert [p.name for p in step_folders(root)] == ["step-10", "step-0999997", "step-999999", "step-1000000"]


# ---------------------------------------------------------------------------------------------------------------
# 4. A damaged checkpoint: one error line naming the file, nothing changed


def _edit_state(change):
    def edit(folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps(change(state)))

    return edit


def _edit_tensors(change):
    def edit(folder: Path) -> None:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "optimizer.safetensors"))

    return edit


def _truncate(name: str):
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


DAMAGE = {
    # case: (damage done to step-000004, the file the error names, what the line says)
    "state.json is a list": (_edit_state(lambda s: [s]), "state.json", "expected a JSON object, got list"),
    "state.json without step": (
        _edit_state(lambda s: {k: v for k, v in s.items() if k != "step"}),
        "state.json",
        "no 'step'",
    ),
    "state.json step is text": (_edit_state(lambda s: {**s, "step": "4"}), "state.json", "step is '4'"),
    "state.json not JSON": (lambda f: (f / "state.json").write_text('{"step": 4,'), "state.json", "unreadable"),
    "adam_steps a list": (_edit_state(lambda s: {**s, "adam_steps": [4]}), "state.json", "adam_steps is [4]"),
    "adam_steps emptied": (
        _edit_state(lambda s: {**s, "adam_steps": {}}),  # would resume AdamW from scratch, silently
        "state.json",
        "AdamW step counts for 0 parameter(s), but",
    ),
    "adam_steps negative": (
        _edit_state(lambda s: {**s, "adam_steps": {**s["adam_steps"], "0": -1}}),
        "state.json",
        "AdamW step count -1 for parameter 0",
    ),
    "optimizer truncated": (_truncate("optimizer.safetensors"), "optimizer.safetensors", "unreadable"),
    "optimizer moment mis-shaped": (
        _edit_tensors(lambda t: t.update({"exp_avg.0": torch.zeros(3)})),
        "optimizer.safetensors",
        "exp_avg of parameter 0 is torch.float32 (3,)",
    ),
    "optimizer moment missing": (
        _edit_tensors(lambda t: t.pop("exp_avg_sq.1")),
        "optimizer.safetensors",
        "exp_avg_sq of parameter 1 is missing",
    ),
    "RNG of the wrong size": (
        _edit_tensors(lambda t: t.update({"rng.cpu": torch.zeros(10, dtype=torch.uint8)})),
        "optimizer.safetensors",
        "the CPU RNG state is torch.uint8 (10,)",
    ),
    "RNG missing": (_edit_tensors(lambda t: t.pop("rng.cpu")), "optimizer.safetensors", "no RNG state"),
    "adapter garbage": (
        lambda f: (f / "adapter.safetensors").write_bytes(b"\x00garbage" * 10),
        "adapter.safetensors",
        "not a readable safetensors file",
    ),
    "adapter truncated": (_truncate("adapter.safetensors"), "adapter.safetensors", "not a readable safetensors"),
}


@pytest.mark.parametrize("case", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_is_one_error_line_and_changes_nothing(model, data, tmp_path, case):
    damage, name, says = case
    out = killed_after_step_4(model, data, tmp_path / "run")
    damage(out / "checkpoints" / "step-000004")
    before = snapshot(out)
    result = runner.invoke(app, ["train", "--resume", "--out", str(out)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {out / 'checkpoints' / 'step-000004' / name}: ") and says in line, line
    assert "Traceback" not in result.output
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------------------------
# 5. A damaged last line of metrics.jsonl

TAILS = {
    "half a line": b'{"step": 5, "epoch": 1.0, "loss": 4.4',
    "zeros (a power cut)": b"\x00" * 64,
    "not UTF-8": b'{"step": 5, "loss": "\xff\xfe"}\n',
    "not an object": b"[5]\n",
}


@pytest.mark.parametrize("tail", TAILS.values(), ids=TAILS.keys())
def test_a_damaged_last_metrics_line_is_dropped_on_resume(model, data, full, tmp_path, tail):
    out = killed_after_step_4(model, data, tmp_path / "run")
    with (out / "metrics.jsonl").open("ab") as f:
        f.write(tail)
    result = runner.invoke(app, ["train", "--resume", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n") and all(isinstance(json.loads(line), dict) for line in text.splitlines())
    assert_same_run(full, out)


# ---------------------------------------------------------------------------------------------------------------
# 6. What killed writers leave behind


def test_the_next_start_removes_what_killed_writers_left(model, data, full, tmp_path):
    out = killed_after_step_4(model, data, tmp_path / "run")
    left = [
        out / "checkpoints" / ".step-000006.k2j3x9.tmp" / "adapter.safetensors",  # a checkpoint being written
        out / "checkpoints" / ".step-000002.old" / "state.json",  # a checkpoint being pruned
        out / "checkpoints" / ".latest.a8f3.tmp",
        out / ".adapter.safetensors.q1w2e3.tmp",
        out / ".metrics.jsonl.z9.tmp",
        out / ".config.yaml.b7.tmp",
    ]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    result = runner.invoke(app, ["train", "--resume", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not [p for p in left if p.exists()]
    assert_same_run(full, out)  # the same files as the uninterrupted run: the hidden folders are gone too


# ---------------------------------------------------------------------------------------------------------------
# 7. SIGTERM: what schedulers send


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_ends_bit_identical(model, data, full, tmp_path, monkeypatch):
    def lr_then_sigterm(step, *args):
        if step == 2:  # while step 3 runs
            handler = signal.getsignal(signal.SIGTERM)
            assert isinstance(getattr(handler, "__self__", None), StopFlag), "StopFlag does not handle SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, *args)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(lorakit.training.loop, "lr_at", lr_then_sigterm)
    out = tmp_path / "run"
    result = runner.invoke(app, cli_args(model, data, out))
    monkeypatch.setattr(lorakit.training.loop, "lr_at", lr_at)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    checkpoint = out / "checkpoints" / "step-000003"
    assert result.exit_code == 143, result.output
    assert result.stderr.splitlines() == [
        f"error: interrupted at step 3 (SIGTERM); checkpoint saved in {checkpoint}; continue with --resume --out {out}"
    ]
    assert latest_checkpoint(out) == checkpoint and not (out / "adapter.safetensors").exists()

    resumed = runner.invoke(app, ["train", "--resume", "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    for name, tensor in load_file(str(full / "adapter.safetensors")).items():
        assert torch.equal(tensor, load_file(str(out / "adapter.safetensors"))[name]), name
    assert without_timing(metrics(out)) == without_timing(metrics(full))


@pytest.mark.slow
def test_sigterm_to_a_real_lorakit_process(model, data, tmp_path):
    """The same through `python -m lorakit` in its own process, SIGTERM sent once it trains."""
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(data["train"]), "--batch-size", "2", "--threads", "1"]
    args += ["--max-steps", "100000", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(lorakit.__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *args], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started training"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    line = stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"error: interrupted at step (\d+) \(SIGTERM\); checkpoint saved in (\S+); continue with .*", line)
    assert m, line
    assert latest_checkpoint(out) == Path(m[2]) == out / "checkpoints" / f"step-{int(m[1]):06d}"
    assert load_checkpoint(Path(m[2])).state.step == int(m[1])


# ---------------------------------------------------------------------------------------------------------------
# 8. Settings changed on --resume: refused, or recorded as a change at the step; never history rewritten

REFUSED = {
    "lr": (["--lr", "0.5"], "lr: 0.01 -> 0.5"),
    "batch size": (["--batch-size", "4"], "batch_size: 2 -> 4"),
    "seed": (["--seed", "7"], "seed: 42 -> 7"),
    "max steps (extending the run)": (["--max-steps", "8"], "max_steps: 6 -> 8"),
    "alpha": (["--alpha", "8"], "alpha: 32.0 -> 8.0"),
    "rank": (["--rank", "8"], "rank: 4 -> 8"),
    "grad accum": (["--grad-accum", "2"], "grad_accum: 1 -> 2"),
    "warmup": (["--warmup-steps", "0"], "warmup_steps: 1 -> 0"),
    "dropout": (["--dropout", "0.0"], "dropout: 0.1 -> 0.0"),
    "targets": (["--targets", "q,k,v"], "targets: 'q,v' -> 'q,k,v'"),
    "precision": (["--precision", "bf16"], "precision: 'fp32' -> 'bf16'"),
}


def test_resume_refuses_settings_that_would_mix_two_runs(model, data, full, tmp_path, monkeypatch):
    out = killed_after_step_4(model, data, tmp_path / "run")
    before = snapshot(out)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(lorakit.training.loop, "load_base", no_model)
    recipe = tmp_path / "recipe.yaml"  # the run's own config.yaml, its learning rate changed
    recipe.write_text((out / "config.yaml").read_text().replace("lr: 0.01\n", "lr: 0.02\n"))
    cases = [(["--resume", "--out", str(out), *flags], change) for flags, change in REFUSED.values()]
    cases.append(([str(recipe), "--resume", "--out", str(out)], "lr: 0.01 -> 0.02"))
    cases.append(([str(recipe), "--resume", "--out", str(out), "--lr", "0.01", "--seed", "1"], "seed: 42 -> 1"))
    for args, change in cases:
        result = runner.invoke(app, ["train", *args])
        assert result.exit_code == 2, (args, result.output)
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: {out}: --resume continues the run as it was configured") and change in line
        assert "start a new run (another --out)" in line
        assert snapshot(out) == before, args

    # The same settings, from a recipe this time: resumed.
    monkeypatch.undo()
    recipe.write_text((out / "config.yaml").read_text())
    result = runner.invoke(app, ["train", str(recipe), "--resume", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_run(full, out)


def test_a_run_from_before_group_by_length_resumes_with_the_grouped_batches_it_drew(model, data, tmp_path, monkeypatch):
    """Until 2026-12-03 every run drew length-grouped batches and its config.yaml had no group_by_length key: a
    resume continues those batches (the checkpoint's batch index points into them), not today's random default."""
    out = killed_after_step_4(model, data, tmp_path / "run")
    config = out / "config.yaml"
    config.write_text(re.sub(r"(?m)^group_by_length: false\n", "", config.read_text()))
    assert "group_by_length" not in config.read_text()
    before = snapshot(out)
    from lorakit.cli import _train_config

    assert _train_config(None, {"resume": True, "out": str(out)}).group_by_length is True

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(lorakit.training.loop, "load_base", no_model)
    result = runner.invoke(app, ["train", "--resume", "--out", str(out), "--no-group-by-length"])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {out}: --resume continues the run") and "group_by_length: True -> False" in line
    assert snapshot(out) == before


def test_resume_records_the_settings_it_may_change_at_their_step(model, data, full, tmp_path):
    """Checkpoint, evaluation and log intervals and the threads may change on --resume (the adapter is the same);
    config.yaml keeps the values the run started with and says what changed at which step."""
    out = killed_after_step_4(model, data, tmp_path / "run")
    started = (out / "config.yaml").read_text()
    result = runner.invoke(
        app, ["train", "--resume", "--out", str(out), "--save-every", "1", "--eval-every", "3", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    for name, tensor in load_file(str(full / "adapter.safetensors")).items():
        assert torch.equal(tensor, load_file(str(out / "adapter.safetensors"))[name]), name
    text = (out / "config.yaml").read_text()
    assert text.startswith(started)  # the values of steps 1-4 are not rewritten
    assert read_recipe(out / "config.yaml") == read_recipe(full / "config.yaml") | {"out": str(out)}
    note, best = text[len(started) :].splitlines()
    assert note == "# resumed at step 4 with: save_every: 2 -> 1; eval_every: 2 -> 3; threads: None -> 1"
    assert best == (full / "config.yaml").read_text().splitlines()[-1]  # the best, as the uninterrupted run says
    assert best.startswith("# best adapter: best/adapter.safetensors, step ")
    # A resume that changes nothing adds nothing.
    again = runner.invoke(app, ["train", "--resume", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "config.yaml").read_text() == text


# ---------------------------------------------------------------------------------------------------------------
# 9. One run at a time in a run folder


def test_a_second_run_into_a_busy_run_folder_is_refused_and_changes_nothing(model, data, tmp_path, monkeypatch):
    out = killed_after_step_4(model, data, tmp_path / "run")
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # another lorakit process, holding the run folder until told to go
        try:
            with folder_lock(out):
                os.write(ready_w, b"x")
                os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        before = snapshot(out)

        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the lock was taken")

        monkeypatch.setattr(lorakit.training.loop, "load_base", no_model)
        for args in (["--resume", "--out", str(out)], [*cli_args(model, data, out)[1:], "--overwrite"]):
            result = runner.invoke(app, ["train", *args])
            assert result.exit_code == 2, result.output
            assert result.stderr.splitlines() == [
                f"error: {out}: another lorakit process (pid {holder}) is using this run folder"
            ]
            assert snapshot(out) == before
    finally:
        os.write(done_w, b"x")
        os.waitpid(holder, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    with folder_lock(out):  # held by this process (another open of the lock file): refused the same way
        result = runner.invoke(app, ["train", "--resume", "--out", str(out)])
        assert result.exit_code == 2 and f"(pid {os.getpid()}) is using this run folder" in result.stderr
    monkeypatch.undo()
    result = runner.invoke(app, ["train", "--resume", "--out", str(out)])  # the holder is gone: no stale lock
    assert result.exit_code == 0, result.output
