"""One failing rank ends the whole distributed run at once, with that rank's one-line error.

Without this, a rank that fails (a bad file found by rank 0, an out-of-memory on rank 1) leaves the others
waiting in their next collective until the backend's timeout (30 minutes for NCCL). Here:

- the failing rank claims the failure in the process group's store (an atomic counter: the first claim wins),
  records its exit code there, and prints its error (`reporter`); later failures print nothing;
- every rank runs a watcher thread that polls the store; when another rank's failure appears it ends this process
  at once (`os._exit` with that exit code: a thread blocked in a collective cannot be interrupted otherwise);
- the process group is destroyed at the end of the run, on success and on every error.

A coordinated stop (`TrainingInterrupted`: every rank stops at the same step after a checkpoint) is no failure.
Tests inject a failure with `LORAKIT_FAIL_AT=RANK:POINT` (`fail_point`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import EXIT_BAD_INPUT, LorakitError, TrainingInterrupted
from .distributed import World, shutdown

COUNT_KEY = "lorakit/failures"
CODE_KEY = "lorakit/exit_code"
POLL_SECONDS = 0.1

_reporter: dict[str, Any] = {"rank": None}
"""The rank of this process when it is the one that reports the run's failure; None otherwise."""


def error_prefix() -> str | None:
    """What the CLI puts before this process's `error:` message: "" (it reports, one process), "rank N: " (it
    reports, a distributed run), None (it stays silent: another rank reports). Outside a process group (an error
    before it started, the same on every rank) rank 0 reports."""
    if _reporter["rank"] is not None:
        return f"rank {_reporter['rank']}: "
    return "" if os.environ.get("RANK", "0") == "0" else None


def exit_code_of(error: BaseException) -> int:
    if isinstance(error, KeyboardInterrupt):
        return 130
    return int(getattr(error, "exit_code", 1))


class _Watcher(threading.Thread):
    """Polls the store for another rank's failure; ends this process with its exit code when one appears."""

    def __init__(self, store: Any) -> None:
        super().__init__(name="lorakit-failure-watcher", daemon=True)
        self.store = store
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(POLL_SECONDS):
            try:
                failed = self.store.check([CODE_KEY])
                code = int(self.store.get(CODE_KEY)) if failed else 0
            except Exception:  # the store went away: the launcher is ending the run
                if self.done.is_set():
                    return
                os._exit(1)
            if failed and not self.done.is_set():
                os._exit(code or 1)

    def stop(self) -> None:
        self.done.set()


@contextlib.contextmanager
def one_failure_ends_all(world: World) -> Iterator[None]:
    """The body of a run: any error on this rank ends every rank promptly; the process group is destroyed at the
    end in every case."""
    if not world.distributed:
        try:
            yield
        finally:
            shutdown(world)
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    watcher = _Watcher(store)
    watcher.start()
    try:
        yield
    except BaseException as error:
        watcher.stop()
        if not isinstance(error, TrainingInterrupted):
            _claim(store, world, exit_code_of(error))
        raise
    finally:
        watcher.stop()
        shutdown(world)


def _claim(store: Any, world: World, code: int) -> None:
    """The first failing rank reports; it publishes its exit code, which ends the other ranks."""
    try:
        first = store.add(COUNT_KEY, 1) == 1
        if first:
            _reporter["rank"] = world.rank
            store.set(CODE_KEY, str(code))
    except Exception:  # no store left: report from this rank anyway
        _reporter["rank"] = world.rank


def fail_point(name: str, world: World) -> None:
    """A test hook: `LORAKIT_FAIL_AT=RANK:NAME` makes that rank fail here with a LorakitError (a bad input found
    by one rank only); `RANK:NAME:oom` raises torch's OutOfMemoryError as a full GPU would."""
    spec = os.environ.get("LORAKIT_FAIL_AT")
    if not spec:
        return
    rank, point, *kind = spec.split(":")
    if point != name or int(rank) != world.rank:
        return
    if kind == ["oom"]:
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by LORAKIT_FAIL_AT at {name})")
    raise LorakitError(f"injected failure at {name} (LORAKIT_FAIL_AT)", EXIT_BAD_INPUT)
