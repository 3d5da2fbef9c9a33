"""UploadGuard in front of a tiny ASGI app: what passes reaches the app unchanged, what fails never does."""

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cellseg.upload_guard import UploadGuard


async def echo(request: Request) -> JSONResponse:
    form = await request.form()
    image = form["image"]
    return JSONResponse({"size": len(await image.read()), "fields": {k: v for k, v in form.items() if k != "image"}})


def check(path: str, fields: dict[str, str]) -> None:
    if set(fields) - {"min_size"}:
        raise ValueError(f"unknown parameter(s) {', '.join(sorted(set(fields) - {'min_size'}))}")


@pytest.fixture
def client():
    app = Starlette(routes=[Route("/segment", echo, methods=["POST"])])
    app.add_middleware(UploadGuard, paths=["/segment"], max_bytes=10_000, check_fields=check)
    return TestClient(app)


def test_a_good_upload_reaches_the_app_unchanged(client):
    r = client.post("/segment", files={"image": ("a.png", b"x" * 5000)}, data={"min_size": "7"})
    assert r.status_code == 200 and r.json() == {"size": 5000, "fields": {"min_size": "7"}}


@pytest.mark.parametrize("kwargs, status, message", [
    ({"files": {"image": (None, "http://127.0.0.1:9/x")}}, 400, "sent as a text value"),
    ({"files": {"image": ("a.png", b"x" * 20_000)}}, 413, "over the limit"),
    ({"files": [("image", ("a.png", b"x")), ("image", ("b.png", b"y"))]}, 400, "2 'image' fields"),
    ({"files": {"picture": ("a.png", b"x")}}, 400, "no 'image' file"),
    ({"files": {"image": ("a.png", b"x")}, "data": {"min_sz": "3"}}, 400, "unknown parameter(s) min_sz"),
    ({"files": {"image": ("a.png", b"x")}, "data": {"min_size": "9" * 2000}}, 400, "over 1,024 bytes"),
    ({"data": {"image": "x"}}, 415, "multipart/form-data"),
    ({"headers": {"Content-Type": "multipart/form-data"}}, 400, "without a boundary"),
    ({"headers": {"Content-Type": "multipart/form-data; boundary=zz"}, "content": b"--zz\r\ngarbage"}, 400, "malformed"),
])
def test_bad_requests_get_json_4xx(client, kwargs, status, message):
    r = client.post("/segment", **kwargs)
    assert r.status_code == status and r.json()["status"] == status
    assert message in r.json()["error"], r.json()


def test_other_paths_and_methods_pass_through(client):
    assert client.get("/segment").status_code == 405  # the app's own answer, not the guard's


async def save_like_bentoml(request: Request) -> JSONResponse:
    """What BentoML does with an upload: a temporary file whose name ends with the client's file name."""
    import tempfile

    form = await request.form()
    image = form["image"]
    with tempfile.NamedTemporaryFile(suffix=image.filename) as saved:
        saved.write(await image.read())
        return JSONResponse({"filename": image.filename, "size": saved.tell()})


@pytest.fixture
def saving_client():
    app = Starlette(routes=[Route("/segment", save_like_bentoml, methods=["POST"])])
    app.add_middleware(UploadGuard, paths=["/segment"], max_bytes=10_000, check_fields=check)
    return TestClient(app)


def multipart(*parts: bytes, boundary: bytes = b"zz") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"


IMAGE_PART = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + b"x" * 100


@pytest.mark.parametrize("name", ["細胞" * 42 + ".tif", "c" * 300 + ".tif", "d" * 300],
                         ids=["japanese-255-bytes", "ascii-304-bytes", "no-extension"])
def test_long_file_names_are_shortened_not_a_server_error(saving_client, name):
    """An 85-character Japanese name is 255 UTF-8 bytes: as a temporary file's suffix it was over the
    system's name limit, a 500. It is cut at a character boundary, keeping the extension."""
    r = saving_client.post("/segment", files={"image": (name, b"x" * 100)})
    assert r.status_code == 200, r.text
    sent = r.json()["filename"]
    assert len(sent.encode()) <= 200 and sent.endswith(".tif" if "." in name else "d")
    assert name.startswith(sent.removesuffix(".tif")[:20]) and r.json()["size"] == 100


def test_a_charset_in_the_content_type_is_dropped(saving_client):
    """`charset=cp037` made the framework decode the form's headers as EBCDIC: a 500."""
    r = saving_client.post("/segment", content=multipart(IMAGE_PART),
                           headers={"Content-Type": "multipart/form-data; boundary=zz; charset=cp037"})
    assert r.status_code == 200 and r.json() == {"filename": "a.png", "size": 100}


@pytest.mark.parametrize("kwargs, message", [
    ({"files": [("image", ("a.png", b"x")), ("mask", ("b.tif", b"y"))]}, "'mask' was sent as a file"),
    ({"files": [("image", ("a.png", b"x")), ("min_size", ("v.txt", b"7"))]}, "'min_size' was sent as a file"),
    ({"content": multipart(IMAGE_PART, b"Content-Disposition: form-data\r\n\r\n7"),
      "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, "has no name"),
    ({"content": multipart(IMAGE_PART, *[b'Content-Disposition: form-data; name="min_size"\r\n\r\n7'] * 100),
      "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, "more than 32 parts"),
])
def test_odd_parts_get_400(client, kwargs, message):
    r = client.post("/segment", **kwargs)
    assert r.status_code == 400 and r.json()["status"] == 400
    assert message in r.json()["error"], r.json()


@pytest.mark.serial
def test_a_trickling_upload_gets_408_instead_of_holding_its_slot():
    import asyncio

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def trickle():  # one byte every 0.2 s, as a slow-loris client sends
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"-", "more_body": True}

    async def send(message):
        sent.append(message)

    guard = UploadGuard(app, paths=["/segment"], max_bytes=10_000, grace_s=0.5, min_bytes_per_s=100)
    scope = {"type": "http", "method": "POST", "path": "/segment",
             "headers": [(b"content-type", b"multipart/form-data; boundary=zz")]}
    started = asyncio.run(asyncio.wait_for(_timed(guard(scope, trickle, send)), timeout=5))
    assert not reached and sent[0]["status"] == 408 and b"too slow" in sent[1]["body"]
    assert started < 1.5, f"held for {started:.1f} s"


async def _timed(coroutine) -> float:
    import time

    t0 = time.monotonic()
    await coroutine
    return time.monotonic() - t0


def test_a_field_given_its_own_limit_may_be_longer_and_no_more():
    """The service lets `batch_names` (a web page batch's file names) be 256 kB; every other field 1 kB."""
    def allow_names(path: str, fields: dict[str, str]) -> None:
        pass

    app = Starlette(routes=[Route("/segment", echo, methods=["POST"])])
    app.add_middleware(UploadGuard, paths=["/segment"], max_bytes=100_000, check_fields=allow_names,
                       text_limits={"batch_names": 20_000})
    client = TestClient(app)
    names = "x" * 15_000
    r = client.post("/segment", files={"image": ("a.png", b"x")}, data={"batch_names": names})
    assert r.status_code == 200 and r.json()["fields"]["batch_names"] == names
    r = client.post("/segment", files={"image": ("a.png", b"x")}, data={"batch_names": "x" * 25_000})
    assert r.status_code == 400 and "'batch_names' is over 20,000 bytes" in r.json()["error"]
    r = client.post("/segment", files={"image": ("a.png", b"x")}, data={"min_size": "9" * 2000})
    assert r.status_code == 400 and "over 1,024 bytes" in r.json()["error"]
