"""Who is calling: API keys for /classify (only when some are configured) and reviewer tokens for /review.

Secrets are compared in constant time and never logged; only names (client, reviewer) leave this module.
The admin token check lives in service/deps.py (require_admin).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status
from guardloop.service.deps import bearer_token, get_database, get_settings
from guardloop.service.pool_writer import MAX_CLIENT_ID_CHARS

from guardloop.core.settings import Settings
from guardloop.storage import Database, DatabaseUnavailable, ReviewerRepository


def _client_header(value: str | None) -> str | None:
    # A self-declared client name for the pool (no keys configured): printable and short, or nothing.
    if not value:
        return None
    cleaned = "".join(ch for ch in value.strip() if ch.isprintable())[:MAX_CLIENT_ID_CHARS]
    return cleaned or None


# The header a caller may name itself by, as /docs shows it on the routes that read it (`openapi_extra`).
CLIENT_ID_HEADER_DOC = {
    "parameters": [
        {
            "name": "X-Client-Id",
            "in": "header",
            "required": False,
            "description": "your client's name, kept with pooled texts",
            "schema": {"type": "string"},
        }
    ]
}


async def client_identity(request: Request) -> str | None:
    """The caller's client name (kept with pooled texts as request.state.client_id).

    With `api_keys` configured a valid key is required and names the client; otherwise X-Client-Id may.
    It reads its headers and the settings from the request itself, not as FastAPI parameters: FastAPI analyses
    every parameter of every dependency on every call, and these four made a /classify request's Python work
    1,797 function calls instead of 1,406 (cProfile, in process). CLIENT_ID_HEADER_DOC keeps the header in /docs.
    """
    settings: Settings = request.app.state.settings
    headers = request.headers
    if not settings.api_keys:
        request.state.client_id = _client_header(headers.get("x-client-id"))
        return request.state.client_id
    presented = headers.get("x-api-key") or bearer_token(headers.get("authorization"))
    if not presented:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    matched: str | None = None
    for name, key in settings.api_keys.items():  # every key is compared, so timing does not say which matched
        if hmac.compare_digest(presented.encode(), key.get_secret_value().encode()):
            matched = name
    if matched is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong API key")
    request.state.client_id = matched
    return matched


def require_reviewer(
    database: Annotated[Database, Depends(get_database)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    """The reviewer's name for a valid `Authorization: Bearer <reviewer token>`."""
    token = bearer_token(authorization)
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing reviewer token: send 'Authorization: Bearer <token>' (an admin creates one with "
            "`guardloop reviewers add NAME`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        name = ReviewerRepository(database).authenticate(token)
    except DatabaseUnavailable:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable; retry shortly") from None
    if name is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "unknown or revoked reviewer token")
    return name


def review_reader(
    settings: Annotated[Settings, Depends(get_settings)],
    database: Annotated[Database, Depends(get_database)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str | None:
    """Who reads review items: None for the admin token (reads every pool item), else the reviewer's name
    (reads only the items the review repository lets them: requested ones and their own)."""
    token, expected = bearer_token(authorization), settings.admin_token_value
    if token is not None and expected and hmac.compare_digest(token.encode(), expected.encode()):
        return None
    return require_reviewer(database, authorization)


ReviewerName = Annotated[str, Depends(require_reviewer)]
ReviewReader = Annotated[str | None, Depends(review_reader)]
