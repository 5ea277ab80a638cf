"""Training data: files, saved `datasets` folders or hub datasets -> token ids with loss masks -> padded batches.

Stands alone: it knows tokenizers (whatever Hugging Face tokenizer is passed in), not LoRA.

    rows = read_rows(spec)                          # validate and load, before any model loads
    data = encode(rows, tokenizer, max_length, spec)  # Examples: input_ids + labels (-100: no loss)
    lengths = [len(e.input_ids) for e in data.examples]
    for indices in batch_order(lengths, batch_size, seed, epoch):
        batch = collate([data.examples[i] for i in indices], pad_id)

Labels are aligned with input_ids (the Hugging Face convention): the loss shifts them itself,
logits[:, :-1] predict labels[:, 1:], so a label at position 0 never counts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
import string
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LorakitError

if TYPE_CHECKING:
    import torch

IGNORE = -100  # label of a position without loss (torch's cross_entropy ignore_index)
TASKS = ("causal-lm", "classification")
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
# Suffixes that mark a missing path as a file rather than a hub name (hub names may hold dots: `OpenHermes-2.5`).
_FILE_LIKE = {*FILE_TYPES, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".xz", ".bz2", ".zst"}
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
_SURROGATE = re.compile("[\ud800-\udfff]")  # only JSON escapes (`"\ud800"`) make these; no tokenizer takes them
_MAX_CLASSES = 10**9  # a larger integer label is a code, not a class id


@dataclass
class DataSpec:
    """Where the rows come from and how their fields map onto a format.

    Templates are `str.format` strings over the row's fields plus `{eos}` and `{bos}` (the tokenizer's
    special token texts; they win over row fields of the same name). Literal braces are doubled: `{{`.
    Fields are plain names, optionally with a conversion or format spec (`{mr!r}`, `{mr:>10}`); attribute
    and index access (`{mr.upper}`, `{mr[0]}`) is refused.
    """

    source: str  # file path (.jsonl .json .csv .parquet), saved `datasets` folder (save_to_disk), or hub dataset name
    split: str = "train"  # for hub datasets and DatasetDict folders
    hub_config: str | None = None  # hub dataset config name
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    label_field: str = "label"
    prompt_template: str | None = None  # e.g. "{mr}{eos}"; default: the prompt field as is
    completion_template: str | None = None  # e.g. " {ref}"; default: the completion field as is
    limit: int | None = None  # first N rows only


@dataclass
class Rows:
    """Rows read and checked, with the format detected from the first row."""

    rows: list[dict]
    format: str  # "text" | "prompt_completion" | "messages" | "classification"
    source: str  # as the user gave it; used in messages
    lines: list[int] | None = None  # physical line of each row (.jsonl, .csv); None: rows are numbered 1, 2, ...
    label_names: list[str] | None = None  # classification with string labels: id -> name (sorted)
    num_labels: int | None = None  # classification only
    index: list[int] | None = None  # position of each row in the source (a split's rows); None: 0, 1, ...

    def where(self, i: int) -> str:
        """`data.jsonl:17` or `data.parquet row 3`: the place of row i for messages."""
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} row {(self.index[i] if self.index is not None else i) + 1}"

    def subset(self, positions: list[int]) -> Rows:
        """These rows (positions in this Rows), with their places in the source and the same labels."""
        return Rows(
            rows=[self.rows[i] for i in positions],
            format=self.format,
            source=self.source,
            lines=[self.lines[i] for i in positions] if self.lines is not None else None,
            label_names=self.label_names,
            num_labels=self.num_labels,
            index=[self.index[i] if self.index is not None else i for i in positions],
        )


@dataclass
class Example:
    """One training sequence; labels are -100 where there is no loss. Classification: labels = [class_id]."""

    input_ids: list[int]
    labels: list[int]
    row: int | None = None  # index of its row in Rows.rows (dropped rows leave gaps)
    position_ids: list[int] | None = None
    """A packed row (packing.py): each example's positions, restarting at 0; None: 0, 1, 2, ..."""


@dataclass
class Encoded:
    """Encoded rows: `truncated` rows were cut to max_length and kept, `dropped` rows were left out."""

    examples: list[Example]
    truncated: int
    dropped: int
    format: str
    drop_reasons: dict[str, int] = field(default_factory=dict)  # e.g. {"truncated away": 3, "empty completion": 1}
    label_names: list[str] | None = None
    num_labels: int | None = None

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry loss after the causal shift (labels[1:] != -100); classification: one per example."""
        if self.format == "classification":
            return len(self.examples)
        return sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in self.examples)

    def fingerprint(self) -> str:
        """A short hash of every id and label: a resumed run can check that it sees the same data."""
        h = hashlib.sha256(self.format.encode())
        for e in self.examples:
            h.update(array("q", [len(e.input_ids), *e.input_ids, *e.labels]).tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Reading rows


def read_rows(
    spec: DataSpec, task: str = "causal-lm", label_names: list[str] | None = None, num_labels: int | None = None
) -> Rows:
    """Load the rows of `spec.source` and check that every row has what its format needs.

    Args:
        spec: the source and its field mapping.
        task: `causal-lm` (text, prompt/completion or messages rows) or `classification` (text + label).
        label_names: classification only: the training data's label names, so that evaluation data maps
            string labels to the same ids (unknown labels are an error).
        num_labels: classification only: the class count (`--num-labels`, or the training data's for
            evaluation data). Integer labels must lie in [0, num_labels); without it they must be dense
            (at most twice as many classes as distinct labels), so that a code like 1000000 is not a class id.

    Raises:
        LorakitError: naming the file and line (or row) at fault and what was expected.
    """
    if task not in TASKS:
        raise LorakitError(f"unknown task {task!r}; expected {' or '.join(TASKS)}")
    if not spec.source:
        raise LorakitError(
            "no data given; expected a .jsonl, .json, .csv or .parquet file, a saved datasets folder "
            "or a hub dataset name"
        )
    if spec.limit is not None and spec.limit < 1:
        raise LorakitError(f"data limit must be at least 1, got {spec.limit}")
    if num_labels is not None and num_labels < 2:
        raise LorakitError(f"--num-labels must be at least 2, got {num_labels}")
    for template, what in ((spec.prompt_template, "prompt"), (spec.completion_template, "completion")):
        if template is not None:
            _template_fields(template, what)  # a bad template is refused before any data loads
    rows, lines = _load(spec)
    if not rows:
        raise LorakitError(f"{spec.source}: no rows")
    result = Rows(rows, "", spec.source, lines)
    result.format = _detect_format(rows[0], spec, task, result.where(0))
    _check_rows(result, _required_fields(spec, result.format))
    if result.format == "classification":
        _map_labels(result, spec.label_field, label_names, num_labels)
    return result


def split_rows(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """(training rows, evaluation rows): `ceil(len x fraction)` rows held out for evaluation, chosen by `seed` (the
    same seed and rows give the same split, on every machine and Python version), both in source order.

    Raises:
        LorakitError: the fraction is not in (0, 1), or holding the rows out would leave none to train on.
    """
    n = len(rows.rows)
    if not 0.0 < fraction < 1.0:
        raise LorakitError(f"--val-split must be in (0, 1), got {fraction}")
    held = math.ceil(round(n * fraction, 9))  # rounded first: 100 x 0.07 is 7.000000000000001 in floats
    if held >= n:
        raise LorakitError(
            f"--val-split {fraction:g}: {rows.source} has {n} row(s); holding out {held} for evaluation leaves none "
            "to train on (use more rows, a smaller --val-split or --eval-data)"
        )
    # A string seed is hashed (SHA-512) by random.Random: stable across versions, and unrelated to the batch order
    # that torch draws from the same --seed.
    chosen = set(random.Random(f"lorakit --val-split {seed}").sample(range(n), held))
    train = [i for i in range(n) if i not in chosen]
    return rows.subset(train), rows.subset(sorted(chosen))


def is_hub_dataset(source: str) -> bool:
    """Whether `read_rows` would load `source` from the hub: no such file or folder here, and not named like a
    file (a missing `train.jsonl` or `./data` is an error, not a hub name)."""
    path = Path(source).expanduser()
    if path.exists():
        return False
    return not (path.suffix.lower() in _FILE_LIKE or source.startswith(("/", "./", "../", "~", ".\\")))


def _load(spec: DataSpec) -> tuple[list[dict], list[int] | None]:
    """The raw rows of a file, a saved datasets folder or a hub dataset (and line numbers where they exist)."""
    path = Path(spec.source).expanduser()
    if path.is_file():
        return _read_file(path, spec.source, spec.limit)
    if path.is_dir():
        return _read_folder(path, spec), None
    if not is_hub_dataset(spec.source):
        raise LorakitError(f"{spec.source}: no such file")
    from ..hub import check_dataset_reachable

    check_dataset_reachable(spec.source)  # without a network: one line now, not the hub client's retries
    return _read_hub(spec), None


def _read_file(path: Path, name: str, limit: int | None) -> tuple[list[dict], list[int] | None]:
    ext = path.suffix.lower()
    if ext not in FILE_TYPES:
        raise LorakitError(
            f"{name}: unsupported file type {ext or '(no extension)'!r}; expected .jsonl, .json, .csv or .parquet"
        )
    if ext == ".parquet":
        return _read_parquet(path, name, limit), None
    text = _read_text(path, name)
    if ext == ".jsonl":
        return _parse_jsonl(text, name, limit)
    if ext == ".json":
        return _parse_json(text, name, limit)
    return _parse_csv(text, name, limit)


def _read_text(path: Path, name: str) -> str:
    """The file as text; a file that is not UTF-8, or holds NUL bytes, is an error naming the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LorakitError(f"{name}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        utf16 = ", a UTF-16 byte-order mark" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise LorakitError(
            f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}{utf16}); "
            "save the file as UTF-8"
        ) from None
    nul = data.find(b"\0")
    if nul >= 0:  # UTF-16 without a byte-order mark decodes as UTF-8 with a NUL after every ASCII character
        line = data.count(b"\n", 0, nul) + 1
        raise LorakitError(f"{name}:{line}: NUL byte at offset {nul} (UTF-16 or binary?); save the file as UTF-8")
    return text.removeprefix("\ufeff")  # a byte-order mark (Excel's UTF-8) is not part of the first field


def _parse_jsonl(text: str, name: str, limit: int | None) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    # Split on "\n" only: str.splitlines() would also split on U+2028, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        value = _loads(line, name, number)
        if not isinstance(value, dict):
            raise LorakitError(f"{name}:{number}: expected a JSON object, got {_type_name(value)}")
        rows.append(value)
        lines.append(number)
        if limit is not None and len(rows) >= limit:
            break
    return rows, lines


def _parse_json(text: str, name: str, limit: int | None) -> tuple[list[dict], list[int] | None]:
    """A JSON array of objects, or JSON lines under a .json name."""
    if not text.lstrip().startswith("["):
        try:
            return _parse_jsonl(text, name, limit)
        except LorakitError:
            whole = _try_json(text)
            if isinstance(whole, dict):  # one pretty-printed object
                keys = _names(list(whole)[:8])
                raise LorakitError(
                    f"{name}: expected a JSON array of objects or one object per line, got one object (keys: {keys})"
                ) from None
            raise
    value = _loads(text, name)
    rows = value[:limit] if limit is not None else value
    for i, item in enumerate(rows):
        if not isinstance(item, dict):
            raise LorakitError(f"{name} row {i + 1}: expected a JSON object, got {_type_name(item)}")
    return rows, None


def _try_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _loads(text: str, name: str, line: int | None = None) -> Any:
    """json.loads; any failure is one error naming the line (`line` when text is that one line) and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problem, pos = e.msg, e.pos
    except RecursionError:  # e.g. a line of 100,000 `[`: deeper than the parser's recursion allows
        problem, pos = "nested too deeply", _deepest(text)
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        digits = sys.get_int_max_str_digits()
        number = re.search(f"[0-9]{{{digits + 1}}}", text)
        problem, pos = f"a number with more than {digits} digits", number.start() if number else 0
    at = json.JSONDecodeError(problem, text, pos)  # for its line and column
    raise LorakitError(f"{name}:{line or at.lineno}: invalid JSON ({problem} at column {at.colno})") from None


def _deepest(text: str) -> int:
    """The offset of the most deeply nested `[` or `{` in JSON text (strings skipped)."""
    depth = deepest = pos = 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[{\]}]', text):
        if m[0] in "[{":
            depth += 1
            if depth > deepest:
                deepest, pos = depth, m.start()
        elif m[0] in "]}":
            depth -= 1
    return pos


def _parse_csv(text: str, name: str, limit: int | None) -> tuple[list[dict], list[int]]:
    """Rows keyed by the header; line numbers count the header as line 1 (a quoted field may span lines)."""
    # csv refuses fields over 131,072 characters by default; a long document is data, not an error.
    csv.field_size_limit(max(csv.field_size_limit(), min(len(text), 2**31 - 1)))
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, lines = [], []
    try:
        header = next(reader, None)
        if header is None:
            return rows, lines
        if len(set(header)) != len(header):
            twice = sorted({h for h in header if header.count(h) > 1})
            raise LorakitError(f"{name}:1: duplicate column {', '.join(map(repr, twice))} in the header")
        start = reader.line_num + 1
        for record in reader:
            if record:  # blank lines are skipped
                if len(record) != len(header):
                    raise LorakitError(
                        f"{name}:{start}: expected {len(header)} fields ({', '.join(header)}), got {len(record)}"
                    )
                rows.append(dict(zip(header, record)))
                lines.append(start)
                if limit is not None and len(rows) >= limit:
                    break
            start = reader.line_num + 1
    except csv.Error as e:
        raise LorakitError(f"{name}:{reader.line_num}: invalid CSV ({e})") from None
    return rows, lines


def _read_parquet(path: Path, name: str, limit: int | None) -> list[dict]:
    import pyarrow.parquet as pq  # comes with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
        raise LorakitError(f"{name}: not a readable parquet file ({_first_line(e)})") from None
    if limit is not None:
        table = table.slice(0, limit)
    rows: list[dict] = [{} for _ in range(table.num_rows)]
    for column in table.column_names:
        try:
            values = table.column(column).to_pylist()
        except Exception as e:  # e.g. a struct with duplicate field names, an unknown time zone
            raise LorakitError(f"{name}: cannot read column {column!r} ({_first_line(e)})") from None
        for row, value in zip(rows, values):
            row[column] = value
    return rows


def _read_folder(path: Path, spec: DataSpec) -> list[dict]:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`; other folders go to load_dataset."""
    if not (path / "dataset_dict.json").is_file() and not (path / "state.json").is_file():
        return _read_hub(spec, "not a saved datasets folder (no state.json or dataset_dict.json), and reading it")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # corrupt or incompatible arrow files
        raise LorakitError(f"{spec.source}: cannot read the saved dataset ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise LorakitError(f"{spec.source}: no split {spec.split!r}; splits here: {', '.join(ds)}")
        ds = ds[spec.split]
    return _dataset_rows(ds, spec)


def _read_hub(spec: DataSpec, attempt: str = "not a file or folder, and loading it as a hub dataset") -> list[dict]:
    """A hub dataset (or a folder of data files) through `datasets.load_dataset`."""
    import datasets

    try:
        ds = datasets.load_dataset(spec.source, spec.hub_config, split=spec.split)
    except Exception as e:  # not found, offline, bad config or split: all one line for the user
        from ..hub import dataset_not_cached

        if isinstance(e, ConnectionError) and dataset_not_cached(spec.source):
            raise LorakitError(str(dataset_not_cached(spec.source))) from None
        config = f", config {spec.hub_config!r}" if spec.hub_config else ""
        raise LorakitError(
            f"{spec.source}: {attempt} (split {spec.split!r}{config}) failed: {_first_line(e)}"
        ) from None
    return _dataset_rows(ds, spec)


def _dataset_rows(ds: Any, spec: DataSpec) -> list[dict]:
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    try:
        return ds.to_list()
    except Exception as e:  # pyarrow: e.g. a time zone it cannot resolve, a struct with duplicate field names
        raise LorakitError(f"{spec.source}: cannot read its rows ({_first_line(e)})") from None


# ---------------------------------------------------------------------------------------------------------------
# Formats and checks


def _detect_format(row: dict, spec: DataSpec, task: str, where: str) -> str:
    """The row format, from the keys of the first row and the field mapping."""
    if task == "classification":
        return "classification"
    if spec.prompt_template is not None or spec.completion_template is not None:
        return "prompt_completion"
    if spec.messages_field in row:
        return "messages"
    has_prompt, has_completion = spec.prompt_field in row, spec.completion_field in row
    if has_prompt and has_completion:
        return "prompt_completion"
    if spec.text_field in row:
        return "text"
    if has_prompt or has_completion:
        return "prompt_completion"  # the row check then names the missing key
    raise LorakitError(
        f"{where}: cannot tell the row format from its keys (found: {_keys(row)}); expected "
        f"{spec.text_field!r}, {spec.prompt_field!r} + {spec.completion_field!r}, or {spec.messages_field!r} "
        "(map other names with --text-field, --prompt-field, --completion-field or --messages-field)"
    )


def _required_fields(spec: DataSpec, fmt: str) -> list[tuple[str, str]]:
    """(field, kind) pairs every row of this format needs; kind: text, value, messages or label."""
    if fmt == "text":
        return [(spec.text_field, "text")]
    if fmt == "messages":
        return [(spec.messages_field, "messages")]
    if fmt == "classification":
        return [(spec.text_field, "text"), (spec.label_field, "label")]
    needs = []
    for template, name, what in (
        (spec.prompt_template, spec.prompt_field, "prompt"),
        (spec.completion_template, spec.completion_field, "completion"),
    ):
        if template is None:
            needs.append((name, "text"))
        else:
            aliases = {"prompt": spec.prompt_field, "completion": spec.completion_field}
            fields = [aliases.get(f, f) for f in _template_fields(template, what)]
            needs += [(f, "value") for f in fields if (f, "value") not in needs]
    return needs


def _template_fields(template: str, what: str) -> list[str]:
    """The row fields a template names (`{mr}`), without eos and bos; refuses what is not a plain field."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise LorakitError(f"invalid {what} template {template!r}: {e}") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base == "" or base.isdigit():
            raise LorakitError(f"{what} template {template!r} has a positional field {{{name}}}; name a row field")
        if base != name:  # str.format would read attributes (`{x.__class__}`) and items of the value
            raise LorakitError(
                f"{what} template {template!r}: {{{name}}} reads an attribute or item; name a field, e.g. {{{base}}}"
            )
        # Nested fields (`{x:{y}}`) are fields too; a width of 1000 or more only makes huge strings.
        if conversion not in (None, "r", "s", "a") or "{" in spec or re.search("[0-9]{4}", spec):
            shown = (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise LorakitError(
                f"{what} template {template!r}: unsupported format {shown!r} for {{{name}}}; expected !r, !s, !a "
                "or a format spec like :>10 (no nested fields, widths below 1000)"
            )
        if base not in ("eos", "bos") and base not in names:
            names.append(base)
    return names


def _check_rows(rows: Rows, needs: list[tuple[str, str]]) -> None:
    for i, row in enumerate(rows.rows):
        for name, kind in needs:
            if name not in row:
                raise LorakitError(f"{rows.where(i)}: missing key {name!r} (found: {_keys(row)})")
            value = row[name]
            if kind == "text" and not isinstance(value, str):
                raise LorakitError(f"{rows.where(i)}: {name!r} must be a string, got {_type_name(value)}")
            if kind == "value" and not isinstance(value, (str, int, float)):
                raise LorakitError(f"{rows.where(i)}: {name!r} must be a string or number, got {_type_name(value)}")
            if kind == "label" and not (isinstance(value, (str, int)) and not isinstance(value, bool)):
                got = f"number {value!r}" if isinstance(value, float) else _type_name(value)
                raise LorakitError(f"{rows.where(i)}: {name!r} must be an integer or a string, got {got}")
            if kind == "messages":
                _check_messages(value, name, rows.where(i))
            elif isinstance(value, str):
                _check_unicode(value, repr(name), rows.where(i))


def _check_unicode(text: str, field: str, where: str) -> None:
    """Refuse a lone surrogate (a broken JSON `\\u` escape): tokenizers and UTF-8 files cannot take it."""
    bad = _SURROGATE.search(text)
    if bad:
        raise LorakitError(
            f"{where}: {field} holds a lone surrogate \\u{ord(bad[0]):04x} at character {bad.start()}; "
            "expected valid Unicode text"
        )


def _check_messages(value: Any, name: str, where: str) -> None:
    if not isinstance(value, list) or not value:
        got = "an empty array" if value == [] else _type_name(value)
        raise LorakitError(f"{where}: {name!r} must be a non-empty array of {{role, content}} objects, got {got}")
    for j, message in enumerate(value):
        ok = isinstance(message, dict) and isinstance(message.get("role"), str)
        if not ok or not isinstance(message.get("content"), str):
            got = _shown(message)
            raise LorakitError(f"{where}: {name}[{j}] must be an object with string 'role' and 'content', got {got}")
        for key in ("role", "content"):
            _check_unicode(message[key], f"{name}[{j}].{key}", where)


def _map_labels(rows: Rows, name: str, known: list[str] | None, num_labels: int | None) -> None:
    """Set label_names / num_labels: integer labels are class ids; string labels map to ids in sorted order.

    Strings of digits ("0", "1": CSV columns) count as integers and are stored as such.
    """
    values = [row[name] for row in rows.rows]
    ids = [_class_id(v) for v in values]  # None: a label name
    if all(label is not None for label in ids):
        for i, label in enumerate(ids):
            if label >= _MAX_CLASSES:
                shown = _cut(str(values[i]).strip(), 40)
                raise LorakitError(f"{rows.where(i)}: label {shown} is too large for a class id")
        count = num_labels or (len(known) if known is not None else max(ids) + 1)
        for i, label in enumerate(ids):
            if not 0 <= label < count:
                raise LorakitError(
                    f"{rows.where(i)}: label {label} is out of range; class ids run from 0 to {count - 1}"
                )
        distinct = len(set(ids))
        if num_labels is None and known is None and count > max(2, 2 * distinct):
            raise LorakitError(
                f"{rows.where(ids.index(count - 1))}: label {count - 1} implies {count:,} classes but the data has "
                f"{distinct} distinct labels; use class ids 0..N-1 or pass --num-labels N"
            )
        for row, label in zip(rows.rows, ids):
            row[name] = label
        rows.label_names, rows.num_labels = known, count
    else:
        if any(isinstance(v, int) for v in values):  # JSON numbers next to label names
            i = next(i for i, label in enumerate(ids) if (label is None) != (ids[0] is None))
            kinds = ("a class id", "label name") if ids[0] is None else ("a label name", "class id")
            raise LorakitError(
                f"{rows.where(i)}: label {values[i]!r} is {kinds[0]} but {rows.where(0)} has {kinds[1]} "
                f"{values[0]!r}; use class ids or label names, not both"
            )
        names = known if known is not None else sorted(set(values))
        allowed = set(names)
        for i, v in enumerate(values):
            if v not in allowed:  # only with known names
                raise LorakitError(f"{rows.where(i)}: unknown label {v!r}; the training data has: {_names(names)}")
        if num_labels is not None and len(names) != num_labels:
            raise LorakitError(
                f"{rows.source}: {len(names)} label names ({_names(names)}) but --num-labels {num_labels}"
            )
        rows.label_names, rows.num_labels = names, len(names)
    if known is None and num_labels is None and rows.num_labels < 2:
        raise LorakitError(f"{rows.source}: classification needs at least 2 classes, found {rows.num_labels}")


def _class_id(label: int | str) -> int | None:
    """An integer label, or a string of digits, as a class id; None for a label name."""
    if isinstance(label, int):
        return label
    digits = label.strip()
    if not digits.isdecimal():  # not isdigit(): int() refuses "²"
        return None
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 12 else _MAX_CLASSES  # int() refuses strings of over 4300 digits


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def encode(rows: Rows, tokenizer: Any, max_length: int, spec: DataSpec) -> Encoded:
    """Tokenize rows into Examples with loss masks, cut to max_length.

    - text: the text's ids (with the tokenizer's special tokens) + EOS; loss on every token.
    - prompt_completion: prompt ids (special tokens added) + completion ids + EOS, tokenized separately so that
      the boundary is exact; loss on the completion and its EOS only.
    - messages: the tokenizer's chat template; loss on the assistant turns (with their end-of-turn tokens).
    - classification: the text's ids (truncated by the tokenizer, keeping e.g. [SEP]); labels = [class_id].

    Raises:
        LorakitError: no EOS token or chat template where one is needed, or no row left to train on.
    """
    if max_length < 2:
        raise LorakitError(f"--max-length must be at least 2, got {max_length}")
    if rows.format == "classification":
        return _encode_classification(rows, tokenizer, max_length, spec)
    if tokenizer.eos_token_id is None:
        raise LorakitError(f"tokenizer {_tokenizer_name(tokenizer)} has no EOS token; rows need one appended")
    if rows.format == "text":
        candidates = _encode_text(rows, tokenizer, spec)
    elif rows.format == "prompt_completion":
        candidates = _encode_prompt_completion(rows, tokenizer, spec)
    elif rows.format == "messages":
        candidates = _encode_messages(rows, tokenizer, spec)
    else:
        raise LorakitError(f"unknown row format {rows.format!r}")
    return _fit(candidates, max_length, rows)


def _tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool, **kwargs: Any) -> Any:
    """One batched call to the tokenizer (fast ones run it in parallel); long rows are ours to report, not a warning."""
    if not texts:
        return {"input_ids": [], "offset_mapping": []}
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False, return_attention_mask=False, **kwargs)


def _encode_text(rows: Rows, tokenizer: Any, spec: DataSpec) -> list[Example | str]:
    eos = tokenizer.eos_token_id
    texts = [row[spec.text_field] for row in rows.rows]
    out: list[Example | str] = []
    for i, (text, ids) in enumerate(zip(texts, _tokenize(tokenizer, texts, True)["input_ids"])):
        if not text.strip():
            out.append("empty text")
            continue
        if not ids or ids[-1] != eos:  # some tokenizers append EOS themselves
            ids = [*ids, eos]
        out.append(Example(ids, list(ids), i))
    return out


def _encode_prompt_completion(rows: Rows, tokenizer: Any, spec: DataSpec) -> list[Example | str]:
    eos_id = tokenizer.eos_token_id
    special = {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token or ""}
    for template in (spec.prompt_template, spec.completion_template):
        if template and "{eos" in template:
            _check_eos_splits(tokenizer)
    prompts, completions = [], []
    for i, row in enumerate(rows.rows):
        prompts.append(_fill(spec.prompt_template, spec.prompt_field, row, special, rows.where(i), spec))
        completions.append(_fill(spec.completion_template, spec.completion_field, row, special, rows.where(i), spec))
    prompt_ids = _tokenize(tokenizer, prompts, True)["input_ids"]
    completion_ids = _tokenize(tokenizer, completions, False)["input_ids"]
    out: list[Example | str] = []
    for i, (completion, p, c) in enumerate(zip(completions, prompt_ids, completion_ids)):
        if not completion.strip():
            out.append("empty completion")
            continue
        # (prompt | completion + EOS): loss on the second part only
        out.append(Example([*p, *c, eos_id], [IGNORE] * len(p) + [*c, eos_id], i))
    return out


def template_values(row: dict, spec: DataSpec, special: dict[str, str]) -> dict:
    """What a template can name: the row's fields, `{prompt}` / `{completion}` (the mapped prompt and completion
    fields, so one recipe serves sources with different column names), `{eos}` and `{bos}`."""
    aliases = {k: row[f] for k, f in (("prompt", spec.prompt_field), ("completion", spec.completion_field)) if f in row}
    return {**row, **aliases, **special}


def _fill(
    template: str | None, name: str, row: dict, special: dict[str, str], where: str, spec: DataSpec | None = None
) -> str:
    if template is None:
        return row[name]
    try:
        return template.format_map(template_values(row, spec, special) if spec else {**row, **special})
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        raise LorakitError(f"{where}: cannot fill the template {template!r} ({type(e).__name__}: {e})") from None


def _check_eos_splits(tokenizer: Any) -> None:
    """`{eos}` in a template must become the EOS id, not the pieces of its text (e.g. `split_special_tokens`)."""
    ids = tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if ids != [tokenizer.eos_token_id]:
        raise LorakitError(
            f"tokenizer {_tokenizer_name(tokenizer)} turns its EOS text {tokenizer.eos_token!r} into ids {ids}, "
            f"not [{tokenizer.eos_token_id}]; {{eos}} in a template cannot work with it"
        )


def _encode_messages(rows: Rows, tokenizer: Any, spec: DataSpec) -> list[Example | str]:
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError(
            f"tokenizer {_tokenizer_name(tokenizer)} has no chat template, which the messages format of "
            f"{rows.source} needs; use a chat model or prompt/completion rows (--prompt-field, --completion-field)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise LorakitError(f"tokenizer {_tokenizer_name(tokenizer)} is not a fast tokenizer; messages rows need one")
    texts, spans = [], []
    for i, row in enumerate(rows.rows):
        text, turn_spans = _render_conversation(tokenizer, row[spec.messages_field], rows.where(i))
        texts.append(text)
        spans.append(turn_spans)
    # Chat templates write their special tokens (BOS included) into the text, so none are added here.
    encoded = _tokenize(tokenizer, texts, False, return_offsets_mapping=True)
    out: list[Example | str] = []
    for i, (ids, offsets, turn_spans) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], spans)):
        if not turn_spans:
            out.append("no assistant turn")
            continue
        # A token belongs to an assistant turn when it starts inside one of the turns' character spans.
        labels = [t if any(a <= start < b for a, b in turn_spans) else IGNORE for t, (start, _) in zip(ids, offsets)]
        out.append(Example(list(ids), labels, i))
    return out


def _render_conversation(tokenizer: Any, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The chat text and the character span of each assistant turn in it.

    The turn of assistant message i is the text between rendering messages[:i] with the generation prompt and
    rendering messages[:i+1]; this needs no generation tags in the template, but needs each rendering to be a
    prefix of the whole. Assistant messages before any other message have no prompt to render: context only.
    """

    def render(part: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja TemplateError, or the template's own raise_exception()
            raise LorakitError(f"{where}: the chat template failed ({_first_line(e)})") from None

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise LorakitError(
                f"{where}: the chat template of {_tokenizer_name(tokenizer)} renders the first {i} messages "
                "differently inside a longer conversation, so assistant turns cannot be located; "
                "use prompt/completion rows instead"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _encode_classification(rows: Rows, tokenizer: Any, max_length: int, spec: DataSpec) -> Encoded:
    texts = [row[spec.text_field] for row in rows.rows]
    ids_list = list(_tokenize(tokenizer, texts, True)["input_ids"])
    # Re-tokenize only the long rows with the tokenizer's own truncation, which keeps closing tokens like [SEP].
    long = [i for i, ids in enumerate(ids_list) if len(ids) > max_length]
    cut = _tokenize(tokenizer, [texts[i] for i in long], True, truncation=True, max_length=max_length)["input_ids"]
    for i, ids in zip(long, cut):
        ids_list[i] = ids
    names = {name: i for i, name in enumerate(rows.label_names or [])}
    examples, reasons = [], Counter()
    for i, (row, ids) in enumerate(zip(rows.rows, ids_list)):
        if not ids or not texts[i].strip():  # a blank text may still get special tokens ([CLS] [SEP])
            reasons["empty text"] += 1
            continue
        label = row[spec.label_field]
        examples.append(Example(list(ids), [label if isinstance(label, int) else names[label]], i))
    if not examples:
        raise LorakitError(f"no usable rows in {rows.source}: every text is empty")
    return Encoded(
        examples, len(long), sum(reasons.values()), rows.format, dict(reasons), rows.label_names, rows.num_labels
    )


def _fit(candidates: list[Example | str], max_length: int, rows: Rows) -> Encoded:
    """Cut examples to max_length from the right; drop those left without a loss token."""
    examples, truncated, reasons = [], 0, Counter()
    prompts = []  # tokens before the first trained one, in rows truncated away
    for c in candidates:
        if isinstance(c, str):  # a reason to drop, decided while encoding
            reasons[c] += 1
            continue
        # The loss counts labels[1:] (the causal shift), so the first trained position must be >= 1 and fit.
        first = next((i for i, label in enumerate(c.labels) if label != IGNORE and i > 0), None)
        if first is None:
            reasons["nothing to train on"] += 1
        elif first >= max_length:
            reasons["truncated away"] += 1
            prompts.append(first)
        elif len(c.input_ids) > max_length:
            truncated += 1
            examples.append(Example(c.input_ids[:max_length], c.labels[:max_length], c.row))
        else:
            examples.append(c)
    if not examples:
        raise LorakitError(_nothing_left(rows.source, reasons, max_length, prompts))
    return Encoded(examples, truncated, sum(reasons.values()), rows.format, dict(reasons))


def _nothing_left(source: str, reasons: Counter, max_length: int, prompts: list[int]) -> str:
    """The error for data of which no row is left: why, and the prompt lengths when truncation is the cause."""
    if prompts:
        span = f"{min(prompts)}" if min(prompts) == max(prompts) else f"{min(prompts)} to {max(prompts)}"
        cause = f"truncated away by --max-length {max_length} (prompts are {span} tokens long)"
        if set(reasons) == {"truncated away"}:
            return f"every row of {source} was {cause}"
        reasons = Counter({cause if r == "truncated away" else r: n for r, n in reasons.items()})
    return f"no usable rows in {source}: " + ", ".join(f"{n} {reason}" for reason, n in reasons.items())


# ---------------------------------------------------------------------------------------------------------------
# Batching


def collate(examples: list[Example], pad_id: int, task: str = "causal-lm") -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its longest example.

    Returns:
        input_ids (B, T) padded with pad_id; attention_mask (B, T), 1 on real positions, 0 on padding, set by
        position (pad_id may equal EOS, e.g. GPT-2); labels (B, T) with -100 on padding, or (B,) class ids
        for classification. All long tensors.
    """
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    if task == "classification":
        labels = [e.labels[0] for e in examples]
    else:
        labels = [e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    if any(e.position_ids is not None for e in examples):  # packed rows; the padding is one more block of its own
        positions = [(e.position_ids or list(range(len(e.input_ids)))) for e in examples]
        batch["position_ids"] = torch.tensor([p + list(range(width - len(p))) for p in positions], dtype=torch.long)
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on `device` (copies are asynchronous where the device allows)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = False
) -> list[list[int]]:
    """The batches of one epoch as lists of example indices; the same arguments give the same batches.

    Every index appears exactly once; the last batch may be partial. With group_by_length, shuffled indices are
    taken in mega-batches of 50 * batch_size, each sorted by length (so batches hold similar lengths and little
    padding), and the batches are then shuffled (so their order stays random).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return _chunks(order, batch_size)
    batches = []
    for mega in _chunks(order, 50 * batch_size):
        mega.sort(key=lambda i: lengths[i], reverse=True)  # stable: equal lengths keep their shuffled order
        batches += _chunks(mega, batch_size)
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _type_name(value: Any) -> str:
    """JSON's name for a value's type (`array`, `object`, `null`), else Python's."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _keys(row: dict) -> str:
    return _names(row) or "no keys"


def _names(items: Any, width: int = 200) -> str:
    """`a, b, c` on one line: control characters and lone surrogates escaped, cut to width characters."""
    return _cut(", ".join(repr(str(item))[1:-1] for item in items), width)


def _shown(value: Any, width: int = 60) -> str:
    """A value as one line of JSON (lone surrogates escaped), cut to width characters."""
    text = json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace").decode()
    return _cut(text, width)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _tokenizer_name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
