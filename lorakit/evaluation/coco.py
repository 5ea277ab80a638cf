"""The Java tools of the coco-caption code (pycocoevalcap), which the E2E evaluation script runs.

Two tools, each started with the command line the official scripts use and a time limit:
the Stanford PTB tokenizer (CoreNLP 3.4.1) and METEOR 1.5. Both jars, and METEOR's paraphrase
table, ship in the `pycocoevalcap` wheel, so nothing is downloaded. Anything that keeps a tool from
running (no Java, no pycocoevalcap, a crash, a time-out) raises `MetricUnavailable` with the reason.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import IO

PTB_JAR = "tokenizer/stanford-corenlp-3.4.1.jar"
METEOR_JAR = "meteor/meteor-1.5.jar"
PTB_TIMEOUT_S = 120.0
METEOR_TIMEOUT_S = 300.0  # start-up alone loads a large paraphrase table

INSTALL_HINT = "pip install 'lorakit[e2e]'"


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here; the message says why."""


class MetricWarning(UserWarning):
    """A metric was left out (its value is None) or computed with a stand-in for an official tool."""


def java_path() -> str:
    """Path of the `java` executable on PATH."""
    java = shutil.which("java")
    if java is None:
        raise MetricUnavailable("java not found on PATH (METEOR and the PTB tokenizer need Java 8 or later)")
    return java


def coco_file(relative: str) -> Path:
    """Path of a file shipped in the pycocoevalcap package (a namespace package: no __init__.py)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable(f"pycocoevalcap is not installed ({INSTALL_HINT})")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise MetricUnavailable(f"pycocoevalcap has no {relative} (expected in its wheel; reinstall it)")


def one_line(text: str) -> str:
    """`text` with every line break (as `str.splitlines` sees them) replaced by a space."""
    return " ".join(text.splitlines()) if text else text


def ptb_tokenize_java(texts: list[str], timeout: float = PTB_TIMEOUT_S) -> list[str]:
    """Tokenize with the Stanford PTB tokenizer as coco-caption runs it (`-preserveLines -lowerCase`).

    Returns:
        One line of space-separated, lowercased tokens per text (punctuation still in).
    """
    command = [java_path(), "-cp", str(coco_file(PTB_JAR)), "edu.stanford.nlp.process.PTBTokenizer"]
    command += ["-preserveLines", "-lowerCase"]
    stdin = "\n".join(one_line(text) for text in texts)  # one text per line, as the official wrapper writes them
    try:
        done = subprocess.run(command, input=stdin.encode(), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise MetricUnavailable(f"the PTB tokenizer took more than {timeout:.0f} s") from error
    except OSError as error:
        raise MetricUnavailable(f"could not run {command[0]}: {error}") from error
    if done.returncode != 0:
        raise MetricUnavailable(f"the PTB tokenizer failed (exit {done.returncode}): {tail(done.stderr)}")
    lines = done.stdout.decode(errors="replace").split("\n")
    if len(lines) == len(texts) + 1 and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        raise MetricUnavailable(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    return [line.strip() for line in lines]


def meteor_java(predictions: list[str], references: list[list[str]], timeout: float = METEOR_TIMEOUT_S) -> float:
    """Corpus METEOR 1.5 in [0, 1] from the jar, driven as pycocoevalcap's wrapper drives it.

    One `SCORE ||| ref 1 ||| ... ||| hypothesis` line per item returns its statistics; one
    `EVAL ||| stats 1 ||| ...` line then returns each item's score and, last, the corpus score
    (computed from the summed statistics, not the mean of the item scores).
    """
    jar = coco_file(METEOR_JAR)
    # -Dfile.encoding: read and write UTF-8 whatever the locale (the jar uses Java's default charset)
    command = [java_path(), "-Dfile.encoding=UTF-8", "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en"]
    command.append("-norm")
    timed_out = threading.Event()
    with tempfile.TemporaryFile() as stderr, start(command, jar.parent, stderr) as process:
        # A blocked readline returns b'' once the process is killed.
        watchdog = threading.Timer(timeout, lambda: (timed_out.set(), process.kill()))
        watchdog.start()
        try:
            stats = []
            for pred, refs in zip(predictions, references):
                send(process, meteor_score_line(pred, refs))
                stats.append(receive(process))
            send(process, " ||| ".join(["EVAL", *stats]))
            answers = [receive(process) for _ in range(len(stats) + 1)]  # item scores, then the corpus score
            return float(answers[-1])
        except (OSError, ValueError) as error:
            stderr.seek(0)
            if timed_out.is_set():
                raise MetricUnavailable(f"METEOR (java -jar {jar.name}) took more than {timeout:.0f} s") from error
            reason = tail(stderr.read()) or str(error)
            raise MetricUnavailable(f"METEOR (java -jar {jar.name}) failed: {reason}") from error
        finally:
            watchdog.cancel()
            process.kill()


def start(command: list[str], cwd: Path, stderr: IO[bytes]) -> subprocess.Popen:
    """Start a tool that answers requests line by line on stdin/stdout."""
    try:
        return subprocess.Popen(command, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    except OSError as error:
        raise MetricUnavailable(f"could not run {command[0]}: {error}") from error


def meteor_score_line(prediction: str, references: list[str]) -> str:
    """The SCORE request for one item; '|||' separates fields, so it is removed from the texts."""
    fields = [text.replace("|||", "").replace("  ", " ") for text in [*references, prediction]]
    return " ||| ".join(["SCORE", *fields])


def send(process: subprocess.Popen, line: str) -> None:
    """Write one request line to a running tool."""
    process.stdin.write(line.encode() + b"\n")
    process.stdin.flush()


def receive(process: subprocess.Popen) -> str:
    """Read one answer line from a running tool; ValueError when it has stopped."""
    line = process.stdout.readline()
    if not line:
        raise ValueError("no answer (the process stopped)")
    return line.decode(errors="replace").strip()


def tail(output: bytes, lines: int = 3) -> str:
    """The last few lines of a tool's output, on one line."""
    return " | ".join(output.decode(errors="replace").strip().splitlines()[-lines:])
