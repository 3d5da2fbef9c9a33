"""`cellseg.Client` against servers that misbehave (issue 27, 12): every call ends within its timeout,
reads a bounded answer, follows no redirect, and raises only CellsegError. The server is scripted
with httpx's MockTransport (what it sends, and how slowly); the real service is tested in
tests/test_service.py."""

from __future__ import annotations

import gzip
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from cellseg.client import CellsegError, Client, SegmentResult
from cellseg.rle import encode_coco

SQUARE = np.zeros((16, 20), bool)
SQUARE[:2, :2] = True
CELL = {"id": 1, "area": 4, "bbox": [0, 0, 2, 2], "centroid": [0.5, 0.5], "score": 0.9, "rle": encode_coco(SQUARE)}
ANSWER = {"width": 20, "height": 16, "count": 1, "confluence": 1.0, "cells": [CELL], "model": {}}


def client_for(handler, timeout: float = 5, max_answer_bytes: int = 1 << 20) -> Client:
    """A Client whose server is `handler` (request -> httpx.Response)."""
    client = Client.__new__(Client)  # no /readyz wait: the transport is the handler
    client.url, client.timeout, client.max_answer_bytes = "http://cellseg.test", timeout, max_answer_bytes
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler), follow_redirects=False)
    return client


class Trickle(httpx.SyncByteStream):
    """A body sent one byte every `pause` seconds, for ever unless `limit`."""

    def __init__(self, pause: float, limit: int | None = None):
        self.pause, self.limit = pause, limit

    def __iter__(self):
        sent = 0
        while self.limit is None or sent < self.limit:
            time.sleep(self.pause)
            sent += 1
            yield b"{"


class Endless(httpx.SyncByteStream):
    def __iter__(self):
        while True:
            yield b"0" * 65536


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.serial
def test_a_trickling_server_cannot_hold_a_call_past_its_timeout():
    client = client_for(lambda request: httpx.Response(200, stream=Trickle(0.2)), timeout=2)
    t0 = time.monotonic()
    with pytest.raises(CellsegError, match="within 2 s"):
        client.segment(np.zeros((8, 8), np.uint8))
    assert time.monotonic() - t0 < 4


def test_endless_and_compressed_bomb_answers_are_cut_at_the_bound():
    client = client_for(lambda request: httpx.Response(200, stream=Endless()), max_answer_bytes=1 << 20)
    with pytest.raises(CellsegError, match="over 1,048,576 bytes"):
        client.segment(np.zeros((8, 8), np.uint8))
    bomb = gzip.compress(b"0" * (64 << 20))  # 64 MB in ~64 KB
    client = client_for(lambda request: httpx.Response(200, stream=httpx.ByteStream(bomb),
                                                       headers={"Content-Encoding": "gzip"}), max_answer_bytes=1 << 20)
    with pytest.raises(CellsegError, match="over 1,048,576 bytes"):
        client.segment(np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize("status, location", [(307, "http://127.0.0.1:9/segment"), (302, "http://elsewhere.test/x")])
def test_redirects_are_not_followed(status, location):
    followed = []

    def handler(request):
        if request.url.host != "cellseg.test":
            followed.append(request.url)
            return httpx.Response(200, json=ANSWER)
        return httpx.Response(status, headers={"Location": location})

    with pytest.raises(CellsegError, match="redirect .* not followed"):
        client_for(handler).segment(np.zeros((8, 8), np.uint8))
    assert not followed


@pytest.mark.parametrize("answer, says", [
    ({**ANSWER, "width": 200000, "height": 200000}, "not a size this client accepts"),
    ({**ANSWER, "width": "20"}, "not a size"),
    ({**ANSWER, "cells": [{**CELL, "rle": {"size": [16, 20], "counts": [5, 10**9]}}]}, "damaged cell mask"),
    ({**ANSWER, "cells": [{**CELL, "rle": {"size": [16, 20], "counts": "0d1zzzz"}}]}, "damaged cell mask"),
    ([1, 2], "not a JSON object"), ("[" * 100000, "not JSON"),
])
def test_hostile_segment_answers_raise_cellseg_errors(answer, says):
    body = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
    client = client_for(lambda request: httpx.Response(200, content=body, headers={"Content-Type": "application/json"}))
    with pytest.raises(CellsegError, match=says):
        client.segment(np.zeros((8, 8), np.uint8)).labels  # noqa: B018  (the labels are decoded lazily)


def test_hostile_file_answers_raise_cellseg_errors():
    bomb = png(np.zeros((9000, 9000), np.uint8))  # 81 MP of zeros: a small file, over the pixel bound
    for body, headers, says in ((bomb, {}, "not a usable PNG"), (b"GIF89a not a png", {}, "not a usable PNG"),
                                (png(np.zeros((16, 16), np.uint16)),
                                 {"Content-Disposition": 'attachment; filename="../../../etc/x\x00"'}, None)):
        client = client_for(lambda request, body=body, headers=headers: httpx.Response(200, content=body,
                                                                                        headers=headers))
        if says:
            with pytest.raises(CellsegError, match=says):
                client.mask(np.zeros((8, 8), np.uint8))
        else:  # the name the server suggests is never used as a path: the bytes come back
            assert client.mask(np.zeros((8, 8), np.uint8)).shape == (16, 16)


@pytest.mark.parametrize("error", [httpx.RemoteProtocolError("Server disconnected"), httpx.ReadError("reset"),
                                   httpx.ReadTimeout("timed out"), httpx.ConnectError("refused")])
def test_transport_errors_are_cellseg_errors(error):
    def handler(request):
        raise error

    with pytest.raises(CellsegError, match="connection to the service failed"):
        client_for(handler).segment(np.zeros((8, 8), np.uint8))


def test_error_answers_carry_the_servers_message_and_status():
    client = client_for(lambda request: httpx.Response(413, json={"error": "image too large", "status": 413}))
    with pytest.raises(CellsegError, match=r"image too large \(HTTP 413\)") as raised:
        client.segment(np.zeros((8, 8), np.uint8))
    assert raised.value.status == 413


def test_parameters_and_pixel_size_go_as_form_fields():
    """Issue 19: `pixel_size=` goes to the service like `min_size`; the answer's µm² areas and the
    size used come back on the result; parameters not given are not sent."""
    sent = []
    size = {"x_um": 0.65, "y_um": 0.65, "source": "given (pixel_size field)"}

    def handler(request):
        body = request.read().decode("latin-1")
        sent.append({name: body.split(f'name="{name}"\r\n\r\n')[1].split("\r\n")[0]
                     for name in ("min_size", "pixel_size", "tta") if f'name="{name}"' in body})
        return httpx.Response(200, json={**ANSWER, "cells": [{**CELL, "area_um2": 1.69}], "pixel_size": size})

    client = client_for(handler)
    result = client.segment(np.zeros((8, 8), np.uint8), min_size=30, pixel_size=0.65, tta=True)
    client.segment(Image.fromarray(np.zeros((8, 8), np.uint8)))
    assert sent == [{"min_size": "30", "pixel_size": "0.65", "tta": "true"}, {}]
    assert result.pixel_size == size and result.cells[0].area_um2 == 1.69 and result.labels.sum() == 4


def test_an_answer_whose_masks_are_not_the_image_size_is_refused():
    cell = {**CELL, "rle": {"size": [10, 10], "counts": "0d1"}}
    with pytest.raises(CellsegError, match="not the image's"):
        SegmentResult.from_json({**ANSWER, "cells": [cell]})
    with pytest.raises(CellsegError, match="not a segmentation"):
        SegmentResult.from_json({"width": 20})


def test_arrays_are_uploaded_as_one_image_or_refused_naming_their_shape():
    """A user's trial: `client.segment(np.random.rand(100, 100, 5))` reached the server as a 100-page TIFF
    and came back as "multi-page TIFF (100 pages)". Channels first or last, gray + alpha and RGB(A) go
    as one image the server reads; other shapes are refused here, before any request."""
    from cellseg.imageio import read_image

    sent = []

    def handler(request):
        body = request.read()
        start = body.index(b"\r\n\r\n") + 4
        sent.append(read_image(body[start:body.rindex(b"\r\n--")]).shape)
        return httpx.Response(200, json={**ANSWER, "width": 20, "height": 16, "cells": []})

    client = client_for(handler)
    rng = np.random.default_rng(0)
    for shape in [(16, 20), (16, 20, 1), (16, 20, 2), (16, 20, 3), (16, 20, 4), (3, 16, 20), (4, 16, 20), (1, 16, 20)]:
        client.segment(rng.integers(0, 255, shape).astype(np.uint8))
    assert sent == [(16, 20)] * 8
    for shape in [(16, 20, 5), (5, 16, 20), (2, 16, 20), (2, 3, 16, 20)]:
        with pytest.raises(ValueError, match=rf"shape \({shape[0]}, .*is not one image"):
            client.segment(np.zeros(shape, np.uint8))
    assert len(sent) == 8


def test_a_server_that_is_not_cellseg_is_named_at_once_and_a_starting_one_is_waited_for():
    """A user's trial (napari, a wrong address): "not ready after 30 s (HTTP 404)", after 30 s, where
    another server answered 404 at once. 404 now fails at once; 503 (BentoML starting) is waited out."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cellseg.client import wait_until_ready

    answers = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(answers.pop(0) if answers else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        answers[:] = [404]
        start = time.monotonic()
        with pytest.raises(CellsegError, match=r"answers, but not as a cellseg service \(/readyz: HTTP 404\)"):
            wait_until_ready(url, timeout=30)
        assert time.monotonic() - start < 5
        answers[:] = [503, 503]
        wait_until_ready(url, timeout=30)
        assert answers == []
    finally:
        server.shutdown()
