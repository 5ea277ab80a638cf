"""Data: reading files and datasets, loss masks per format, truncation, padding, batch order, one-line errors."""

import json
import re
from pathlib import Path

import pytest
import torch
from tiny import tiny_tokenizer

from lorakit.errors import LorakitError
from lorakit.training.data import IGNORE, DataSpec, Example, batch_order, collate, encode, read_rows

E2E_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/e2e/trainset.csv"
# A ChatML-like template in the tiny vocabulary: each turn is `<s>role content</s>`.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load(path: Path, tok, max_length: int = 64, **spec_fields):
    spec = DataSpec(str(path), **spec_fields)
    rows = read_rows(spec)
    return rows, encode(rows, tok, max_length, spec)


# --- formats and loss masks --------------------------------------------------------------------------------------


def test_text_rows_train_on_every_token_plus_eos(tmp_path, tok):
    rows, data = load(write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3"}, {"text": "w4"}]), tok)
    assert rows.format == data.format == "text"
    assert [e.input_ids for e in data.examples] == [ids(tok, "w1 w2 w3") + [2], ids(tok, "w4") + [2]]
    assert all(e.labels == e.input_ids for e in data.examples)
    assert data.num_label_tokens == 3 + 1  # labels[1:] only: position 0 is never predicted


def test_prompt_completion_loss_on_completion_and_eos_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1 w2", "completion": "w3 w4 w5"}])
    rows, data = load(path, tok)
    assert rows.format == "prompt_completion"
    prompt, completion = ids(tok, "w1 w2"), ids(tok, "w3 w4 w5")
    (example,) = data.examples
    assert example.input_ids == prompt + completion + [tok.eos_token_id]
    assert example.labels == [IGNORE] * len(prompt) + completion + [tok.eos_token_id]
    assert data.num_label_tokens == len(completion) + 1


def test_special_token_text_is_split_as_one_special_id(tok):
    assert ids(tok, "w1</s>w2") == [ids(tok, "w1")[0], tok.eos_token_id, ids(tok, "w2")[0]]


def test_template_with_eos_puts_eos_at_the_boundary(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"mr": "w1 w2", "ref": "w3 w4"}])
    rows, data = load(path, tok, prompt_template="{mr}{eos}", completion_template=" {ref}")
    (example,) = data.examples
    boundary = example.labels.index(next(label for label in example.labels if label != IGNORE))
    assert example.input_ids[:boundary] == ids(tok, "w1 w2") + [tok.eos_token_id]  # MR, EOS: no loss
    assert example.input_ids[boundary:] == example.labels[boundary:] == ids(tok, "w3 w4") + [tok.eos_token_id]


def test_e2e_like_csv_with_mapped_fields(tmp_path, tok):
    path = tmp_path / "e2e.csv"
    path.write_text('mr,ref\n"w1, w2",w3 w4\n"w5\nw6",w7\n', encoding="utf-8")
    rows, data = load(path, tok, prompt_field="mr", completion_field="ref")
    assert rows.format == "prompt_completion"
    assert [rows.where(i) for i in range(2)] == [f"{path}:2", f"{path}:3"]  # header = line 1
    first = data.examples[0]
    assert first.labels == [IGNORE] * len(ids(tok, "w1, w2")) + ids(tok, "w3 w4") + [2]


def test_messages_loss_on_assistant_turns_only(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "w9"},
        {"role": "user", "content": "w1 w2"},
        {"role": "assistant", "content": "w3 w4"},
        {"role": "user", "content": "w5"},
        {"role": "assistant", "content": "w6"},
    ]
    rows, data = load(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tok)
    assert rows.format == "messages"
    bos, eos, role = 1, 2, ids(tok, "user")  # role words are <unk> in the tiny vocabulary
    # (ids, trained?) segments of `<s>role content</s>` turns; the assistant header is prompt, not trained.
    segments = [
        ([bos, *role, *ids(tok, "w9"), eos], False),
        ([bos, *role, *ids(tok, "w1 w2"), eos], False),
        ([bos, *role], False),
        ([*ids(tok, "w3 w4"), eos], True),
        ([bos, *role, *ids(tok, "w5"), eos], False),
        ([bos, *role], False),
        ([*ids(tok, "w6"), eos], True),
    ]
    (example,) = data.examples
    assert example.input_ids == [t for seg, _ in segments for t in seg]
    assert example.labels == [t if trained else IGNORE for seg, trained in segments for t in seg]


def test_messages_need_a_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w1"}]}])
    with pytest.raises(LorakitError, match="has no chat template.*prompt/completion"):
        load(path, tok)


def test_messages_template_that_is_not_prefix_stable_is_refused(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% if loop.last %}w90{% endif %}{% endfor %}"
    messages = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    with pytest.raises(LorakitError, match=r"chat\.jsonl:1: the chat template .* differently"):
        load(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tok)


def test_messages_rows_are_checked(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(LorakitError, match=r"chat\.jsonl:1: messages\[0\] must be an object with string 'role'"):
        read_rows(DataSpec(str(path)))


def test_classification_labels_strings_sorted_and_ints(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "w1 w2", "label": "pos"}, {"text": "w3", "label": "neg"}])
    rows = read_rows(DataSpec(str(path)), task="classification")
    assert rows.format == "classification" and rows.label_names == ["neg", "pos"] and rows.num_labels == 2
    data = encode(rows, tok, 8, DataSpec(str(path)))
    assert [e.labels for e in data.examples] == [[1], [0]]
    batch = collate(data.examples, pad_id=0, task="classification")
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 2)

    csv_path = tmp_path / "c.csv"
    csv_path.write_text("text,label\nw1,0\nw2,2\n", encoding="utf-8")
    rows = read_rows(DataSpec(str(csv_path)), task="classification")
    assert rows.label_names is None and rows.num_labels == 3  # CSV digits are class ids

    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"text": "w1", "label": "maybe"}])
    with pytest.raises(LorakitError, match=r"e\.jsonl:1: unknown label 'maybe'; the training data has: neg, pos"):
        read_rows(DataSpec(str(evaluation)), task="classification", label_names=["neg", "pos"])


# --- truncation -------------------------------------------------------------------------------------------------


def test_truncation_counts_and_drops_rows_without_a_trained_token(tmp_path, tok):
    rows = [
        {"prompt": "w1", "completion": "w2"},  # 3 tokens: fits
        {"prompt": "w1", "completion": "w2 w3 w4 w5"},  # 6 tokens: cut, completion left
        {"prompt": "w1 w2 w3 w4 w5", "completion": "w6"},  # prompt fills max_length: nothing to train on
        {"prompt": "w1", "completion": " "},  # empty completion
    ]
    _, data = load(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=4)
    assert (len(data.examples), data.truncated, data.dropped) == (2, 1, 2)
    assert data.drop_reasons == {"truncated away": 1, "empty completion": 1}
    assert [e.row for e in data.examples] == [0, 1]  # back to the rows, e.g. for references
    lengths = [len(e.input_ids) for e in data.examples]
    assert max(lengths) == 4 and data.examples[1].labels == [IGNORE, *ids(tok, "w2 w3 w4")]
    assert not hasattr(data, "lengths")  # batch_order takes lengths explicitly; Encoded keeps no second copy


def test_every_row_truncated_away_is_an_error(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "w1 " * 9, "completion": "w2"}, {"prompt": "w1", "completion": ""}]
    )
    with pytest.raises(LorakitError) as e:
        load(path, tok, max_length=8)
    assert str(e.value) == (
        f"no usable rows in {path}: 1 truncated away by --max-length 8 (prompts are 9 tokens long), 1 empty completion"
    )
    write_jsonl(path, [{"prompt": "w1 " * n, "completion": "w2"} for n in (9, 23)])
    with pytest.raises(LorakitError, match=r"every row of .* truncated away by --max-length 8 \(prompts are 9 to 23"):
        load(path, tok, max_length=8)


# --- batching ---------------------------------------------------------------------------------------------------


def test_collate_pads_per_batch_and_masks_by_position_when_pad_is_eos(tok):
    eos = tok.eos_token_id
    examples = [Example([5, 6, eos], [IGNORE, 6, eos]), Example([7, eos], [7, eos])]
    batch = collate(examples, pad_id=eos)  # GPT-2 style: no pad token, pad with EOS
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]  # width = longest in this batch
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, eos], [7, eos, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batch_order_is_deterministic_and_covers_every_index_once():
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    for group in (True, False):
        batches = batch_order(lengths, 8, seed=110, epoch=3, group_by_length=group)
        assert batches == batch_order(lengths, 8, seed=110, epoch=3, group_by_length=group)
        assert sorted(i for b in batches for i in b) == list(range(1003))
        assert sorted(len(b) for b in batches)[0] == 1003 % 8 and sum(len(b) < 8 for b in batches) == 1
        assert batches != batch_order(lengths, 8, seed=110, epoch=4, group_by_length=group)


def test_batch_order_grouped_by_length_pads_less():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped, plain = batch_order(lengths, 8, 0, 0, group_by_length=True), batch_order(lengths, 8, 0, 0)
    assert padding(grouped) * 5 < padding(plain)
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)  # the batches themselves are shuffled


# --- sources ----------------------------------------------------------------------------------------------------


def test_json_array_json_lines_and_limit(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "w1"}, {"text": "w2"}, {"text": "w3"}]), encoding="utf-8")
    assert [r["text"] for r in read_rows(DataSpec(str(array), limit=2)).rows] == ["w1", "w2"]
    lines = write_jsonl(tmp_path / "l.json", [{"text": "w1"}, {"text": "w2"}])
    assert len(read_rows(DataSpec(str(lines))).rows) == 2


def test_parquet_file(tmp_path):
    from datasets import Dataset

    path = tmp_path / "d.parquet"
    Dataset.from_dict({"prompt": ["w1", "w2"], "completion": ["w3", "w4"]}).to_parquet(str(path))
    rows = read_rows(DataSpec(str(path)))
    assert rows.format == "prompt_completion" and rows.rows[1] == {"prompt": "w2", "completion": "w4"}


def test_saved_datasets_folder_and_dataset_dict_split(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"text": ["w1", "w2", "w3"]})
    ds.save_to_disk(str(tmp_path / "plain"))
    assert len(read_rows(DataSpec(str(tmp_path / "plain"))).rows) == 3
    DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(read_rows(DataSpec(str(tmp_path / "dict"), split="validation")).rows) == 1
    with pytest.raises(LorakitError, match=r"dict: no split 'test'; splits here: train, validation$"):
        read_rows(DataSpec(str(tmp_path / "dict"), split="test"))


def test_hub_dataset_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # The environment variables only count before import; the constants make it offline now.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # older datasets have only the second
        if hasattr(datasets.config, name):
            monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LorakitError) as e:
        read_rows(DataSpec("nobody/no-such-dataset"))
    message = str(e.value)
    assert message.startswith("nobody/no-such-dataset: not a file") and "hub dataset" in message
    assert "\n" not in message


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("d.jsonl", '{"text": "w1"}\n\n{"text": "w2" "x"}\n', r"d\.jsonl:3: invalid JSON \(Expecting ',' delimiter"),
        ("d.jsonl", '{"text": "w1"}\n[1, 2]\n', r"d\.jsonl:2: expected a JSON object, got array$"),
        ("d.jsonl", b'{"text": "w1"}\n{"text": "caf\xe9"}\n', r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 28\)"),
        ("d.csv", b"text\ncaf\xff\n", r"d\.csv:2: not UTF-8 text \(byte 0xff at offset 8\)"),
        ("d.jsonl", '{"prompt": "w1", "completion": "w2"}\n{"prompt": "w1", "text": "w2"}\n', None),
        ("d.csv", 'prompt,completion\n"w1\nw2",w3\nw4\n', r"d\.csv:4: expected 2 fields \(prompt, completion\), got 1"),
        ("d.jsonl", '{"text": 3}\n', r"d\.jsonl:1: 'text' must be a string, got number$"),
        ("d.jsonl", '{"question": "w1"}\n', r"d\.jsonl:1: cannot tell the row format .* \(found: question\)"),
        ("d.jsonl", "\n\n", r"d\.jsonl: no rows$"),
        ("d.csv", "prompt,completion\n", r"d\.csv: no rows$"),
        ("d.json", '{\n  "text": "w1"\n}\n', r"d\.json: expected a JSON array of objects or one object per line"),
        ("d.json", '[{"text": "w1"}, 3]', r"d\.json row 2: expected a JSON object, got number$"),
        ("d.txt", "w1 w2\n", r"d\.txt: unsupported file type '\.txt'; expected \.jsonl, \.json, \.csv or \.parquet$"),
        ("d.parquet", "not parquet", r"d\.parquet: not a readable parquet file"),
        # hostile input: still one line, never a traceback
        ("d.jsonl", '{"text": "w1"}\n' + "[" * 100_000 + "\n", r"d\.jsonl:2: invalid JSON \(nested too deeply"),
        ("d.json", '[{"text": "w1"},\n' + "[" * 100_000, r"d\.json:2: invalid JSON \(nested too deeply at column"),
        ("d.json", '{"a": ' * 100_000, r"d\.json:1: invalid JSON \(nested too deeply"),  # JSON lines under .json
        ("d.jsonl", '{"text": "w1", "n": ' + "9" * 5000 + "}", r"d\.jsonl:1: invalid JSON \(a number with more than"),
        ("d.jsonl", '{"text": "w1"}\n{"text": "w2\\ud800"}\n', r"d\.jsonl:2: 'text' holds a lone surrogate \\ud800 at"),
        ("d.jsonl", '{"prompt": "w1", "completion": "\\udc00"}', r"d\.jsonl:1: 'completion' holds a lone surrogate"),
        (
            "d.jsonl",
            '{"messages": [{"role": "user", "content": "w1\\ud800"}]}',
            r"d\.jsonl:1: messages\[0\]\.content holds a lone surrogate \\ud800 at character 2;",
        ),
        (
            "d.jsonl",
            '{"messages": [{"role": 1, "content": "w1"}]}',
            r"d\.jsonl:1: messages\[0\] must be .* got \{\"role\": 1",
        ),
        (
            "d.json",
            '[{"text": "w1"}, {"text": "w2"}, [{"text": "w3"}]]',
            r"d\.json row 3: expected a JSON object, got array$",
        ),
        ("d.csv", "text\nw1\x00w2\n", r"d\.csv:2: NUL byte at offset 7 \(UTF-16 or binary\?\)"),
        ("d.jsonl", '{"text": "w1"}\n'.encode("utf-16-le"), r"d\.jsonl:1: NUL byte at offset 1"),
        (
            "d.csv",
            "text\nw1\n".encode("utf-16"),
            r"d\.csv:1: not UTF-8 text \(byte 0xff at offset 0, a UTF-16 byte-order",
        ),
        ("d.csv", '"x\ny"\nw1\n', r"d\.csv:3: cannot tell the row format from its keys \(found: x\\ny\);"),
    ],
)
def test_bad_files_give_one_line_naming_the_place(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    expected = expected or r"d\.jsonl:2: missing key 'completion' \(found: prompt, text\)$"
    with pytest.raises(LorakitError, match=expected) as e:
        read_rows(DataSpec(str(path)))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))


def test_missing_fields_in_csv_name_the_csv_line(tmp_path):
    path = tmp_path / "e2e.csv"
    path.write_text('mr,text\n"w1\nw2",w3\nw4,w5\n', encoding="utf-8")  # row 1 spans lines 2-3
    with pytest.raises(LorakitError, match=r"e2e\.csv:2: missing key 'ref' \(found: mr, text\)$"):
        read_rows(DataSpec(str(path), prompt_template="{mr}{eos}", completion_template=" {ref}"))


def test_folder_that_is_not_a_dataset_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match=r"empty: not a saved datasets folder .* failed: .*") as e:
        read_rows(DataSpec(str(tmp_path / "empty")))
    assert "\n" not in str(e.value)


def test_bad_labels(tmp_path):
    for label, expected in ((True, "must be an integer or a string, got boolean"), (-1, "label -1 is out of range")):
        path = write_jsonl(tmp_path / "c.jsonl", [{"text": "w1", "label": 1}, {"text": "w2", "label": label}])
        with pytest.raises(LorakitError, match=rf"c\.jsonl:2: .*{expected}"):
            read_rows(DataSpec(str(path)), task="classification")


def read_labels(tmp_path, *values, **kwargs):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"w{i + 1}", "label": v} for i, v in enumerate(values)])
    return read_rows(DataSpec(str(path)), task="classification", **kwargs)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((1.0, 0), r"c\.jsonl:1: 'label' must be an integer or a string, got number 1\.0$"),
        ((None, 0), r"c\.jsonl:1: 'label' must be an integer or a string, got null$"),
        (
            ("pos", 1),
            r"c\.jsonl:2: label 1 is a class id but .*c\.jsonl:1 has label name 'pos'; use class ids or label",
        ),
        ((1, "0", "pos"), r"c\.jsonl:3: label 'pos' is a label name but .*c\.jsonl:1 has class id 1;"),
        ((0, 1, "w\ud800"), r"c\.jsonl:3: 'label' holds a lone surrogate \\ud800 at character 1"),
        ((0, 1, 10**4000), r"c\.jsonl:3: label 10{36}\.\.\. is too large for a class id$"),
    ],
)
def test_bad_label_kinds_name_the_row(tmp_path, values, expected):
    with pytest.raises(LorakitError, match=expected) as e:
        read_labels(tmp_path, *values)
    assert "\n" not in str(e.value)


def test_class_count_must_be_plausible_or_given(tmp_path):
    message = r"c\.jsonl:3: label 1000000 implies 1,000,001 classes but the data has 2 distinct labels; use class ids"
    with pytest.raises(LorakitError, match=message + r" 0\.\.N-1 or pass --num-labels N$"):
        read_labels(tmp_path, 0, 0, 1_000_000)
    assert read_labels(tmp_path, 0, 2).num_labels == 3  # one class unseen is plausible
    assert read_labels(tmp_path, 0, 1_000_000, num_labels=1_000_001).num_labels == 1_000_001
    assert read_labels(tmp_path, 1, 1, num_labels=4).num_labels == 4  # evaluation data may hold one class
    with pytest.raises(LorakitError, match=r"c\.jsonl:2: label 7 is out of range; class ids run from 0 to 4$"):
        read_labels(tmp_path, 0, 7, num_labels=5)
    with pytest.raises(LorakitError, match=r"c\.jsonl: 2 label names \(neg, pos\) but --num-labels 3$"):
        read_labels(tmp_path, "pos", "neg", num_labels=3)
    with pytest.raises(LorakitError, match="--num-labels must be at least 2, got 1"):
        read_labels(tmp_path, 0, 1, num_labels=1)


def test_csv_labels_that_int_cannot_read(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text,label\nw1,0\nw2,1\nw3," + "9" * 5000 + "\n", encoding="utf-8")  # int() stops at 4300 digits
    with pytest.raises(LorakitError, match=r"c\.csv:4: label 9{37}\.\.\. is too large for a class id$"):
        read_rows(DataSpec(str(path)), task="classification")
    path.write_text("text,label\nw1,0\nw2,\u00b2\n", encoding="utf-8")  # "²".isdigit(), but int("²") fails
    assert read_rows(DataSpec(str(path)), task="classification").label_names == ["0", "\u00b2"]


def test_classification_drops_blank_texts_that_tokenize_to_special_tokens(tmp_path):
    from tokenizers import processors

    tok = tiny_tokenizer()  # as BERT: [CLS] text [SEP], so a blank text is not zero tokens
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": " ", "label": 0}, {"text": "w1", "label": 1}])
    spec = DataSpec(str(path))
    data = encode(read_rows(spec, task="classification"), tok, 8, spec)
    assert [e.row for e in data.examples] == [1] and data.drop_reasons == {"empty text": 1}


def test_blank_texts_are_dropped_with_a_reason(tmp_path, tok):
    _, data = load(write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": " \t"}, {"text": "w1"}]), tok)
    assert [e.row for e in data.examples] == [2] and data.drop_reasons == {"empty text": 2}


def test_csv_fields_over_the_csv_module_limit_and_a_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ufefftext\n" + '"' + "w1 " * 100_000 + '"\n', encoding="utf-8")  # csv's default: 131,072
    assert read_rows(DataSpec(str(path))).rows == [{"text": "w1 " * 100_000}]  # the BOM is not part of the header


def test_columns_python_cannot_hold_are_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    path = tmp_path / "d.parquet"
    struct = pa.StructArray.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
    pq.write_table(pa.table({"text": ["w1"], "meta": struct}), path)
    with pytest.raises(LorakitError, match=r"d\.parquet: cannot read column 'meta' \(.*duplicate field names"):
        read_rows(DataSpec(str(path)))
    when = pa.array([0], type=pa.timestamp("s", tz="Mars/Olympus"))  # a time zone pyarrow cannot resolve
    Dataset(pa.table({"text": ["w1"], "when": when})).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(LorakitError, match=r"saved: cannot read its rows \(") as e:
        read_rows(DataSpec(str(tmp_path / "saved")))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{prompt.__class__}", r"\{prompt\.__class__\} reads an attribute or item; name a field, e.g. \{prompt\}$"),
        ("{eos.__class__.__name__}", r"\{eos\.__class__\.__name__\} reads an attribute or item"),
        ("{row[0]}", r"\{row\[0\]\} reads an attribute or item"),
        ("{a.b}", r"\{a\.b\} reads an attribute or item"),
        ("{prompt:{completion.__class__}}", r"unsupported format ':\{completion\.__class__\}' for \{prompt\}"),
        ("{prompt:>1000000000}", r"unsupported format ':>1000000000' .*widths below 1000"),
        ("{prompt!x}", r"unsupported format '!x' for \{prompt\}; expected !r, !s, !a"),
    ],
)
def test_templates_name_plain_fields_only(tmp_path, template, expected):
    missing = tmp_path / "not-read-yet.jsonl"  # refused up front: before the data is looked at
    with pytest.raises(LorakitError, match=rf"^prompt template {re.escape(repr(template))}: {expected}"):
        read_rows(DataSpec(str(missing), prompt_template=template))


def test_template_conversions_and_format_specs_are_allowed(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "completion": "w2", "n": 7}])
    _, data = load(path, tok, prompt_template="{prompt!s:>4} {n:03d}{eos}", completion_template=" {completion}")
    assert data.examples[0].input_ids[: len(ids(tok, "  w1 007"))] == ids(tok, "  w1 007")


def test_missing_file_and_bad_template(tmp_path):
    with pytest.raises(LorakitError, match=r"missing\.jsonl: no such file$"):
        read_rows(DataSpec(str(tmp_path / "missing.jsonl")))
    path = write_jsonl(tmp_path / "d.jsonl", [{"mr": "w1", "ref": "w2"}])
    with pytest.raises(LorakitError, match="positional field"):
        read_rows(DataSpec(str(path), prompt_template="{}{eos}", completion_template="{ref}"))


@pytest.mark.skipif(not E2E_TRAIN.exists(), reason="E2E data not present")
def test_e2e_train_set_reads_and_encodes(tok):
    spec = DataSpec(str(E2E_TRAIN), prompt_template="{mr}{eos}", completion_template=" {ref}", limit=200)
    rows = read_rows(spec)
    data = encode(rows, tok, 128, spec)
    assert len(rows.rows) == 200 and rows.lines[0] == 2 and data.dropped == 0
    for e in data.examples:  # the first EOS ends the MR; loss starts right after it
        first_trained = next(i for i, label in enumerate(e.labels) if label != IGNORE)
        assert e.input_ids[first_trained - 1] == tok.eos_token_id and e.labels[-1] == tok.eos_token_id


def test_prompt_and_completion_aliases_follow_the_field_mapping(tmp_path):
    """One recipe template serves sources whose columns are named differently."""
    from lorakit.training.data import DataSpec, encode, read_rows

    path = tmp_path / "e2e.csv"
    path.write_text("mr,ref\nw1 w2,w3 w4\n", encoding="utf-8")
    spec = DataSpec(
        source=str(path),
        prompt_field="mr",
        completion_field="ref",
        prompt_template="{prompt}{eos}",
        completion_template=" {completion}",
    )
    tok = tiny_tokenizer()
    encoded = encode(read_rows(spec), tok, 32, spec)
    ids = encoded.examples[0].input_ids
    assert ids == tok("w1 w2</s> w3 w4", add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    missing = DataSpec(source=str(path), prompt_field="meaning", prompt_template="{prompt}", completion_field="ref")
    with pytest.raises(LorakitError, match="meaning"):
        read_rows(missing)
