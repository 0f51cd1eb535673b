"""What every response carries, and what every POST must prove."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)


class SecurityHeaders:
    """Adds :data:`HEADERS` to every HTTP response, errors included (a pure
    ASGI middleware: request bodies stream through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = kept + list(HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def is_plain_localhost(base_url: str) -> bool:
    """Cookies may go without ``Secure`` only on plain http://localhost."""
    parts = urlsplit(base_url)
    return parts.scheme == "http" and parts.hostname == "localhost"


def same_origin(headers: dict[str, str], expected: str) -> bool:
    """The request comes from the console's own pages: its ``Origin`` is the
    console's, or (browsers send ``Origin: null`` under ``Referrer-Policy:
    no-referrer``) the browser itself says ``Sec-Fetch-Site: same-origin``."""
    origin = headers.get("origin")
    if origin and origin != "null":
        return origin.lower() == expected
    return headers.get("sec-fetch-site") == "same-origin"
