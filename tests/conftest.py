from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cellseg.data import default_data_root
from cellseg.onnx_model import default_model_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if not (root / "livecell").is_dir() and not (root / "annotations").is_dir():
        pytest.skip(f"real data not found at {root} (set CELLSEG_DATA to the folder holding livecell/ and sartorius/)")
    return root


@pytest.fixture(scope="session")
def demo_images(data_root) -> list[Path]:
    images = sorted((data_root / "demo").glob("*"))
    if not images:
        pytest.skip(f"no demo images in {data_root / 'demo'}")
    return images


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = default_model_path()
    assert path.is_file(), f"the shipped model {path} is missing (python -m export ...)"
    return path


@pytest.fixture(scope="session")
def onnx_model(model_path):
    from cellseg.onnx_model import OnnxModel

    return OnnxModel(model_path)


def disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


@pytest.fixture
def synthetic_gray() -> np.ndarray:
    """A 8-bit 'phase contrast' image: bright discs with texture on a dark noisy background."""
    rng = np.random.default_rng(0)
    image = rng.normal(60, 8, size=(96, 128))
    for cy, cx, r in [(30, 30, 12), (60, 90, 15), (70, 40, 9)]:
        image[disc(image.shape, (cy, cx), r)] += 100
    return np.clip(image, 0, 255).astype(np.uint8)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


MAX_PIXELS = 2_000_000  # the served service's small limits, so the 413 tests need no giant upload
MAX_UPLOAD_BYTES = 3_000_000  # likewise for the byte limit (a LIVECell TIFF is 370 KB)
UPLOAD_GRACE_S = 3  # a trickling upload gets its 408 within seconds


@pytest.fixture(scope="session")
def served(tmp_path_factory, model_path):
    """(URL, log file) of a running `bentoml serve`, shared by the API and web page tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_server", REPO / "scripts" / "local_server.py")
    local_server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_server)
    home = tmp_path_factory.mktemp("bentoml_home")
    try:
        proc, url = local_server.start_server(model_path, home, {"CELLSEG_MAX_PIXELS": str(MAX_PIXELS),
                                                                 "CELLSEG_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
                                                                 "CELLSEG_UPLOAD_GRACE_S": str(UPLOAD_GRACE_S)})
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url, home / "serve.log"
    local_server.stop_server(proc)


@pytest.fixture(scope="session")
def served_model_path(model_path) -> Path:
    """The ONNX file the served service and batch jobs run by default on this CPU: the int8 variant
    where its recorded accuracy and the precision check here allow it (cellseg/precision.py)."""
    from cellseg.variants import choose_for_model

    return choose_for_model(model_path).path


@pytest.fixture(scope="session")
def served_model(served_model_path):
    """In-process twin of the served network: the server's answers must equal its answers."""
    from cellseg.onnx_model import OnnxModel

    return OnnxModel(served_model_path)


@pytest.fixture(scope="session")
def server(served):
    return served[0]


@pytest.fixture(scope="session")
def client(server):
    from cellseg import Client

    with Client(server) as c:
        yield c


@pytest.fixture(scope="session")
def tif(demo_images):
    return next(p for p in demo_images if p.suffix == ".tif")
