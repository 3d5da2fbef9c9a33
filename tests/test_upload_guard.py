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
    ({"files": {"image": ("a.png", b"x")}, "data": {"min_size": "9" * 2000}}, 400, "over 1024 bytes"),
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
