"""The README's example outputs are the code's: each test recomputes one and fails when it goes stale
(issue 25: the `segment` example showed 68 cells where the shipped model finds 77)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO

pytestmark = pytest.mark.data


def readme_block(after: str) -> str:
    """The first fenced block after the line `after` in README.md."""
    text = (REPO / "README.md").read_text()
    return text[text.index(after):].split("```", 2)[1]


def test_the_segment_example_is_what_the_shipped_int8_model_answers(model_path, demo_images):
    """The example's image ($IMG of the curl block) through the int8 file, as its `precision` says."""
    from cellseg.imageio import read_image
    from cellseg.instances import confluence, instances_from_labels
    from cellseg.onnx_model import OnnxModel

    curl = readme_block("### HTTP API")
    image = REPO / re.search(r"IMG=(\S+)", curl).group(1)
    example = readme_block("`segment` answers:")
    assert '"precision": "int8"' in example
    seg = OnnxModel(model_path.with_suffix(".int8.onnx")).segment([read_image(image)])[0]
    cells = instances_from_labels(seg.labels, seg.scores())

    def shown(key: str):
        return json.loads(re.search(rf'"{key}": (\[[^\]]*\]|[\d.]+)', example).group(1))

    assert shown("count") == len(cells) and shown("confluence") == round(confluence(seg.labels), 3)
    first = cells[0]
    assert (shown("area"), shown("bbox"), shown("centroid"), shown("score")) == (
        first["area"], first["bbox"], first["centroid"], round(first["score"], 4)), first
