from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from guardloop.core.datafiles import (
    BadRow,
    DataFileError,
    Example,
    load_examples,
    sha256_file,
)
from guardloop.core.labels import LABELS


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


def error_of(*args: object, **kwargs: object) -> str:
    with pytest.raises(DataFileError) as info:
        load_examples(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tsv_with_stray_whitespace_labels_and_discard_alias(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.tsv",
        "text\tlabel\n"
        "  I feel like hurting myself  \t Self-Harm \n"
        "what's the weather\tdiscard\n"
        "can I sue my landlord?\tLEGAL-ADVICE\r\n",
    )
    data = load_examples([path])
    assert data.examples == [
        Example("I feel like hurting myself", "self-harm"),
        Example("what's the weather", "not-harmful"),
        Example("can I sue my landlord?", "legal-advice"),
    ]
    assert data.bad_rows == []
    assert set(data.fingerprints) == {str(path)}


def test_csv_with_quoted_commas_quotes_and_newlines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        'Label,Text\nmedical-advice,"my chest hurts, what do I take?"\nnot-harmful,"she said ""hi"",\nthen left"\n',
    )
    data = load_examples([path])
    assert data.examples == [
        Example("my chest hurts, what do I take?", "medical-advice"),
        Example('she said "hi",\nthen left', "not-harmful"),
    ]


def test_jsonl_and_ndjson(tmp_path: Path) -> None:
    a = write(
        tmp_path / "a.jsonl",
        json.dumps({"text": "should I buy bitcoin", "label": "financial"})
        + "\n\n   \n"
        + json.dumps({"Message": "hello\u2028there", "Category": "safe", "extra": 1})
        + "\n",
    )
    b = write(tmp_path / "b.ndjson", json.dumps({"input": "help, fire!", "label": "emergency"}))
    data = load_examples([a, str(b)])
    assert data.examples == [
        Example("should I buy bitcoin", "financial-advice"),
        Example("hello\u2028there", "not-harmful"),
        Example("help, fire!", "emergency-situation"),
    ]
    assert set(data.fingerprints) == {str(a), str(b)}


def test_text_column_preference_order(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "id,content,title,label\n1,the content,the title,safe\n")
    assert load_examples([path]).examples == [Example("the title", "not-harmful")]


@pytest.mark.parametrize(
    ("text_column", "label_column"),
    [("Body", "Cls"), ("body", "CLS"), (1, 2), ("1", "2"), (" 1 ", 2)],
)
def test_column_override_by_name_and_index(tmp_path: Path, text_column: str | int, label_column: str | int) -> None:
    path = write(tmp_path / "a.tsv", "id\tBody\tCls\ttext\n7\tthe body\tlegal\tdecoy\n")
    data = load_examples([path], text_column=text_column, label_column=label_column)
    assert data.examples == [Example("the body", "legal-advice")]


def test_digit_string_matches_header_name_before_index(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "0,1,label\nfirst,second,safe\n")
    assert load_examples([path], text_column="1").examples == [Example("second", "not-harmful")]
    assert load_examples([path], text_column="0").examples == [Example("first", "not-harmful")]


def test_column_override_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "a,b\nx,safe\n")
    message = error_of([path], text_column="nope", label_column="b")
    assert str(path) in message and "'nope'" in message and "'a', 'b'" in message
    message = error_of([path], text_column=5, label_column="b")
    assert "out of range" in message and "2 columns" in message
    assert "same column" in error_of([path], text_column="b", label_column=1)
    jsonl = write(tmp_path / "a.jsonl", '{"text": "x", "label": "safe"}\n')
    assert "by name" in error_of([jsonl], text_column=0)


def test_unknown_label_names_file_line_and_accepted_labels(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.tsv",
        'text\tlabel\nfine\tsafe\n\n"two\nlines"\tmedical\nthis one\tspam\n',
    )
    message = error_of([path])
    assert message.startswith(f"{path}:6: ")
    assert "'spam'" in message
    for label in LABELS:
        assert label in message


def test_skip_bad_rows_collects_them_with_line_numbers(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        "text,label\n"
        "good one,safe\n"  # 2
        "bad label,spam\n"  # 3
        "   ,legal\n"  # 4
        "only text\n"  # 5
        "good two,legal\n"  # 6
        "too,many,fields\n"  # 7
        "trailing empty fields are fine,medical,,\n"  # 8
        "no label,\n",  # 9
    )
    jsonl = write(
        tmp_path / "b.jsonl",
        '{"text": "fine", "label": "safe"}\n'  # 1
        "{not json\n"  # 2
        '{"text": 3, "label": "safe"}\n'  # 3
        '["text", "safe"]\n'  # 4
        '{"label": "safe"}\n'  # 5
        '{"text": "no label"}\n'  # 6
        '{"text": "null label", "label": null}\n',  # 7
    )
    data = load_examples([path, jsonl], skip_bad_rows=True)
    assert data.examples == [
        Example("good one", "not-harmful"),
        Example("good two", "legal-advice"),
        Example("trailing empty fields are fine", "medical-advice"),
        Example("fine", "not-harmful"),
    ]
    assert [(row.path, row.line) for row in data.bad_rows] == [
        (path, 3),
        (path, 4),
        (path, 5),
        (path, 7),
        (path, 9),
        (jsonl, 2),
        (jsonl, 3),
        (jsonl, 4),
        (jsonl, 5),
        (jsonl, 6),
        (jsonl, 7),
    ]
    reasons = [row.reason for row in data.bad_rows]
    assert "unknown label 'spam'" in reasons[0]
    assert reasons[1] == "empty text"
    assert "found 1" in reasons[2]
    assert "quote fields" in reasons[3]
    assert reasons[4] == "empty label"
    assert "malformed JSON" in reasons[5]
    assert "must be a string" in reasons[6] and "number" in reasons[6]
    assert "JSON object" in reasons[7]
    assert "no text field" in reasons[8]
    assert "no label field" in reasons[9]
    assert "must be a string" in reasons[10]
    assert all(isinstance(row, BadRow) and "\n" not in row.reason for row in data.bad_rows)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "missing.tsv"
    assert error_of([missing]) == f"{missing}: no such file"
    assert "is a directory" in error_of([tmp_path])
    with pytest.raises(DataFileError, match="no such file"):
        sha256_file(missing)


def test_unknown_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "data.parquet", "text,label\nx,safe\n")
    message = error_of([path])
    assert str(path) in message
    for suffix in (".tsv", ".csv", ".jsonl", ".ndjson"):
        assert suffix in message


def test_no_text_column_lists_headers(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "id,body,label\n1,hello,safe\n")
    message = error_of([path])
    assert message.startswith(f"{path}: no text column")
    assert "text, title, input, message, content" in message
    assert "'id', 'body', 'label'" in message
    assert "--text-column" in message


def test_no_label_column_when_required(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "text,score\nhello,1\n")
    message = error_of([path])
    assert "no label column" in message and "'text', 'score'" in message and "--label-column" in message


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.tsv", b"text\tlabel\nok\tsafe\nbad \xff byte\tsafe\n")
    message = error_of([path])
    assert message.startswith(f"{path}:3: ") and "UTF-8" in message
    jsonl = write(tmp_path / "a.jsonl", b'{"text": "ok", "label": "safe"}\n{"text": "\xc3("}\n')
    assert error_of([jsonl]).startswith(f"{jsonl}:2: ")


def test_utf8_bom_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "\ufefftext,label\nhi,safe\n".encode())
    assert load_examples([path]).examples == [Example("hi", "not-harmful")]


def test_empty_text_is_a_bad_row(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "ok", "label": "safe"}\n{"text": " \\t ", "label": "safe"}\n')
    assert error_of([path]) == f"{path}:2: empty text"


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "ok", "label": "safe"}\n\n{"text": "oops",}\n')
    message = error_of([path])
    assert message.startswith(f"{path}:3: malformed JSON")


def test_malformed_csv_quoting_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", 'text,label\nok,safe\n"unterminated,safe\nmore,safe\n')
    message = error_of([path], skip_bad_rows=True)
    assert str(path) in message and "malformed CSV" in message


def test_require_labels_false_loads_unlabeled_files(tmp_path: Path) -> None:
    tsv = write(tmp_path / "a.tsv", "message\nfirst\n\nsecond\n")
    jsonl = write(tmp_path / "b.jsonl", '{"text": "third"}\n{"text": "fourth", "label": "Medical"}\n')
    csv_file = write(tmp_path / "c.csv", "text,label\nfifth,\nsixth,legal\n")
    data = load_examples([tsv, jsonl, csv_file], require_labels=False)
    assert data.examples == [
        Example("first", None),
        Example("second", None),
        Example("third", None),
        Example("fourth", "medical-advice"),
        Example("fifth", None),
        Example("sixth", "legal-advice"),
    ]
    # Labels that are present are still checked.
    bad = write(tmp_path / "d.csv", "text,label\nx,spam\n")
    assert error_of([bad], require_labels=False).startswith(f"{bad}:2: unknown label")


def test_no_examples_is_an_error(tmp_path: Path) -> None:
    header_only = write(tmp_path / "a.tsv", "text\tlabel\n")
    blank = write(tmp_path / "b.jsonl", "\n\n")
    assert error_of([header_only, blank]) == f"no examples in {header_only}, {blank}"
    all_bad = write(tmp_path / "c.csv", "text,label\nx,spam\n")
    assert "1 bad rows skipped" in error_of([all_bad], skip_bad_rows=True)
    assert "no examples" in error_of([])
    empty = write(tmp_path / "d.csv", "")
    assert "header" in error_of([empty])


def test_fingerprints_are_stable_and_change_with_content(tmp_path: Path) -> None:
    path = write(tmp_path / "a.tsv", "text\tlabel\nhello\tsafe\n")
    first = load_examples([path]).fingerprints[str(path)]
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert load_examples([path]).fingerprints[str(path)] == first == sha256_file(path)
    write(path, "text\tlabel\nhello\tsafe \n")
    second = load_examples([path]).fingerprints[str(path)]
    assert second != first
    assert load_examples([path]).examples == [Example("hello", "not-harmful")]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_round_trip_of_random_rows(tmp_path: Path, suffix: str) -> None:
    """Whatever text we write (delimiters, quotes, newlines, unicode), we read the same text back."""
    rng = random.Random(1234 + len(suffix))
    alphabet = "ab ,\t\"'\n\r\\{}[]:é漢😀\u2028"
    rows = []
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        label = rng.choice(LABELS)
        rows.append((text, label))
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows), "utf-8")
    else:
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    data = load_examples([path], skip_bad_rows=True)
    expected = [Example(t.strip(), lab) for t, lab in rows if t.strip()]
    assert data.examples == expected
    assert len(data.bad_rows) == len(rows) - len(expected)
    assert all(row.reason == "empty text" for row in data.bad_rows)
