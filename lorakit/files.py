"""Files and folders lorakit writes: atomic and flushed to disk, marked as lorakit's own, locked while in use.

- `write_atomic` / `atomic_dir`: a temporary file (or folder) beside the target, flushed (fsync) and then renamed,
  so a reader, a kill or a power cut sees the old version or the whole new one, never a part.
- Folders lorakit makes (run folders, merged models, PEFT exports) hold a marker file, `.lorakit`, naming their
  kind. `--overwrite` replaces only such a folder (or an empty one), and never `.`, a folder that holds the
  current folder, or one that holds an input of the command (`check_out`).
- `folder_lock`: one process at a time in a run folder (an advisory `flock`, released by the kernel when the
  process dies, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import LorakitError

MARKER = ".lorakit"
"""The file that marks a folder as lorakit's own: JSON `{"kind": ...}`."""
LOCK = ".lorakit.lock"
OWN_NAMES = {MARKER, LOCK}  # files that do not make a folder "not empty"


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _as_created(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a mkstemp/mkdtemp path (0600/0700) the mode open() or mkdir() would: 0666/0777 less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents (a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # fsync names no file; where the disk filled up is worth saying
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root`), deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


# A safetensors I/O error names its errno as "(os error 28)" or, before safetensors 0.5, "Os { code: 28, ...".
_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def _renamed(error: BaseException, path: Path, tmp: str | os.PathLike | None = None) -> OSError | None:
    """An error of writing `path` (through its temporary `tmp`) as an OSError that names `path`, the name the
    user gave, rather than a temporary name or none (a failed write() or fsync() names no file); a safetensors
    I/O error (a full disk under its Rust writer) becomes the OSError it wraps. None: keep the error as it is."""
    if isinstance(error, OSError):
        number, reason, name = error.errno, error.strerror, error.filename
    elif type(error).__name__ == "SafetensorError" and (found := _OS_ERROR.search(str(error))):
        number, reason, name = int(found[1] or found[2]), None, None
    else:
        return None
    if number is None:
        return None
    target = path
    if name is not None and tmp is not None:
        try:
            target = path / Path(os.fsdecode(name)).relative_to(tmp)
        except ValueError:  # not a file being written (the lock, a file read): its own name is the right one
            if isinstance(error, OSError):
                return None
    return OSError(number, reason or os.strerror(number), str(target))


@contextlib.contextmanager
def _naming(path: Path, tmp: str | os.PathLike | None = None) -> Iterator[None]:
    """Raise what fails in the block as an OSError naming `path` (see `_renamed`)."""
    try:
        yield
    except BaseException as e:
        named = _renamed(e, path, tmp)
        if named is None:
            raise
        raise named from e


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    A failure (a full disk, a read-only folder) leaves the old file as it was and no temporary file, and is an
    OSError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            _as_created(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_path(path.parent)  # the rename itself


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` when the block succeeds; on error it is removed.

    Everything in it is flushed to disk before the rename. An existing non-empty `path` is refused unless
    `overwrite`; then it is replaced only at the end. `kind`: write the lorakit marker of that kind into it.
    """
    path = Path(os.path.realpath(path))  # a symbolic link to a folder: replace the folder it names
    if path.exists() and not path.is_dir():
        raise LorakitError(f"{path}: exists and is not a folder")
    if is_busy(path) and not overwrite:
        raise LorakitError(f"{path}: folder exists and is not empty; choose another --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        with _naming(path, tmp):
            _as_created(tmp, directory=True)
            yield tmp
            if kind is not None:
                (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
            _fsync_tree(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)  # the old folder back under its name
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _naming(path):
        fsync_path(path.parent)


def is_busy(folder: Path) -> bool:
    """A folder that exists and holds anything but lorakit's marker and lock."""
    return folder.is_dir() and any(p.name not in OWN_NAMES for p in folder.iterdir())


def owned_kind(folder: Path) -> str | None:
    """The kind of lorakit folder this is (`run`, `merged`, `peft`), or None if lorakit did not make it."""
    try:
        kind = json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def mark(folder: Path, kind: str) -> None:
    """Write the marker that makes `folder` a lorakit folder of `kind`."""
    write_atomic(folder / MARKER, json.dumps({"kind": kind}) + "\n")


def check_out(
    out: str | os.PathLike,
    kind: str,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    choices: str = "choose another --out or pass --overwrite",
) -> Path:
    """Check an `--out` folder before anything is loaded; returns it (a symbolic link resolved).

    Refused: a file or a broken link; `.` or any folder that holds the current folder; a folder that is or holds
    one of `inputs` (the command's input files and folders); a non-empty folder without `overwrite`; with
    `overwrite`, a non-empty folder that is not a lorakit folder of this `kind`.
    """
    given = Path(out)
    if given.is_symlink() and not given.exists():
        raise LorakitError(f"{given}: is a broken symbolic link; expected a folder or a new name")
    real = Path(os.path.realpath(given))
    if real.exists() and not real.is_dir():
        raise LorakitError(f"{given}: exists and is not a folder")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise LorakitError(f"{given}: is the current folder or holds it; choose a new folder for --out")
    for item in inputs:
        source = Path(os.path.realpath(item))
        if real == source or real in source.parents:
            raise LorakitError(f"{given}: is or holds the input {item}; choose another folder for --out")
    if not is_busy(real):
        return real
    if not overwrite:
        raise LorakitError(f"{given}: folder exists and is not empty; {choices}")
    found = owned_kind(real)
    if found != kind:
        what = "was not made by lorakit" if found is None else f"is a lorakit {found} folder, not a {kind} folder"
        raise LorakitError(f"{given}: {what}; --overwrite replaces only a {kind} folder lorakit made")
    return real


def empty_folder(folder: Path) -> None:
    """Remove everything in a folder except lorakit's lock (which this process holds)."""
    for item in folder.iterdir():
        if item.name == LOCK:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove what killed writers leave in `folder`: `.NAME.*.tmp` files and folders, `.NAME.old` folders."""
    removed = []
    for item in [*folder.glob(".*.tmp"), *folder.glob(".*.old")]:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the block; another process holding it is an error naming its pid."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise LorakitError(f"{folder}: another lorakit process (pid {holder}) is using this run folder") from None
        with _naming(folder / LOCK):  # a full disk: the lock file named, not a bare "No space left"
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
