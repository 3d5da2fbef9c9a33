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
