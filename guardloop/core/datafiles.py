"""Loading labeled (or unlabeled) text examples from TSV, CSV and JSONL files.

Every problem is reported as one line naming the file, the physical line and what to fix. Rows that
cannot be used ("bad rows") either stop the load or, with ``skip_bad_rows``, are collected and skipped.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardloop.core.labels import LABELS, UnknownLabelError, parse_label

TEXT_COLUMNS: tuple[str, ...] = ("text", "title", "input", "message", "content")
LABEL_COLUMNS: tuple[str, ...] = ("label", "category")

_DELIMITERS: dict[str, str] = {".tsv": "\t", ".csv": ","}
_JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")
ACCEPTED_SUFFIXES: tuple[str, ...] = (*_DELIMITERS, *_JSONL_SUFFIXES)

ColumnSpec = str | int | None


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None  # canonical label, None when loading unlabeled


@dataclass(frozen=True)
class BadRow:
    path: Path
    line: int  # 1-based physical line in the file (the header is line 1 for TSV/CSV)
    reason: str


class DataFileError(Exception):
    """One readable line: names the file, the line (if any) and what to fix."""


@dataclass
class LoadedData:
    examples: list[Example]
    bad_rows: list[BadRow]
    fingerprints: dict[str, str]  # str(path) -> "sha256:<hex>" of the file bytes


def sha256_file(path: Path | str) -> str:
    """Return "sha256:<hex>" of the file's bytes."""
    return _fingerprint(_read_bytes(Path(path)))


def load_examples(
    paths: Sequence[Path | str],
    *,
    text_column: ColumnSpec = None,
    label_column: ColumnSpec = None,
    require_labels: bool = True,
    skip_bad_rows: bool = False,
) -> LoadedData:
    """Load examples from `paths` (format by extension: .tsv, .csv, .jsonl, .ndjson).

    Columns are found by name (case-insensitive): text is the first of TEXT_COLUMNS present, label the
    first of LABEL_COLUMNS. `text_column` / `label_column` override this with a header/field name or, for
    TSV/CSV, a 0-based index (an int or a digit string such as "1"; a header literally named so wins).

    With `require_labels=False`, labels are still read and checked where a label column exists, and are
    None where it does not (or the cell is empty).
    """
    examples: list[Example] = []
    bad_rows: list[BadRow] = []
    fingerprints: dict[str, str] = {}
    for raw_path in paths:
        path = Path(raw_path)
        data = _read_bytes(path)
        suffix = path.suffix.lower()
        if suffix in _DELIMITERS:
            rows = _delimited_rows(
                path, _decode(path, data), _DELIMITERS[suffix], text_column, label_column, require_labels
            )
        elif suffix in _JSONL_SUFFIXES:
            rows = _jsonl_rows(path, _decode(path, data), text_column, label_column, require_labels)
        else:
            raise DataFileError(
                f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
                f"accepted extensions: {', '.join(ACCEPTED_SUFFIXES)}"
            )
        fingerprints[str(path)] = _fingerprint(data)
        for row in rows:
            if isinstance(row, Example):
                examples.append(row)
            elif skip_bad_rows:
                bad_rows.append(row)
            else:
                raise DataFileError(f"{row.path}:{row.line}: {row.reason}")
    if not examples:
        where = ", ".join(str(p) for p in paths) or "(no files given)"
        skipped = f" ({len(bad_rows)} bad rows skipped)" if bad_rows else ""
        raise DataFileError(f"no examples in {where}{skipped}")
    return LoadedData(examples=examples, bad_rows=bad_rows, fingerprints=fingerprints)


def _fingerprint(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataFileError(f"{path}: is a directory, expected a data file") from None
    except PermissionError:
        raise DataFileError(f"{path}: cannot read the file (permission denied)") from None
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _decode(path: Path, data: bytes) -> str:
    # A BOM is what spreadsheet programs write for "UTF-8"; without stripping it the first header
    # would be "\ufefftext" and never match.
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[offset:].decode("utf-8")
    except UnicodeDecodeError as exc:
        position = offset + exc.start
        line = data.count(b"\n", 0, position) + 1
        column = position - (data.rfind(b"\n", 0, position) + 1) + 1
        raise DataFileError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[position]:02x} at column {column}); "
            "re-save the file as UTF-8"
        ) from None


def _make_example(path: Path, line: int, text: str, label: str | None, require_labels: bool) -> Example | BadRow:
    text = text.strip()
    if not text:
        return BadRow(path, line, "empty text")
    if label is None or not label.strip():
        if require_labels:
            return BadRow(path, line, "empty label" if label is not None else "missing label")
        return Example(text, None)
    try:
        return Example(text, parse_label(label))
    except UnknownLabelError as exc:
        return BadRow(path, line, str(exc))


# --- TSV / CSV ---------------------------------------------------------------------------------


def _delimited_rows(
    path: Path,
    content: str,
    delimiter: str,
    text_column: ColumnSpec,
    label_column: ColumnSpec,
    require_labels: bool,
) -> Iterator[Example | BadRow]:
    # newline="" hands line endings to the csv module untouched, so quoted fields may contain newlines.
    # strict=True turns broken quoting into an error instead of silently swallowing following lines.
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    text_index = label_index = 0
    last_line = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            detail = str(exc).replace("\t", "\\t").replace("\n", "\\n")
            raise DataFileError(
                f"{path}:{reader.line_num}: malformed {_format_name(path)} ({detail}); a field that starts "
                'with " must be quoted to its end, with inner quotes doubled ("")'
            ) from None
        # A record may span several physical lines; report the line it starts on.
        line = last_line + 1
        last_line = reader.line_num
        if not any(field.strip() for field in row):
            continue
        if header is None:
            header = row
            text_index, label_index = _resolve_columns(path, header, text_column, label_column, require_labels)
            continue
        needed = max(text_index, -1 if label_index is None else label_index)
        if len(row) <= needed:
            yield BadRow(path, line, f"expected {len(header)} fields as in the header, found {len(row)}")
            continue
        if any(field.strip() for field in row[len(header) :]):
            yield BadRow(
                path,
                line,
                f"expected {len(header)} fields as in the header, found {len(row)}; "
                f"quote fields that contain {_delimiter_name(delimiter)}",
            )
            continue
        label = None if label_index is None else row[label_index]
        yield _make_example(path, line, row[text_index], label, require_labels)
    if header is None:
        raise DataFileError(f"{path}: empty file; expected a header row naming the columns")


def _resolve_columns(
    path: Path,
    header: list[str],
    text_column: ColumnSpec,
    label_column: ColumnSpec,
    require_labels: bool,
) -> tuple[int, int | None]:
    text_index = _find_column(path, header, text_column, TEXT_COLUMNS, "text", required=True)
    label_index = _find_column(
        path,
        header,
        label_column,
        LABEL_COLUMNS,
        "label",
        required=require_labels or label_column is not None,
    )
    assert text_index is not None  # required=True never returns None
    if text_index == label_index:
        raise DataFileError(
            f"{path}: text and label are the same column ({_show_headers([header[text_index]])}); "
            "pass --text-column and --label-column naming different columns"
        )
    return text_index, label_index


def _find_column(
    path: Path, header: list[str], spec: ColumnSpec, candidates: tuple[str, ...], what: str, *, required: bool
) -> int | None:
    names = [name.strip().lower() for name in header]
    option = f"--{what}-column"
    if spec is None:
        for candidate in candidates:
            if candidate in names:
                return names.index(candidate)
        if not required:
            return None
        raise DataFileError(
            f"{path}: no {what} column (looked for {', '.join(candidates)}); "
            f"headers found: {_show_headers(header)}; pass {option} NAME|INDEX"
        )
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in names:
            return names.index(key)
        if not (key.isascii() and key.isdigit()):
            raise DataFileError(f"{path}: no column named {spec!r} ({option}); headers found: {_show_headers(header)}")
        spec = int(key)
    if not 0 <= spec < len(header):
        raise DataFileError(
            f"{path}: {option} {spec} is out of range; the header has {len(header)} columns "
            f"(0-based): {_show_headers(header)}"
        )
    return spec


def _show_headers(header: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in header) or "(none)"


def _format_name(path: Path) -> str:
    return path.suffix.lstrip(".").upper()


def _delimiter_name(delimiter: str) -> str:
    return "tabs" if delimiter == "\t" else repr(delimiter)


# --- JSONL -------------------------------------------------------------------------------------


def _jsonl_rows(
    path: Path,
    content: str,
    text_column: ColumnSpec,
    label_column: ColumnSpec,
    require_labels: bool,
) -> Iterator[Example | BadRow]:
    for spec, option in ((text_column, "--text-column"), (label_column, "--label-column")):
        if isinstance(spec, int):
            raise DataFileError(f"{path}: {option} {spec} is a column index; JSONL fields are selected by name")
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc., which are legal in JSON strings.
    for line, raw in enumerate(content.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            yield BadRow(path, line, f"malformed JSON ({detail}); expected one JSON object per line")
            continue
        if not isinstance(obj, dict):
            yield BadRow(path, line, f"expected a JSON object, found {_json_type(obj)}")
            continue
        yield _jsonl_example(path, line, obj, text_column, label_column, require_labels)


def _jsonl_example(
    path: Path,
    line: int,
    obj: dict[str, Any],
    text_column: ColumnSpec,
    label_column: ColumnSpec,
    require_labels: bool,
) -> Example | BadRow:
    fields: dict[str, str] = {}
    for key in obj:
        fields.setdefault(key.strip().lower(), key)

    def lookup(spec: ColumnSpec, candidates: tuple[str, ...]) -> str | None:
        wanted = candidates if spec is None else (str(spec).strip().lower(),)
        return next((fields[name] for name in wanted if name in fields), None)

    def missing(spec: ColumnSpec, candidates: tuple[str, ...], what: str) -> BadRow:
        looked = f"no field {spec!r}" if spec is not None else f"no {what} field (looked for {', '.join(candidates)})"
        found = ", ".join(repr(key) for key in obj) or "(none)"
        return BadRow(path, line, f"{looked}; fields found: {found}; pass --{what}-column NAME")

    text_key = lookup(text_column, TEXT_COLUMNS)
    if text_key is None:
        return missing(text_column, TEXT_COLUMNS, "text")
    text = obj[text_key]
    if not isinstance(text, str):
        return BadRow(path, line, f"field {text_key!r} must be a string, found {_json_type(text)}")

    label_key = lookup(label_column, LABEL_COLUMNS)
    if label_key is None:
        if require_labels or label_column is not None:
            return missing(label_column, LABEL_COLUMNS, "label")
        return _make_example(path, line, text, None, require_labels)
    label = obj[label_key]
    if label is None and not require_labels:
        return _make_example(path, line, text, None, require_labels)
    if not isinstance(label, str):
        return BadRow(path, line, f"field {label_key!r} must be a string, found {_json_type(label)}")
    return _make_example(path, line, text, label, require_labels)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def stratified_split(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(kept, held_out): `fraction` of every class held out, chosen with `seed` (the cycle's dev split, the
    simulation's eval split)."""
    rng = np.random.default_rng(seed)
    kept: list[Example] = []
    held: list[Example] = []
    for label in LABELS:
        members = [ex for ex in examples if ex.label == label]
        order = rng.permutation(len(members))
        cut = round(fraction * len(members))
        held += [members[i] for i in order[:cut]]
        kept += [members[i] for i in order[cut:]]
    return kept, held
