"""How errors read: one line per problem, and OpenAI's error envelope on the OpenAI-compatible routes."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException as StarletteHTTPException


def describe_validation_error(exc: RequestValidationError) -> str:
    """One readable line per problem ("body.texts.0: Input should be a valid string") instead of raw dicts."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    return "; ".join(problems)


def document_validation_errors_as_text(app: FastAPI) -> None:
    """Make the OpenAPI schema say what a 422 really holds: `detail` is one string (describe_validation_error),
    not FastAPI's default list of objects, which every route without its own 422 entry would otherwise claim."""
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build_schema()
            schemas = schema.get("components", {}).get("schemas", {})
            if "HTTPValidationError" in schemas:
                schemas["HTTPValidationError"] = {
                    "title": "HTTPValidationError",
                    "type": "object",
                    "properties": {"detail": {"type": "string", "title": "Detail", "description": "what to fix"}},
                    "required": ["detail"],
                }
        return app.openapi_schema  # type: ignore[return-value]  (set by build_schema)

    app.openapi = openapi  # type: ignore[method-assign]


# FastAPI's wording when it cannot decode a body at all says nothing about what to fix; ours does. FastAPI keeps
# the reason as the exception's cause: bytes that are not UTF-8, or JSON nested deeper than Python's parser goes.
_FASTAPI_UNREADABLE_BODY = "There was an error parsing the body"
UNREADABLE_BODY = "the body is not valid UTF-8; send JSON encoded as UTF-8"
NESTED_TOO_DEEPLY = "JSON nested too deeply; send the documented shape (a few levels of objects and arrays)"
UNPARSABLE_BODY = "the body could not be parsed as JSON; send a JSON object encoded as UTF-8"


def http_error_detail(exc: StarletteHTTPException) -> str:
    if exc.status_code == 400 and exc.detail == _FASTAPI_UNREADABLE_BODY:
        if isinstance(exc.__cause__, RecursionError):
            return NESTED_TOO_DEEPLY
        if isinstance(exc.__cause__, UnicodeDecodeError):
            return UNREADABLE_BODY
        return UNPARSABLE_BODY
    return str(exc.detail)


def http_error_response(exc: StarletteHTTPException) -> Response:
    """How every HTTP error reads: `{"detail": "<what to fix>"}` with the exception's headers (FastAPI's own
    handler, with the clearer detail). The app's handler and /classify's fast path both answer with it."""
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": http_error_detail(exc)}, status_code=exc.status_code, headers=exc.headers)


_OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_exceeded"}


def openai_error_response(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Both envelopes: `detail` as on every guardloop route, `error` as OpenAI's clients read it."""
    kind = _OPENAI_ERROR_TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")
    body = {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status_code, headers=headers)


class OpenAIErrorRoute(APIRoute):
    """A route whose errors (validation, limits, auth, no model) also carry OpenAI's `error` object.

    The official `openai` client puts only `error.message` into its exception text, so without this a
    drop-in client would see "Error code: 422" and not what to fix.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return openai_error_response(422, describe_validation_error(exc))
            except StarletteHTTPException as exc:  # FastAPI raises Starlette's own for a body it cannot read
                return openai_error_response(exc.status_code, http_error_detail(exc), exc.headers)

        return handle
