"""What lorakit writes never costs the user a file.

- `--out` (train, merge, export) replaces only a folder lorakit made of the same kind, and never `.`, a folder
  holding the current folder or an input, nor an input itself; a symbolic link is followed, a broken one refused.
- `import --overwrite` replaces only a lorakit adapter file; `eval --out` problems are found before anything loads,
  and predictions files of adapters whose names look alike stay apart.
- A full disk (ENOSPC, EFBIG, EDQUOT) or a read-only output folder (EROFS, EACCES), simulated below the lowest
  write calls lorakit makes (or, for EFBIG, real: RLIMIT_FSIZE), is one `error:` line naming the path and the
  reason, exit 2, with no partial file under a final name, no temporary file left, every older file intact.

The tests run as root, where permission bits stop nothing: read-only folders and full disks are monkeypatched.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import learnable_rows, randomize_lora, save_model, tiny_gpt2, write_jsonl
from typer.testing import CliRunner

import lorakit
import lorakit.evaluation.evaluate
import lorakit.lora.adapter
import lorakit.models
from lorakit.cli import app
from lorakit.files import MARKER, OWN_NAMES, mark

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file faults read /proc/self/fd")

runner = CliRunner()
TRAIN = ["--max-steps", "1", "--batch-size", "4", "--save-every", "1"]
KINDS = {"train": "run", "merge": "merged", "export": "peft"}


# ---------------------------------------------------------------------------------------------------------------
# A world of files: a base model, data, a trained run folder, a merged folder, a PEFT export, an imported adapter


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kit")
    save_model(tiny_gpt2(), root / "base")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", learnable_rows(8))
    for args in (
        ["train", "--model", str(root / "base"), "--data", str(root / "data" / "train.jsonl"), *TRAIN],
        ["merge", str(root / "run" / "adapter.safetensors"), "--model", str(root / "base")],
        ["export", str(root / "run" / "adapter.safetensors")],
        ["import", str(root / "peft"), "--model", str(root / "base")],
    ):
        out = {"train": "run", "merge": "merged", "export": "peft", "import": "imported.safetensors"}[args[0]]
        result = runner.invoke(app, [*args, "--out", str(root / out)])
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def world(kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the kit whose adapter records the copy's base, plus a working folder, someone's own
    folder and file, and a folder for faults (`ro`, `full`)."""
    w = tmp_path / "w"
    shutil.copytree(kit, w, symlinks=True)
    adapter = w / "run" / "adapter.safetensors"
    with safe_open(str(adapter), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(adapter)), str(adapter), metadata={**metadata, "base_model": str(w / "base")})
    (w / "work").mkdir()
    (w / "work" / "notes.txt").write_text("my notes\n")
    (w / "mine").mkdir()
    (w / "mine" / "thesis.tex").write_text("\\section{mine}\n")
    (w / "notes.txt").write_text("a file\n")
    (w / "ro").mkdir()
    (w / "full").mkdir()
    monkeypatch.chdir(tmp_path)  # outside the world: only the dot cases work in it
    return w


def args_of(command: str, w: Path, out: str | Path, *extra: str) -> list[str]:
    adapter = str(w / "run" / "adapter.safetensors")
    return {
        "train": ["train", "--model", str(w / "base"), "--data", str(w / "data" / "train.jsonl"), *TRAIN],
        "merge": ["merge", adapter, "--model", str(w / "base")],
        "export": ["export", adapter],
        "import": ["import", str(w / "peft"), "--model", str(w / "base")],
        "eval": ["eval", adapter, "--data", str(w / "data" / "train.jsonl"), "--generate", "--max-new-tokens", "2"],
    }[command] + ["--out", str(out), *extra]


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under root: a file's bytes, a link's target, "dir"."""
    state: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = path.read_bytes()
    return state


def error_line(result) -> str:
    """The one line a failed command prints; exit 2."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def refused(args: list[str], root: Path, *fragments: str) -> str:
    """The command fails with one `error:` line holding the fragments, and every file under root is as it was."""
    before = snapshot(root)
    line = error_line(runner.invoke(app, args))
    for fragment in fragments:
        assert fragment in line, line
    assert snapshot(root) == before
    return line


# ---------------------------------------------------------------------------------------------------------------
# 1. --overwrite replaces only a folder lorakit made, never `.`, an ancestor of the input, or the input itself


REFUSALS = {
    # case: (--out, what is marked as a lorakit folder of the command's kind first, expected words)
    "dot": (".", "work", "current folder"),
    "dotdot": ("..", "work", "current folder"),
    "ancestor-of-inputs": ("{w}", ".", "input"),
    "base-model": ("{w}/base", "base", "input"),
    "data-folder": ("{w}/data", "data", "input"),
    "run-folder-of-adapter": ("{w}/run", "", "input"),
    "someone's-folder": ("{w}/mine", "", "not made by lorakit"),
    "other-kind": ("{w}/{other}", "", "not a {kind} folder"),
    "link-to-base": ("{w}/link", "base", "input"),
    "broken-link": ("{w}/broken", "", "broken symbolic link"),
    "existing-file": ("{w}/notes.txt", "", "not a folder"),
}
CASES = [
    (command, case)
    for command in KINDS
    for case in REFUSALS
    if not (command == "train" and case == "run-folder-of-adapter")  # a run folder is where train --overwrite goes
    and not (command == "export" and case in ("base-model", "link-to-base"))  # not an input of export
    and not (command != "train" and case == "data-folder")
]


@pytest.mark.parametrize("command, case", CASES)
def test_overwrite_never_replaces_what_lorakit_must_not(world, monkeypatch, command, case):
    kind = KINDS[command]
    out, marked, words = REFUSALS[case]
    other = {"run": "merged", "merged": "peft", "peft": "merged"}[kind]
    if marked:
        mark(world / marked, kind)  # even a folder that looks like lorakit's own is refused for the real reason
    (world / "link").symlink_to(world / "base", target_is_directory=True)
    (world / "broken").symlink_to(world / "nowhere")
    if case in ("dot", "dotdot"):
        monkeypatch.chdir(world / "work")
    out = out.format(w=world, other=other)
    refused(args_of(command, world, out, "--overwrite"), world, words.format(kind=kind))


def test_merge_never_replaces_the_base_the_adapter_records(world):
    """No --model: the recorded base is the input; even marked as a merged folder it is not replaced."""
    mark(world / "base", "merged")
    args = ["merge", str(world / "run" / "adapter.safetensors"), "--out", str(world / "base"), "--overwrite"]
    refused(args, world, "input")


@pytest.mark.parametrize("command", list(KINDS))
def test_existing_lorakit_folder_needs_overwrite(world, command):
    existing = {"train": "run", "merge": "merged", "export": "peft"}[command]
    refused(args_of(command, world, world / existing), world, "not empty", "--overwrite")


@pytest.mark.parametrize("command", list(KINDS))
def test_symlinked_out_is_written_through_and_replaced_with_overwrite(world, command):
    """--out a link to a new empty folder works; again with --overwrite it replaces that folder; the link stays."""
    kind = KINDS[command]
    (world / "fresh").mkdir()
    (world / "link").symlink_to(world / "fresh", target_is_directory=True)
    before = snapshot(world)
    first = runner.invoke(app, args_of(command, world, world / "link"))
    assert first.exit_code == 0, first.output
    assert json.loads((world / "fresh" / MARKER).read_text()) == {"kind": kind}
    (world / "fresh" / "stray.txt").write_text("left by hand\n")
    again = runner.invoke(app, args_of(command, world, world / "link", "--overwrite"))
    assert again.exit_code == 0, again.output
    assert (world / "link").is_symlink() and os.readlink(world / "link") == str(world / "fresh")
    assert not (world / "fresh" / "stray.txt").exists()
    assert json.loads((world / "fresh" / MARKER).read_text()) == {"kind": kind}
    result = {"train": "adapter.safetensors", "merge": "model.safetensors", "export": "adapter_model.safetensors"}
    assert (world / "fresh" / result[command]).is_file()
    after = snapshot(world)
    assert {k: v for k, v in after.items() if not k.startswith("fresh/")} == before  # nothing else touched
    assert not [k for k in after if k.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("command", list(KINDS))
def test_rerun_with_overwrite_replaces_the_folder_lorakit_made(world, command):
    existing = world / {"train": "run", "merge": "merged", "export": "peft"}[command]
    (existing / "stray.txt").write_text("left by hand\n")
    result = runner.invoke(app, args_of(command, world, existing, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not (existing / "stray.txt").exists()
    assert json.loads((existing / MARKER).read_text()) == {"kind": KINDS[command]}


def test_import_overwrite_replaces_only_a_lorakit_adapter(world):
    """import writes a file: --overwrite replaces a lorakit adapter (through a link: the file it names), never
    another file (the PEFT weights it reads, a base's weights) or a broken link."""
    peft_weights = world / "peft" / "adapter_model.safetensors"
    refused(args_of("import", world, peft_weights, "--overwrite"), world, "not a lorakit adapter")
    refused(args_of("import", world, world / "base" / "model.safetensors", "--overwrite"), world, "not a lorakit")
    refused(args_of("import", world, world / "notes.txt", "--overwrite"), world, "not a lorakit adapter")
    refused(args_of("import", world, world / "imported.safetensors"), world, "exists", "--overwrite")
    refused(args_of("import", world, world / "base", "--overwrite"), world, "is a folder")
    (world / "broken").symlink_to(world / "nowhere")
    refused(args_of("import", world, world / "broken", "--overwrite"), world, "broken symbolic link")
    (world / "link.safetensors").symlink_to(world / "imported.safetensors")
    assert lorakit.lora.adapter.read_adapter(world / "imported.safetensors").base_model != str(world / "base")
    result = runner.invoke(app, args_of("import", world, world / "link.safetensors", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert os.readlink(world / "link.safetensors") == str(world / "imported.safetensors")
    assert lorakit.lora.adapter.read_adapter(world / "imported.safetensors").base_model == str(world / "base")
    assert not [p for p in world.rglob("*") if p.name.endswith((".tmp", ".old"))]


# ---------------------------------------------------------------------------------------------------------------
# 2. and 3. eval: predictions files of look-alike names stay apart; --out problems before anything loads


def _adapter(world: Path, path: Path, seed: int) -> Path:
    model = lorakit.models.load_base(str(world / "base"))
    lorakit.add_lora(model, "q,v", rank=2, alpha=16)
    randomize_lora(model, seed=seed, std=3.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return lorakit.save_adapter(model, path, base_model=str(world / "base"))


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_predictions_of_look_alike_adapter_names_are_two_files(world, monkeypatch):
    """`a/b.safetensors` and `a_b.safetensors` have one safe name; each gets its own file with its own lines."""
    monkeypatch.chdir(world)
    _adapter(world, Path("a/b.safetensors"), seed=1)
    _adapter(world, Path("a_b.safetensors"), seed=2)
    data = ["--data", str(world / "data" / "train.jsonl"), "--generate", "--max-new-tokens", "3", "--json"]

    def evaluate(*adapters: str, out: str) -> dict[str, Path]:
        result = runner.invoke(app, ["eval", *adapters, *data, "--out", out])
        assert result.exit_code == 0, result.output
        return {r["name"]: Path(r["predictions"]) for r in json.loads(result.stdout)["results"]}

    both = evaluate("a/b.safetensors", "a_b.safetensors", out="both")
    assert len(set(both.values())) == 3 and all(p.parent == Path("both") for p in both.values())
    assert sorted(p.name for p in Path("both").iterdir()) == sorted(p.name for p in both.values())
    for name in ("a/b.safetensors", "a_b.safetensors"):  # each file as that adapter evaluated alone writes it
        alone = evaluate(name, out=f"alone-{name.replace('/', '-')}")
        assert _predictions(both[name]) == _predictions(alone[name])
    assert _predictions(both["a/b.safetensors"]) != _predictions(both["a_b.safetensors"])


def _nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def loaded(*args, **kwargs):
        raise AssertionError("eval loaded something before checking --out")

    for module, name in [
        (lorakit.models, "load_base"),
        (lorakit.models, "load_tokenizer"),
        (lorakit.lora.adapter, "read_adapter"),
        (lorakit.evaluation.evaluate, "read_rows"),
    ]:
        monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize("case", ["existing-file", "file-above", "broken-link", "predictions-file-is-a-folder"])
def test_eval_out_problem_is_refused_before_anything_loads(world, monkeypatch, case):
    """eval has no --overwrite: predictions files are its own names in a folder; what is in their way (a file where
    the folder goes, a folder where a predictions file goes) is refused at once, never after all the generation."""
    out = {
        "existing-file": "notes.txt",
        "file-above": "notes.txt/predictions",
        "broken-link": "broken",
        "predictions-file-is-a-folder": "preds",
    }[case]
    (world / "broken").symlink_to(world / "nowhere")
    (world / "preds" / "base.predictions.jsonl").mkdir(parents=True)
    _nothing_loads(monkeypatch)
    monkeypatch.chdir(world)
    refused(args_of("eval", world, out), world, out)


# ---------------------------------------------------------------------------------------------------------------
# 4. A full disk or a read-only folder: one line naming the path, nothing partial, nothing left, nothing lost


def _where(file: object) -> str | None:
    """The absolute path behind a path or an open file descriptor."""
    if isinstance(file, int):
        try:
            return os.readlink(f"/proc/self/fd/{file}")
        except OSError:
            return None
    try:
        return os.path.realpath(os.fspath(file))
    except TypeError:
        return None


class _FullFile:
    """An open file whose writes fail as write(2) does on a full disk: no file named."""

    def __init__(self, f: object, fail: Callable[[], OSError]) -> None:
        self._f, self._fail = f, fail

    def write(self, data: object) -> int:
        if len(data):  # type: ignore[arg-type]
            raise self._fail()
        return 0

    def writelines(self, lines: object) -> None:
        for line in lines:  # type: ignore[attr-defined]
            self.write(line)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()  # type: ignore[attr-defined]

    def __iter__(self):
        return iter(self._f)  # type: ignore[call-overload]

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)


class Faults:
    """Below the lowest calls lorakit (and the libraries it calls) write with: os.open, os.mkdir, os.replace...,
    open() / io.open (what pathlib, os.fdopen and transformers use), os.write / os.pwrite and os.fsync (which also
    sees what the safetensors Rust writer wrote)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch

    def disk_full(self, root: Path, number: int, only: str = "") -> None:
        """Every write of data under root fails with `number` (creating files and folders still works)."""
        top = os.path.realpath(root)

        def hit(file: object) -> bool:
            where = _where(file)
            return where is not None and (where == top or where.startswith(top + os.sep)) and only in where

        def fail() -> OSError:
            return OSError(number, os.strerror(number))

        real_open, real_write, real_pwrite, real_fsync = io.open, os.write, os.pwrite, os.fsync

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _FullFile(f, fail) if any(c in mode for c in "wax+") and hit(file) else f

        def guarded(real: Callable, fd: int, *args: object) -> object:
            if hit(fd):
                raise fail()
            return real(fd, *args)

        self.mp.setattr(io, "open", fake_open)
        self.mp.setattr(builtins, "open", fake_open)
        self.mp.setattr(os, "write", lambda fd, data: guarded(real_write, fd, data))
        self.mp.setattr(os, "pwrite", lambda fd, data, offset: guarded(real_pwrite, fd, data, offset))
        self.mp.setattr(os, "fsync", lambda fd: guarded(real_fsync, fd))

    def read_only(self, root: Path, number: int) -> None:
        """root and everything under it cannot be changed: each call that would fails with `number`, naming the
        path as the kernel does (a mkdir of an existing folder still says it exists)."""
        top = os.path.realpath(root)

        def check(*paths: object) -> None:
            for path in paths:
                where = _where(path)
                if where is not None and (where == top or where.startswith(top + os.sep)):
                    raise OSError(number, os.strerror(number), os.fspath(path))  # type: ignore[arg-type]

        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        real = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "unlink", "remove")}
        real.update({name: getattr(os, name) for name in ("rmdir", "chmod", "symlink", "truncate")})
        real_open = io.open

        def fake_os_open(path, flags, *args, **kwargs):
            if flags & writing and "dir_fd" not in kwargs:
                check(path)
            return real["open"](path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            check(path)
            return real["mkdir"](path, *args, **kwargs)

        def changing(name: str, count: int) -> Callable:
            def fake(*args, **kwargs):
                if "dir_fd" not in kwargs and "src_dir_fd" not in kwargs:
                    check(*args[:count])
                return real[name](*args, **kwargs)

            return fake

        def fake_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not isinstance(file, int):
                check(file)
            return real_open(file, mode, *args, **kwargs)

        self.mp.setattr(os, "open", fake_os_open)
        self.mp.setattr(os, "mkdir", fake_mkdir)
        for name, count in [("rename", 2), ("replace", 2), ("unlink", 1), ("remove", 1), ("rmdir", 1)]:
            self.mp.setattr(os, name, changing(name, count))
        for name, count in [("chmod", 1), ("symlink", 2), ("truncate", 1)]:
            self.mp.setattr(os, name, changing(name, count))
        self.mp.setattr(io, "open", fake_open)
        self.mp.setattr(builtins, "open", fake_open)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return Faults(monkeypatch)


# What a failed command may leave, beyond what was there: train's run folder as far as it got (its lock, its
# marker, config.yaml and complete metrics lines; an empty checkpoints folder), and an empty predictions folder.
MAY_STAY = {*OWN_NAMES, "config.yaml", "metrics.jsonl"}
FINAL = {
    "train": ["adapter.safetensors", "loss.png", "checkpoints/latest"],
    "merge": ["model.safetensors", "config.json"],
    "export": ["adapter_model.safetensors", "adapter_config.json"],
    "import": [],
    "eval": ["base.predictions.jsonl"],
}
EXISTING = {"merge": "merged", "export": "peft", "import": "imported.safetensors", "eval": "predictions"}


def _check_failed_write(world: Path, result, before: dict, out: Path, command: str, number: int, named: Path) -> None:
    line = error_line(result)
    assert str(named) in line and os.strerror(number) in line and ".tmp" not in line, line
    after = snapshot(world)
    for key, value in before.items():
        assert after.get(key) == value, f"{key} changed or went"  # every older file intact
    for key, value in after.items():
        if key not in before:  # no temporary file, no partial file under a final name
            assert value == "dir" or Path(key).name in MAY_STAY, f"{key} left behind"
            assert ".tmp" not in key and not key.endswith(".old"), f"{key} left behind"
    if str(out.relative_to(world)) not in before:
        assert all(not (out / name).exists() for name in FINAL[command]) if FINAL[command] else not out.exists()


def _setup(world: Path, command: str, root: Path, existing: bool) -> tuple[Path, list[str]]:
    """--out under root: new, or (existing) a copy of the lorakit output the command replaces with --overwrite."""
    if not existing:
        out = root / ("new.safetensors" if command == "import" else "new")
        return out, args_of(command, world, out)
    out = root / EXISTING[command]
    if command == "eval":
        out.mkdir()
        (out / "base.predictions.jsonl").write_text('{"prompt": "p", "prediction": "old", "references": []}\n')
        return out, args_of(command, world, out)  # eval replaces its own predictions files (atomically)
    source = world / EXISTING[command]
    (shutil.copy2 if source.is_file() else shutil.copytree)(source, out)
    return out, args_of(command, world, out, "--overwrite")


DISK_FULL = [errno.ENOSPC, errno.EFBIG, errno.EDQUOT]


@pytest.mark.parametrize("number", DISK_FULL, ids=errno.errorcode.get)
@pytest.mark.parametrize(
    "command, existing",
    [("train", False), ("merge", False), ("merge", True), ("export", True), ("import", False), ("import", True)]
    + [("eval", True)],
)
def test_full_disk_is_one_line_and_loses_nothing(world, faults, command, existing, number):
    out, args = _setup(world, command, world / "full", existing)
    before = snapshot(world)
    faults.disk_full(world / "full", number)
    result = runner.invoke(app, args)
    faults.mp.undo()
    _check_failed_write(world, result, before, out, command, number, out)


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EFBIG])
def test_full_disk_at_the_first_checkpoint_of_a_run(world, faults, number):
    """The disk fills up when the run saves its adapter: the run folder holds no checkpoint, no adapter, no
    temporary file; the error names the file."""
    out = world / "full" / "run"
    before = snapshot(world)
    faults.disk_full(world / "full", number, only="adapter.safetensors")
    result = runner.invoke(app, args_of("train", world, out))
    faults.mp.undo()
    _check_failed_write(world, result, before, out, "train", number, out / "checkpoints")
    assert not list((out / "checkpoints").iterdir()) and not (out / "adapter.safetensors").exists()
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("command", ["merge", "export"])
def test_full_disk_found_when_flushing_what_the_rust_writer_wrote(world, faults, command):
    """safetensors writes the weights from Rust, past open(); the disk reports full when lorakit flushes them
    (fsync): the error names the weights file under --out, and the old folder stays."""
    out, args = _setup(world, command, world / "full", existing=True)
    before = snapshot(world)
    faults.disk_full(world / "full", errno.ENOSPC, only=".safetensors")
    result = runner.invoke(app, args)
    faults.mp.undo()
    weights = {"merge": "model.safetensors", "export": "adapter_model.safetensors"}[command]
    _check_failed_write(world, result, before, out, command, errno.ENOSPC, out / weights)


@pytest.mark.parametrize("number", [errno.EROFS, errno.EACCES], ids=errno.errorcode.get)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("command", ["train", "merge", "export", "import", "eval"])
def test_read_only_out_is_one_line_and_loses_nothing(world, faults, monkeypatch, command, existing, number):
    if command == "train" and existing:
        out = world / "ro" / "run"
        shutil.copytree(world / "run", out)
        args = args_of("train", world, out, "--overwrite")
    else:
        out, args = _setup(world, command, world / "ro", existing)
    if command == "eval":
        _nothing_loads(monkeypatch)  # found before the generation, not after
    faults.read_only(world / "ro", number)
    before = snapshot(world)
    result = runner.invoke(app, args)
    after = snapshot(world)
    faults.mp.undo()
    line = error_line(result)
    named = world / "ro" if command == "eval" and not existing else out  # eval: the folder it would be made in
    assert f"{named}: " in line or f"{named}/" in line, line
    assert os.strerror(number) in line and ".tmp" not in line, line
    assert after == before


def test_real_file_size_limit_efbig(world):
    """A real EFBIG from the kernel (RLIMIT_FSIZE; Python ignores SIGXFSZ): the Rust safetensors writer (merge,
    export, a checkpoint's optimizer state) and Python's writes both end as one line naming the path."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    results = {}
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        for command in ("train", "merge", "export", "import"):
            out = world / "full" / ("new.safetensors" if command == "import" else command)
            before = snapshot(world)
            results[command] = (out, before, runner.invoke(app, args_of(command, world, out)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    for command, (out, before, result) in results.items():
        _check_failed_write(world, result, before, out, command, errno.EFBIG, out)
