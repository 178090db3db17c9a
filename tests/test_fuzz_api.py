"""schemathesis against the running service's OpenAPI: every route, with the credentials each one needs (admin
token, reviewer token, API key), valid and invalid inputs generated from the schema. No answer may be a 5xx,
and every answer must match what the schema documents (status codes, content types, bodies).

Bounded: 50 examples per operation and mode (about 15 s in all), derandomized so every run sends the same
requests; no deadline per example (a 2-core CI machine is slow at times).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from guardloop.models.registry import ModelRegistry
from guardloop.service.errors import UNREADABLE_BODY
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from guardloop.core.settings import Settings
from guardloop.storage import Database, ReviewerRepository
from tests.conftest import ADMIN_TOKEN, live_server
from tests.pool_items import seed_requested
from tests.tiny_onnx import publish_tiny

API_KEY = "fuzz-client-key-0123456789"
# Answers any route can give, from layers in front of the routes (documented in SECURITY.md, not per route):
# a body that is not UTF-8, a body over the size limit, a caller over the rate limit.
GENERIC_STATUSES = {400, 413, 429}


def documented_status(ctx, response, case):
    if response.status_code in GENERIC_STATUSES:
        return None
    return status_code_conformance(ctx, response, case)


def clear_error(ctx, response, case):
    """Every 4xx says what went wrong in a one-string `detail`, never a raw structure or an empty body."""
    if 400 <= response.status_code < 500 and response.status_code != 404:
        detail = response.json().get("detail")
        assert isinstance(detail, str) and len(detail) > 5, f"{response.status_code} without a clear detail: {detail!r}"
        assert "There was an error" not in detail, detail
    return None


CHECKS = [not_a_server_error, documented_status, content_type_conformance, response_schema_conformance, clear_error]
credentials: dict[str, str] = {}


def seed_review_queue(database: Database) -> None:
    """Pool items requested for labeling, so the review routes have something to answer about."""
    seed_requested(database, [f"fuzzing seed text {n}" for n in range(20)], {"strategy": "cluster"})


@pytest.fixture(scope="module")
def running_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    registry = ModelRegistry(tmp / "registry")
    publish_tiny(registry, tmp, seed=1)
    database_url = f"sqlite:///{tmp / 'fuzz.db'}"
    database = Database(database_url)
    database.ensure_schema()
    credentials["reviewer"] = ReviewerRepository(database).add("fuzzer")
    seed_review_queue(database)
    database.dispose()
    service_settings = Settings(
        registry_dir=registry.root,
        data_dir=tmp / "data",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        api_keys={"fuzzer": API_KEY},
        registry_poll_seconds=0.5,
    )
    with live_server(service_settings) as base:
        yield base


@pytest.fixture(scope="module")
def service_schema(running_service: str):
    return schemathesis.openapi.from_url(f"{running_service}/openapi.json")


def credentials_for(path: str) -> dict[str, str]:
    if path.startswith("/admin"):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if path.startswith("/review"):
        return {"Authorization": f"Bearer {credentials['reviewer']}"}
    if path in ("/classify", "/v1/moderations"):
        return {"Authorization": f"Bearer {API_KEY}"}
    return {}


def fuzz_operation(operation, mode: GenerationMode, examples: int) -> str | None:
    """Run `examples` generated cases against one operation; the shrunk failure, if any, as text."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def run(case) -> None:
        case.headers = {**(case.headers or {}), **credentials_for(case.path)}
        response = case.call(timeout=30)
        case.validate_response(response, checks=CHECKS)

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body): the valid run covers it
        return None
    except Exception as exc:  # a check failed (or the call did): report it with the operation
        return f"{operation.label} ({mode.value}): {exc}"
    return None


# (pytest's schemathesis plugin is not used: 4.32 reads a private pytest attribute that pytest 9 removed.)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_route_answers_a_5xx_or_off_schema(service_schema, mode):
    operations = [result.ok() for result in service_schema.get_all_operations()]
    assert len(operations) >= 15  # every route of the API is in the schema, so every route is fuzzed
    failures = [failure for operation in operations if (failure := fuzz_operation(operation, mode, 50))]
    assert failures == [], "\n\n".join(failures)


def test_what_the_fuzzer_found_stays_fixed(running_service):
    """Each of these was a 500 (or an unhelpful 400) before: numbers past the database's integers, an age past
    the calendar, a body that is not UTF-8."""
    import httpx

    reviewer = credentials_for("/review")
    admin = credentials_for("/admin")
    with httpx.Client(base_url=running_service, timeout=10) as client:
        huge_id = client.get("/review/items/99999999999999999999", headers=reviewer)
        assert huge_id.status_code == 422 and "less than or equal to" in huge_id.json()["detail"]
        label = client.post("/review/items/99999999999999999999/label", json={"label": "skip"}, headers=reviewer)
        assert label.status_code == 422
        purge = client.post("/admin/pool/purge", params={"older_than_days": "1e308"}, headers=admin)
        assert purge.status_code == 422 and "older_than_days" in purge.json()["detail"]
        body = b'{"text": "\xff\xfe"}'
        for path in ("/classify", "/v1/moderations"):
            unreadable = client.post(
                path, content=body, headers={"content-type": "application/json", **credentials_for(path)}
            )
            assert unreadable.status_code == 400 and unreadable.json()["detail"] == UNREADABLE_BODY
        assert unreadable.json()["error"]["message"] == UNREADABLE_BODY  # OpenAI's envelope too
