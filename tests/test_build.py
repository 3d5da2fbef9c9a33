"""`bentoml build` packages service + runtime package + model, with serving-only dependencies."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow


def test_bentoml_build(tmp_path, model_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    registered = subprocess.run([sys.executable, "-m", "export", "register", "--model", str(model_path)], env=env,
                                cwd=REPO, check=True, capture_output=True, text=True)
    tag = json.loads(registered.stdout.strip().splitlines()[-1])["tag"]
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], env=env, cwd=REPO,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "cellseg").iterdir())
    bento = next(p for p in bentos if p.is_dir())
    src = bento / "src"
    assert (src / "service.py").is_file() and (src / "cellseg" / "inference.py").is_file()
    assert not (src / "train").exists() and not (src / "tests").exists()
    lines = (bento / "env" / "python" / "requirements.txt").read_text().lower().splitlines()
    packages = {line.split("==")[0].strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {"onnxruntime", "bentoml", "pycocotools"} <= packages
    for heavy in ("torch", "torchvision", "albumentations", "segmentation-models-pytorch", "timm"):
        assert heavy not in packages
    # BentoML 1.4 records the model in bento.yaml and copies it from the store when containerizing.
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert [m["tag"] for m in manifest["models"]] == [tag]
    assert manifest["entry_service"] == "CellSegmentation"
