"""/classify without FastAPI's request machinery, for the requests that need none of it.

Through FastAPI a /classify request made 1,164 Python function calls, through this path 762 (cProfile, in process):
the rest were Starlette's exception middleware, FastAPI's routing, body reading, content-type parsing, json.loads,
dependency solving and body validation, before the route ran. This pure ASGI layer sits inside every middleware
(metrics, security headers, rate limits, the body-size limit) and in front of FastAPI: for a POST /classify with a
JSON body it validates the body with pydantic-core straight from the bytes, checks the caller (client_identity) and
calls the route's own function, so the answer is the route's answer. Whatever it cannot take as it is goes to
FastAPI with the body replayed, and is answered exactly as before: a body that does not validate, a content type
other than JSON. An HTTP error (a missing or wrong API key, no model, overload, a rejected text) is written as the
app's own handler writes it (service/errors.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from guardloop.service.auth import client_identity
from guardloop.service.errors import http_error_response
from guardloop.service.routers.classify import classify
from guardloop.service.schemas import ClassifyRequest
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PATH = "/classify"


class ClassifyFastPath:
    """Pure ASGI: POST /classify with a valid JSON body straight to the route's function; the rest to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            body = await request.body()  # the body-size limit raises here once a streamed body passes it
        except ClientDisconnect:  # the client went away before its body arrived: nobody to answer
            return
        try:
            parsed = ClassifyRequest.model_validate_json(body)
        except ValidationError:  # FastAPI's validation says what to fix, as it always has
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            await client_identity(request)  # the route's own dependency: a wrong key is a 403 here too
            response = await classify(parsed, request)
        except HTTPException as exc:
            response = http_error_response(exc)
        await response(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, once, then the connection's own messages (a disconnect)."""
    pending: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
