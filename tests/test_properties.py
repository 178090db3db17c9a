"""Property tests (hypothesis) of the two parsers every labeled file goes through: label parsing and data-file
loading. Whatever the input, they answer or raise their own error (UnknownLabelError, DataFileError) with a
message, never anything else; and what is written in any of the formats is read back as it was."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardloop.core.datafiles import DataFileError, Example, load_examples
from guardloop.core.labels import LABELS, UnknownLabelError, parse_label

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Text as a file can hold it: any code point but lone surrogates (not encodable as UTF-8).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
LABEL_SPELLINGS = st.sampled_from(LABELS).flatmap(
    lambda label: st.sampled_from(
        [label, label.upper(), label.title(), f"  {label}\t", label.replace("-", "_"), label.replace("-", " ")]
    )
)


# ------------------------------------------------------------------ labels
@FUZZ
@given(TEXT)
def test_parse_label_returns_a_label_or_raises_unknown_label(raw):
    try:
        parsed = parse_label(raw)
    except UnknownLabelError as exc:
        assert exc.raw == raw and "accepted labels" in str(exc)
    else:
        assert parsed in LABELS
        assert parse_label(parsed) == parsed  # the canonical spelling is a fixed point


@FUZZ
@given(LABEL_SPELLINGS)
def test_every_spelling_of_a_label_parses_to_it(spelling):
    assert parse_label(spelling) in LABELS
    assert parse_label(spelling) == parse_label(spelling.strip().lower().replace("_", "-").replace(" ", "-"))


def test_canonical_labels_round_trip():
    assert [parse_label(label) for label in LABELS] == list(LABELS)


# ------------------------------------------------------------------ data files
SUFFIXES = st.sampled_from([".tsv", ".csv", ".jsonl", ".ndjson"])


def write(data: bytes, suffix: str) -> Path:
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)  # noqa: SIM115  (removed by the caller)
    with handle:
        handle.write(data)
    return Path(handle.name)


def load_quietly(path: Path, **options):
    try:
        return load_examples([path], **options)
    except DataFileError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()  # one readable line
        return None
    finally:
        path.unlink(missing_ok=True)


@FUZZ
@given(st.binary(max_size=400), SUFFIXES, st.booleans(), st.booleans())
def test_any_bytes_load_or_raise_a_data_file_error(data, suffix, require_labels, skip_bad_rows):
    loaded = load_quietly(write(data, suffix), require_labels=require_labels, skip_bad_rows=skip_bad_rows)
    if loaded is not None:
        assert loaded.examples and all(example.text == example.text.strip() != "" for example in loaded.examples)
        assert all(example.label in (*LABELS, None) for example in loaded.examples)


HEADERS = st.sampled_from([("text", "label"), ("label", "text"), ("Message", "Category"), ("content", "label")])
CELL = TEXT | st.sampled_from(LABELS) | st.sampled_from(["", "\t", '"', '""', "\n", "\r\n", ",", "\ufeff"])


@FUZZ
@given(HEADERS, st.lists(st.tuples(CELL, CELL), max_size=8), st.sampled_from([".tsv", ".csv"]), st.booleans())
def test_any_delimited_rows_load_or_raise_a_data_file_error(header, rows, suffix, skip_bad_rows):
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t" if suffix == ".tsv" else ",").writerows([header, *rows])
    loaded = load_quietly(write(buffer.getvalue().encode(), suffix), skip_bad_rows=skip_bad_rows)
    if loaded is not None:
        assert all(example.label in LABELS for example in loaded.examples)


EXAMPLES = st.lists(
    st.tuples(TEXT.filter(lambda text: text.strip() != ""), st.sampled_from(LABELS)), min_size=1, max_size=10
)


def serialize(examples: list[tuple[str, str]], suffix: str) -> bytes:
    if suffix in (".jsonl", ".ndjson"):
        return "".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in examples).encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if suffix == ".tsv" else ",")
    writer.writerow(["text", "label"])
    writer.writerows(examples)
    return buffer.getvalue().encode()


@FUZZ
@given(EXAMPLES, SUFFIXES, LABEL_SPELLINGS)
def test_what_is_written_is_read_back(examples, suffix, spelling):
    """Texts with tabs, commas, quotes, newlines, any script; written by the standard writers of each format."""
    examples = [*examples, ("one more with a spelled label", spelling)]
    loaded = load_quietly(write(serialize(examples, suffix), suffix))
    assert loaded is not None
    assert loaded.examples == [Example(text.strip(), parse_label(label)) for text, label in examples]
    assert loaded.bad_rows == []
