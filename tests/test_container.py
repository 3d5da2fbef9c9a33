"""Opt-in: `bentoml containerize` builds an image that serves the same answers as local inference.

Needs a container builder. On machines without a Docker daemon, `../shared/tools` provides a local
base image for `--backend buildah` and `run-image.sh` to run it; set CELLSEG_TEST_CONTAINER=1 to run
this test (it takes several minutes: the image installs the serving requirements with pip).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from cellseg.imageio import read_image
from conftest import REPO, free_port

TOOLS = REPO.parent / "shared" / "tools"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("CELLSEG_TEST_CONTAINER") != "1",
                       reason="container build is opt-in (CELLSEG_TEST_CONTAINER=1): it takes several minutes"),
    pytest.mark.skipif(not (TOOLS / "local-base-image.sh").is_file() or os.geteuid() != 0,
                       reason="needs root and ../shared/tools/local-base-image.sh (buildah without a Docker daemon)"),
]


def test_containerized_service(tmp_path, model_path, demo_images, served_model):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-m", "export", "register", "--model", str(model_path)], env=env, cwd=REPO,
                   check=True, capture_output=True)
    tag = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], env=env, cwd=REPO,
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    tag = tag.removeprefix("__tag__:")
    exports = subprocess.run(["bash", str(TOOLS / "local-base-image.sh")], check=True, capture_output=True,
                             text=True).stdout
    for line in exports.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.strip("'\"")
    image = "localhost/cellseg-test:ci"
    build = subprocess.run([sys.executable, "-m", "bentoml", "containerize", "--backend", "buildah", "-t", image, tag],
                           env=env, cwd=REPO, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    port = free_port()
    subprocess.run(["bash", str(TOOLS / "run-image.sh"), "start", image, str(port)], env=env, check=True,
                   capture_output=True)
    try:
        tif = next(p for p in demo_images if p.suffix == ".tif")
        r = httpx.post(f"http://127.0.0.1:{port}/mask", files={"image": (tif.name, tif.read_bytes())}, timeout=120)
        assert r.status_code == 200
        labels = np.asarray(Image.open(io.BytesIO(r.content)))
        # the image serves the default variant (int8 where its accuracy allows), as `bentoml serve` does
        np.testing.assert_array_equal(labels, served_model.segment([read_image(tif)])[0].labels)
        # issue 24: the container checked int8 on this CPU with the reference images it carries
        model = httpx.post(f"http://127.0.0.1:{port}/model", json={}, timeout=60).json()
        served = "int8" if served_model.path.name.endswith(".int8.onnx") else "fp32"
        assert model["precision"] == served and "could not be checked" not in model["precision_reason"], model
        bad = httpx.post(f"http://127.0.0.1:{port}/segment", files={"image": ("x.png", b"junk")}, timeout=60)
        assert bad.status_code == 400 and "error" in json.loads(bad.text)
    finally:
        subprocess.run(["bash", str(TOOLS / "run-image.sh"), "stop", str(port)], env=env, capture_output=True)
        if shutil.which("buildah"):
            subprocess.run(["buildah", "rmi", image], env=env, capture_output=True)
