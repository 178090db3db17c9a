"""Label Studio tasks and Argilla records: the pool's items and answers out, a labeling tool's answers back in.

Pure conversion, no database (exchange.py does the reading and the all-or-nothing writing).

Label Studio (JSON export / import, "Label Studio Task Format"): one task per item, `data.text` the text and
`data.guardloop_item_id` the item; every answer an annotation whose result is a `choices` value of the control
named `label` on the object named `text` (`was_cancelled` for a skip), with `completed_by`, `created_at` and
`updated_at`; the model's guess a prediction (`model_version`, `score`) that the tool shows as a pre-annotation.

Argilla (2.x `Record.to_dict()` / `from_dict()`, what `dataset.records.to_json()` writes): one record per item,
`fields.text`, `metadata.guardloop_item_id`; every answer a response to the question `label` with `value` and
`user_id`; the model's guess the `label` suggestion (`value`, `score`, `agent`). Argilla user ids are UUIDs: a
reviewer's is uuid5 of the name, and `metadata.guardloop_reviewers` maps them back; a response carries no time,
so `metadata.guardloop_answered_at` keeps each reviewer's (without it, an import is stamped with the import time).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from guardloop.storage.pool import StoredItem
from guardloop.storage.review_records import ANSWERS, LabelView
from guardloop.storage.tables import SKIP

LABEL_STUDIO = "label-studio"
ARGILLA = "argilla"
FORMATS = (LABEL_STUDIO, ARGILLA)
CONTROL = "label"  # Label Studio's <Choices name>, Argilla's LabelQuestion name
OBJECT = "text"  # Label Studio's <Text name>, Argilla's TextField name
_REVIEWER_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://guardloop/reviewers")
MAX_REVIEWER_CHARS = 64  # labels.reviewer


class ExchangeError(Exception):
    """A file that cannot be imported; the message names the record and what to fix."""


@dataclass(frozen=True)
class ImportedAnswer:
    record: int  # 1-based position in the file, for messages
    item_id: int | None  # None: find the item by its text
    text: str
    reviewer: str
    label: str
    answered_at: datetime | None  # None: the time of the import


def reviewer_uuid(name: str) -> str:
    """A reviewer's Argilla user id: stable, so the same reviewer is the same Argilla user in every export."""
    return str(uuid.uuid5(_REVIEWER_NAMESPACE, name))


# ------------------------------------------------------------------ export
def export_record(fmt: str, item: StoredItem, answers: Iterable[LabelView]) -> dict[str, Any]:
    """One item with its live answers (reviews, not adjudications) and the model's guess, in `fmt`."""
    answers = list(answers)
    score = round(float(item.scores.get(item.label, 0.0)), 4)
    if fmt == LABEL_STUDIO:
        return {
            "data": {OBJECT: item.text, "guardloop_item_id": item.id},
            "annotations": [_ls_annotation(answer) for answer in answers],
            "predictions": [
                {
                    "model_version": item.model_version,
                    "score": score,
                    "result": [_ls_choice(item.label) | {"score": score}],
                }
            ],
        }
    return {
        "id": str(item.id),
        "fields": {OBJECT: item.text},
        "metadata": {
            "guardloop_item_id": item.id,
            "guardloop_reviewers": {reviewer_uuid(a.reviewer): a.reviewer for a in answers},
            "guardloop_answered_at": {reviewer_uuid(a.reviewer): a.created_at.isoformat() for a in answers},
        },
        "suggestions": {CONTROL: {"value": item.label, "score": score, "agent": item.model_version}},
        "responses": {CONTROL: [_argilla_response(answer) for answer in answers]},
        "vectors": {},
        "_server_id": None,
    }


def _ls_choice(label: str) -> dict[str, Any]:
    return {"from_name": CONTROL, "to_name": OBJECT, "type": "choices", "value": {"choices": [label]}}


def _ls_annotation(answer: LabelView) -> dict[str, Any]:
    skipped = answer.label == SKIP
    return {
        "result": [] if skipped else [_ls_choice(answer.label)],
        "was_cancelled": skipped,
        "ground_truth": False,
        "completed_by": {"email": answer.reviewer},
        "created_at": answer.created_at.isoformat(),
        "updated_at": answer.created_at.isoformat(),
    }


def _argilla_response(answer: LabelView) -> dict[str, Any]:
    if answer.label == SKIP:
        return {"value": None, "user_id": reviewer_uuid(answer.reviewer), "status": "discarded"}
    return {"value": answer.label, "user_id": reviewer_uuid(answer.reviewer)}


# ------------------------------------------------------------------ import
def parse_records(fmt: str, records: Any) -> list[ImportedAnswer]:
    """Every answer in a parsed JSON file of `fmt`; ExchangeError on the first thing wrong."""
    if fmt not in FORMATS:
        raise ExchangeError(f"unknown format {fmt!r}; use {' or '.join(FORMATS)}")
    if not isinstance(records, list):
        raise ExchangeError(f"expected a JSON array of {'tasks' if fmt == LABEL_STUDIO else 'records'}")
    parse = _ls_answers if fmt == LABEL_STUDIO else _argilla_answers
    answers: list[ImportedAnswer] = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ExchangeError(f"record {number}: expected a JSON object")
        answers += parse(number, record)
    return answers


def _ls_answers(number: int, task: dict[str, Any]) -> list[ImportedAnswer]:
    data = _object(number, task, "data")
    text, item_id = _text(number, data.get(OBJECT), "data.text"), _item_id(number, data.get("guardloop_item_id"))
    answers = []
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict):
            raise ExchangeError(f"record {number}: an annotation is not a JSON object")
        reviewer = _ls_reviewer(number, annotation.get("completed_by"))
        when = _time(number, annotation.get("updated_at") or annotation.get("created_at"))
        if annotation.get("was_cancelled"):
            answers.append(ImportedAnswer(number, item_id, text, reviewer, SKIP, when))
            continue
        choices = [
            choice
            for result in annotation.get("result") or []
            if isinstance(result, dict) and result.get("from_name") == CONTROL
            for choice in ((result.get("value") or {}).get("choices") or [])
        ]
        if len(choices) != 1:
            raise ExchangeError(
                f"record {number}: an annotation by {reviewer} has {len(choices)} choices of {CONTROL!r}; "
                'exactly one is needed (a single-choice <Choices name="label" toName="text">)'
            )
        answers.append(ImportedAnswer(number, item_id, text, reviewer, _label(number, choices[0]), when))
    return answers


def _argilla_answers(number: int, record: dict[str, Any]) -> list[ImportedAnswer]:
    fields = _object(number, record, "fields")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ExchangeError(f"record {number}: metadata must be a JSON object")
    text = _text(number, fields.get(OBJECT), "fields.text")
    item_id = _item_id(number, metadata.get("guardloop_item_id", record.get("id")), lenient=True)
    names = metadata.get("guardloop_reviewers") or {}
    times = metadata.get("guardloop_answered_at") or {}
    responses = (record.get("responses") or {}).get(CONTROL) or []
    answers = []
    for response in responses:
        if not isinstance(response, dict) or not response.get("user_id"):
            raise ExchangeError(f"record {number}: a response without a user_id")
        status = response.get("status") or "submitted"
        if status == "draft":
            continue  # not an answer yet
        user = str(response["user_id"])
        reviewer = _name(number, str(names.get(user) or f"argilla:{user}"))
        label = SKIP if status == "discarded" else _label(number, response.get("value"))
        when = _time(number, times.get(user))
        answers.append(ImportedAnswer(number, item_id, text, reviewer, label, when))
    return answers


def _object(number: int, record: dict[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key)
    if not isinstance(value, dict):
        raise ExchangeError(f"record {number}: no {key!r} object")
    return value


def _text(number: int, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ExchangeError(f"record {number}: {where} must be the item's text")
    return value


def _item_id(number: int, value: Any, *, lenient: bool = False) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if lenient:  # an Argilla record id that is not ours (a UUID): find the item by its text
        return None
    raise ExchangeError(f"record {number}: guardloop_item_id must be an integer, not {value!r}")


def _label(number: int, value: Any) -> str:
    if value not in ANSWERS:
        raise ExchangeError(f"record {number}: unknown label {value!r}; use one of {', '.join(ANSWERS)}")
    return str(value)


def _ls_reviewer(number: int, value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("email") or value.get("username") or value.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"label-studio:{value}"  # a Label Studio user id: one reviewer name per user
    if isinstance(value, str) and value.strip():
        return _name(number, value.strip())
    raise ExchangeError(f"record {number}: an annotation without completed_by (who answered)")


def _name(number: int, name: str) -> str:
    if len(name) > MAX_REVIEWER_CHARS:
        raise ExchangeError(f"record {number}: reviewer name longer than {MAX_REVIEWER_CHARS} characters")
    return name


def _time(number: int, value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        raise ExchangeError(f"record {number}: {value!r} is not an ISO 8601 time") from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)  # Label Studio writes UTC with or without "Z"
    if when > datetime.now(UTC):
        raise ExchangeError(f"record {number}: answer time {value} is in the future")
    return when
