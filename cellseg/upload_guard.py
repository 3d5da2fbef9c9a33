"""An ASGI middleware that checks image uploads while they stream in, before the framework parses them.

BentoML parses a request only once the whole body has arrived (and spools it to disk), and it
treats a *text* value of a file field as a URL to download: a server-side request forgery hole
and, where the download fails, a 500. This guard runs first on the upload endpoints and answers
with a JSON 4xx (``{"error": ..., "status": ...}``) when:

- the request is not ``multipart/form-data`` (415), or has no boundary (400);
- the declared ``Content-Length``, or the bytes actually received, pass the limit (413, sent as soon
  as the limit is crossed, without reading the rest);
- the multipart body is malformed (400);
- the file field is missing, sent more than once, or sent as text rather than as a file (400);
- a text field is unknown to the endpoint or its value is invalid (400; checked by `check_fields`).

Only a body that passes is handed on, replayed from memory, to the application.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

logger = logging.getLogger("cellseg.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class UploadRejected(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


MAX_TEXT_FIELD_BYTES = 1024  # parameters are short numbers or booleans

# Checks the text fields of one endpoint: (path, {name: value}) -> raises ValueError with the reason.
FieldCheck = Callable[[str, dict[str, str]], None]


@dataclass
class _Parts:
    """What the multipart parser saw: per part, its field name and whether it carried a filename,
    and the values of text parts."""

    fields: list[tuple[str, bool]] = field(default_factory=list)
    texts: dict[str, bytearray] = field(default_factory=dict)
    _header_name: bytes = b""
    _header_value: bytes = b""
    _disposition: bytes = b""

    def callbacks(self) -> dict:
        def on_part_begin():
            self._disposition = b""

        def on_header_field(data: bytes, start: int, end: int):
            self._header_name += data[start:end]

        def on_header_value(data: bytes, start: int, end: int):
            self._header_value += data[start:end]

        def on_header_end():
            if self._header_name.strip().lower() == b"content-disposition":
                self._disposition = self._header_value
            self._header_name = self._header_value = b""

        def on_headers_finished():
            _, options = parse_options_header(self._disposition)
            name = options.get(b"name", b"").decode("utf-8", "replace")
            self.fields.append((name, b"filename" in options))
            if b"filename" not in options:
                self.texts.setdefault(name, bytearray())

        def on_part_data(data: bytes, start: int, end: int):
            name, is_file = self.fields[-1]
            if not is_file:
                value = self.texts[name]
                value += data[start:end]
                if len(value) > MAX_TEXT_FIELD_BYTES:
                    raise UploadRejected(f"form field '{name}' is over {MAX_TEXT_FIELD_BYTES} bytes")

        return {"on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
                "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data}


def _canonical_content_type(scope: Scope) -> Scope:
    """The scope with its Content-Type's media type in lower case. Media types are case-insensitive
    (RFC 9110) and this guard accepts `MULTIPART/FORM-DATA`, but BentoML compares them as written
    and parsed such a body as JSON ("Invalid JSON"). The boundary keeps its case: it is not."""
    headers = []
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-type":
            media, _, rest = value.partition(b";")
            value = media.strip().lower() + (b";" + rest if rest else b"")
        headers.append((name, value))
    return {**scope, "headers": headers}


class UploadGuard:
    """Guard POSTs to `paths`: one file field `file_field`, at most `max_bytes` of body."""

    def __init__(self, app: ASGIApp, paths: Iterable[str], max_bytes: int, file_field: str = "image",
                 check_fields: FieldCheck | None = None):
        self.app = app
        self.paths = set(paths)
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.check_fields = check_fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_checked(scope, receive)
        except UploadRejected as exc:
            logger.warning("rejected upload to %s: %s (HTTP %d)", scope.get("path"), exc, exc.status)
            await _send_json(send, exc.status, {"error": str(exc), "status": exc.status})
            return
        await self.app(_canonical_content_type(scope), _replay(body, receive), send)

    async def _read_checked(self, scope: Scope, receive: Receive) -> bytes:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        mime, options = parse_options_header(headers.get("content-type", b""))
        if mime != b"multipart/form-data":
            raise UploadRejected(
                f"send the image as multipart/form-data with a file field '{self.file_field}' "
                f"(e.g. curl -F {self.file_field}=@cells.tif URL), not {mime.decode('latin-1') or 'no content type'}",
                status=415)
        boundary = options.get(b"boundary")
        if not boundary:
            raise UploadRejected("multipart/form-data without a boundary: the body cannot be parsed")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise UploadRejected(f"upload is {int(declared):,} bytes, over the limit of {self.max_bytes:,}", status=413)

        parts = _Parts()
        parser = MultipartParser(boundary, parts.callbacks())
        chunks: list[bytes] = []
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise UploadRejected("client disconnected during the upload")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                raise UploadRejected(f"upload is over the limit of {self.max_bytes:,} bytes", status=413)
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise UploadRejected(f"malformed multipart body: {exc}") from exc
            chunks.append(chunk)
            more = message.get("more_body", False)
        if parser.state != MultipartState.END:
            raise UploadRejected("malformed multipart body: it ends before its closing boundary")
        self._check_file(parts.fields)
        if self.check_fields is not None:
            texts = {name: bytes(value).decode("utf-8", "replace") for name, value in parts.texts.items()}
            if len(texts) != sum(1 for _, is_file in parts.fields if not is_file):
                raise UploadRejected("a form field was sent more than once")
            try:
                self.check_fields(scope["path"], texts)
            except ValueError as exc:
                raise UploadRejected(str(exc)) from exc
        return b"".join(chunks)

    def _check_file(self, fields: list[tuple[str, bool]]) -> None:
        files = [is_file for name, is_file in fields if name == self.file_field]
        if not files:
            raise UploadRejected(f"no '{self.file_field}' file in the form: upload one "
                                 f"(e.g. curl -F {self.file_field}=@cells.tif URL)")
        if len(files) > 1:
            raise UploadRejected(f"{len(files)} '{self.file_field}' fields: send one image per request")
        if not files[0]:
            raise UploadRejected(f"'{self.file_field}' was sent as a text value: upload the image as a file "
                                 f"(curl -F {self.file_field}=@cells.tif); the service never downloads URLs")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notifications pass through

    return replayed


async def _send_json(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
