"""How the service's request wrapper answers failures, without starting a server: every refusal is a
JSON 4xx/503 with its status, never a 500."""

import asyncio
import json

import numpy as np
import pytest

import service
from cellseg.admission import Overloaded
from cellseg.report import page_report


@pytest.fixture
def front():
    """The front service's class, without its model: only the request wrapper is exercised."""
    instance = object.__new__(service.CellSegmentation.inner)
    instance.in_flight, instance.idle_trim = 0, None
    return instance


def answer(front, work):
    async def call():
        return await front._guarded(work)

    response = asyncio.run(call())
    return response, json.loads(response.body)


def test_a_report_with_more_cells_than_a_label_png_holds_is_a_422(front):
    """`report` answered 500 for a noise image with 116,600 cells: its label PNG's TooManyCellsError
    was not caught (`mask` caught its own)."""
    labels = np.zeros((600, 600), np.int32)
    labels[::2, ::2] = np.arange(1, 90_001).reshape(300, 300)

    async def work():
        return page_report(np.zeros(labels.shape, np.float32), labels, np.ones(90_000, np.float32), "noise.tif")

    response, body = answer(front, work)
    assert response.status_code == 422 and body["status"] == 422
    assert "65,535" in body["error"] and "/segment" in body["error"]


def test_a_busy_service_answers_503_with_retry_after(front):
    async def work():
        raise Overloaded("the service is busy", retry_after_s=30)

    response, body = answer(front, work)
    assert response.status_code == 503 and response.headers["retry-after"] == "30"
    assert body == {"error": "the service is busy", "status": 503, "retry_after_s": 30}
    assert front.in_flight == 0


@pytest.mark.parametrize("text", ["-1", "0", "abc", "NaN", "Infinity", "true", "1e9"])
def test_an_invalid_pixel_size_is_refused_by_the_field_check(text):
    """Issue 19: the pixel_size field (µm per pixel) goes through the upload guard's check like every field."""
    with pytest.raises(ValueError, match="pixel_size must be"):
        service.check_form_fields("/report", {"pixel_size": text})


def test_pixel_size_is_a_field_where_measurements_are_answered():
    for path in ("/segment", "/report", "/geojson"):
        service.check_form_fields(path, {"pixel_size": "0.65", "min_size": "30"})
        properties = service.CellSegmentation.apis[path[1:]].input_spec.model_json_schema()["properties"]
        assert properties["pixel_size"]["anyOf"][0] == {"minimum": 1e-4, "maximum": 1e4, "type": "number"}  # OpenAPI
    with pytest.raises(ValueError, match="unknown parameter"):
        service.check_form_fields("/mask", {"pixel_size": "0.65"})  # no measurements there


def test_the_size_used_is_the_given_one_else_the_images_own(front, tmp_path):
    import anyio
    import tifffile

    front.cpu = anyio.CapacityLimiter(2)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.uint8), imagej=True, resolution=(2, 2), metadata={"unit": "um"})
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((32, 32), np.uint8))

    def size(image, given):
        found = asyncio.run(front._pixel_size(image, given))
        return found and found.to_dict()

    assert size(path, None) == {"x_um": 0.5, "y_um": 0.5, "source": "ImageJ metadata"}
    assert size(path, 0.65) == {"x_um": 0.65, "y_um": 0.65, "source": "given (pixel_size field)"}
    assert size(plain, None) is None
    with pytest.raises(service.RequestError, match="pixel_size must be between"):
        size(plain, -1.0)
