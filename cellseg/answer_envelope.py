"""What the service's HTTP answers carry, whichever of its layers answered: errors as JSON
(`{"error": "...", "status": N}`, as the endpoints' own refusals are) and a `Server-Timing` header.

The endpoints time their stages themselves (queue, decode, network...); answers made elsewhere
(the router's 404 for an unknown path, its 405 for a GET on an endpoint, the upload guard's
refusals, /model, /readyz) get `total;dur=` from here. Starlette's router answers 404 and 405 as
plain text ("Not Found"), which a client parsing JSON errors cannot read: those become JSON here.
BentoML's own middlewares sit outside every middleware a service adds: its 429 (over
max_concurrency) and 504 (over the traffic timeout) pass by this one, as BentoML makes them.
"""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PLAIN_ERRORS = {404: "no such endpoint: {method} {path} (the API is listed at /docs.json, the page is at /ui)",
                405: "{method} is not accepted by {path}: it takes {allow}"}
POST_HOW = " (multipart/form-data with the image, as /docs.json describes)"


class AnswerEnvelope:
    """ASGI middleware: JSON bodies for the router's plain-text 404 and 405, and a Server-Timing
    header on answers that have none."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        held: dict[str, Message] = {}

        async def send_enveloped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if message["status"] in PLAIN_ERRORS and not _is_json(headers):
                    held["start"] = message | {"headers": headers}  # sent with the JSON body instead
                    return
                if not any(name.lower() == b"server-timing" for name, _ in headers):
                    headers.append(_total_timing(start))
                await send(message | {"headers": headers})
            elif "start" in held:
                if not message.get("more_body", False):  # the router's short text, dropped: ours replaces it
                    await _send_json_error(send, held["start"], scope, start)
            else:
                await send(message)

        await self.app(scope, receive, send_enveloped)


def _total_timing(started: float) -> tuple[bytes, bytes]:
    return b"server-timing", f"total;dur={(time.perf_counter() - started) * 1000:.1f}".encode()


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-type" and b"json" in value for name, value in headers)


async def _send_json_error(send: Send, start_message: Message, scope: Scope, started: float) -> None:
    status = start_message["status"]
    allowed = next((v.decode("latin-1") for k, v in start_message["headers"] if k.lower() == b"allow"), "")
    # the router lists a route's methods from a set: sorted here, so that the message is always the same
    allow = ", ".join(sorted(m.strip() for m in allowed.split(",") if m.strip())) or "other methods"
    error = PLAIN_ERRORS[status].format(method=scope.get("method", ""), path=scope.get("path", ""), allow=allow)
    if status == 405 and "POST" in allow.split(", "):
        error += POST_HOW
    body = json.dumps({"error": error, "status": status}).encode()
    kept = [(k, v) for k, v in start_message["headers"] if k.lower() not in (b"content-type", b"content-length")]
    headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               _total_timing(started)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
