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
- a part has no name, another part is a file, or there are more than `MAX_PARTS` parts (400);
- a text field is unknown to the endpoint or its value is invalid (400; checked by `check_fields`);
- the body arrives slower than `min_bytes_per_s` on average after a grace period (408): a client that
  trickles bytes would otherwise hold a request slot for as long as it likes.

Only a body that passes is handed on, replayed from memory chunk by chunk (no joined copy), to the
application, in a canonical form the framework parses without surprises: the Content-Type is
`multipart/form-data; boundary=...` (other parameters such as a `charset` dropped; BentoML decoded
the form with it) and a file name too long to be a temporary file's suffix is shortened.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
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
MAX_PARTS = 32  # an image and a handful of parameters; each part costs parser work and bookkeeping
# BentoML stores an upload as a temporary file whose name ends with the client's file name: the
# system's 255-byte name limit, less tempfile's 11-byte prefix, made longer names (an 85-character
# Japanese name is 255 UTF-8 bytes) a 500. Longer names are cut to this, keeping the extension.
MAX_FILENAME_BYTES = 200
UPLOAD_GRACE_S = 10.0  # no rate is asked of an upload during its first seconds
MIN_UPLOAD_BYTES_PER_S = 32 * 1024  # then it must average at least this (a 16 MP TIFF: ~17 minutes)

# Checks the text fields of one endpoint: (path, {name: value}) -> raises ValueError with the reason.
FieldCheck = Callable[[str, dict[str, str]], None]


@dataclass
class _Part:
    name: str | None  # None: the part has no name
    filename: bytes | None  # None: a text part
    disposition_span: tuple[int, int]  # where its Content-Disposition value lies in the body


@dataclass
class _Parts:
    """What the multipart parser saw: each part's name, file name and where its Content-Disposition
    header sits in the body (to shorten a file name), and the values of text parts."""

    parts: list[_Part] = field(default_factory=list)
    texts: dict[str, bytearray] = field(default_factory=dict)
    text_limits: dict[str, int] = field(default_factory=dict)  # fields allowed more than MAX_TEXT_FIELD_BYTES
    offset: int = 0  # position in the body of the chunk being parsed
    _header_name: bytes = b""
    _header_value: bytes = b""
    _value_span: tuple[int, int] = (0, 0)
    _disposition: bytes = b""
    _disposition_span: tuple[int, int] = (0, 0)

    def callbacks(self) -> dict:
        def on_part_begin():
            self._disposition = b""
            self._disposition_span = (0, 0)
            if len(self.parts) >= MAX_PARTS:
                raise UploadRejected(f"more than {MAX_PARTS} parts in the form: send one image and its parameters")

        def on_header_field(data: bytes, start: int, end: int):
            self._header_name += data[start:end]

        def on_header_value(data: bytes, start: int, end: int):
            if not self._header_value:
                self._value_span = (self.offset + start, self.offset + start)
            self._header_value += data[start:end]
            self._value_span = (self._value_span[0], self.offset + end)

        def on_header_end():
            if self._header_name.strip().lower() == b"content-disposition":
                self._disposition, self._disposition_span = self._header_value, self._value_span
            self._header_name = self._header_value = b""

        def on_headers_finished():
            _, options = parse_options_header(self._disposition)
            name = options[b"name"].decode("utf-8", "replace") if b"name" in options else None
            self.parts.append(_Part(name, options.get(b"filename"), self._disposition_span))
            if name is None:
                raise UploadRejected("a form part has no name: every part needs "
                                     'Content-Disposition: form-data; name="..."')
            if b"filename" not in options:
                self.texts.setdefault(name, bytearray())

        def on_part_data(data: bytes, start: int, end: int):
            part = self.parts[-1]
            if part.filename is None:
                value = self.texts[part.name]
                value += data[start:end]
                limit = self.text_limits.get(part.name, MAX_TEXT_FIELD_BYTES)
                if len(value) > limit:
                    raise UploadRejected(f"form field '{part.name}' is over {limit:,} bytes")

        return {"on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
                "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data}


def _canonical_scope(scope: Scope, boundary: bytes, length: int) -> Scope:
    """The scope with the Content-Type the application parses reliably: `multipart/form-data;
    boundary=...`. Media types are case-insensitive (RFC 9110) but BentoML compared them as written
    and parsed `MULTIPART/FORM-DATA` as JSON ("Invalid JSON"); a `charset` parameter (cp037 was a 500)
    has no meaning for multipart (RFC 7578). Content-Length is the replayed body's."""
    headers = [(name, value) for name, value in scope.get("headers", [])
               if name.lower() not in (b"content-type", b"content-length", b"transfer-encoding")]
    headers += [(b"content-type", b'multipart/form-data; boundary="' + boundary + b'"'),
                (b"content-length", str(length).encode())]
    return {**scope, "headers": headers}


def short_filename(filename: bytes, limit: int = MAX_FILENAME_BYTES) -> bytes:
    """`filename` cut to `limit` UTF-8 bytes at a character boundary, keeping its extension (up to 16
    bytes), so a temporary file can end with it; characters that would break the header are replaced."""
    filename = re.sub(rb'["\\\r\n]', b"_", filename)
    if len(filename) <= limit:
        return filename
    stem, dot, extension = filename.rpartition(b".")
    if not dot or len(extension) > 16:
        stem, extension = filename, b""
    suffix = b"." + extension if extension else b""
    return stem[:limit - len(suffix)].decode("utf-8", "ignore").encode() + suffix


def _splice(chunks: list[bytes], span: tuple[int, int], replacement: bytes) -> list[bytes]:
    """`chunks` with the bytes at `span` (positions in their concatenation) replaced."""
    out, position = [], 0
    start, end = span
    for chunk in chunks:
        chunk_start, position = position, position + len(chunk)
        if position <= start or chunk_start >= end:
            out.append(chunk)
            continue
        if chunk_start < start:
            out.append(chunk[:start - chunk_start])
        if chunk_start <= start:
            out.append(replacement)
        if position > end:
            out.append(chunk[end - chunk_start:])
    return out


class UploadGuard:
    """Guard POSTs to `paths`: one file field `file_field`, at most `max_bytes` of body, arriving at
    `min_bytes_per_s` on average once `grace_s` have passed; text fields of MAX_TEXT_FIELD_BYTES at
    most, or their own limit in `text_limits`."""

    def __init__(self, app: ASGIApp, paths: Iterable[str], max_bytes: int, file_field: str = "image",
                 check_fields: FieldCheck | None = None, grace_s: float = UPLOAD_GRACE_S,
                 min_bytes_per_s: float = MIN_UPLOAD_BYTES_PER_S, text_limits: dict[str, int] | None = None):
        self.app = app
        self.text_limits = dict(text_limits or {})
        self.paths = set(paths)
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.check_fields = check_fields
        self.grace_s = grace_s
        self.min_bytes_per_s = min_bytes_per_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            boundary = self._boundary(scope)
            chunks = await self._read_checked(scope, receive, boundary)
        except UploadRejected as exc:
            logger.warning("rejected upload to %s: %s (HTTP %d)", scope.get("path"), exc, exc.status)
            await _send_json(send, exc.status, {"error": str(exc), "status": exc.status})
            return
        length = sum(len(chunk) for chunk in chunks)
        body = _replay(chunks, receive)
        del chunks  # the replay holds the only reference, and lets each chunk go once it is passed on
        await self.app(_canonical_scope(scope, boundary, length), body, send)

    def _boundary(self, scope: Scope) -> bytes:
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
        return boundary

    async def _read_checked(self, scope: Scope, receive: Receive, boundary: bytes) -> list[bytes]:
        """The body's chunks, once every check has passed (the file name shortened where needed)."""
        parts = _Parts(text_limits=self.text_limits)
        parser = MultipartParser(boundary, parts.callbacks())
        chunks: list[bytes] = []
        started = time.monotonic()
        more = True
        while more:
            message = await self._receive_in_time(receive, started, parts.offset)
            if message["type"] == "http.disconnect":
                raise UploadRejected("client disconnected during the upload")
            chunk = message.get("body", b"")
            if parts.offset + len(chunk) > self.max_bytes:
                raise UploadRejected(f"upload is over the limit of {self.max_bytes:,} bytes", status=413)
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise UploadRejected(f"malformed multipart body: {exc}") from exc
            parts.offset += len(chunk)
            chunks.append(chunk)
            more = message.get("more_body", False)
        if parser.state != MultipartState.END:
            raise UploadRejected("malformed multipart body: it ends before its closing boundary")
        image = self._check_parts(parts.parts)
        if self.check_fields is not None:
            texts = {name: bytes(value).decode("utf-8", "replace") for name, value in parts.texts.items()}
            if len(texts) != sum(1 for part in parts.parts if part.filename is None):
                raise UploadRejected("a form field was sent more than once")
            try:
                self.check_fields(scope["path"], texts)
            except ValueError as exc:
                raise UploadRejected(str(exc)) from exc
        short = short_filename(image.filename)
        if short != image.filename:
            disposition = b'form-data; name="' + self.file_field.encode() + b'"; filename="' + short + b'"'
            chunks = _splice(chunks, image.disposition_span, disposition)
        return chunks

    async def _receive_in_time(self, receive: Receive, started: float, received: int) -> Message:
        """The next message, or a 408 once the upload has fallen below the minimum average rate."""
        deadline = started + self.grace_s + received / self.min_bytes_per_s
        try:
            return await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise UploadRejected(
                f"upload too slow: {received:,} bytes in {time.monotonic() - started:.0f} s; the service needs "
                f"{self.min_bytes_per_s / 1024:,.0f} KiB/s on average after the first {self.grace_s:.0f} s",
                status=408) from None

    def _check_parts(self, parts: list[_Part]) -> _Part:
        """The image part, after checking it is the one file, sent once and as a file."""
        images = [part for part in parts if part.name == self.file_field]
        if not images:
            raise UploadRejected(f"no '{self.file_field}' file in the form: upload one "
                                 f"(e.g. curl -F {self.file_field}=@cells.tif URL)")
        if len(images) > 1:
            raise UploadRejected(f"{len(images)} '{self.file_field}' fields: send one image per request")
        if images[0].filename is None:
            raise UploadRejected(f"'{self.file_field}' was sent as a text value: upload the image as a file "
                                 f"(curl -F {self.file_field}=@cells.tif); the service never downloads URLs")
        others = [part.name for part in parts if part.filename is not None and part.name != self.file_field]
        if others:
            raise UploadRejected(f"'{others[0]}' was sent as a file: the only file is '{self.file_field}'; "
                                 f"parameters are text values (curl -F {others[0]}=VALUE)")
        return images[0]


def _replay(chunks: list[bytes], receive: Receive) -> Receive:
    """The checked body, chunk by chunk as it came (joining them would copy the upload once more)."""
    pending = collections.deque(chunks or [b""])

    async def replayed() -> Message:
        if pending:
            chunk = pending.popleft()
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        return await receive()  # after the body: disconnect notifications pass through

    return replayed


async def _send_json(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
