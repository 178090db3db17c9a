"""Headers every response carries, whoever answered it (a route, the body-size limit, the rate limit, a 404).

A route that sets one of them itself (the reviewer page sets its own, plus a strict Content-Security-Policy)
keeps its value: a header is only added where it is missing.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),  # a JSON answer is never sniffed into HTML or script
    (b"x-frame-options", b"DENY"),  # no page of ours inside someone else's frame (clickjacking)
    (b"referrer-policy", b"no-referrer"),  # URLs of this service never leak to other sites
)


class SecurityHeaders:
    """Pure ASGI middleware: adds SECURITY_HEADERS to every HTTP response that lacks them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(header for header in SECURITY_HEADERS if header[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
