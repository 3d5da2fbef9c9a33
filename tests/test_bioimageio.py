"""The bioimage.io package: written by `python -m export bioimageio`, passing bioimageio.core's own
test (both weight formats reproduce the test tensors), and predicting like the runtime on another image."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from cellseg.imageio import read_image
from cellseg.preprocess import NORMALIZATION, normalize

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def package(tmp_path_factory, model_path, data_root):
    pytest.importorskip("bioimageio.core", reason="bioimageio.core is not installed (see requirements.txt)")
    from export.bioimageio import TEST_IMAGE, main

    if not (data_root / TEST_IMAGE).is_file():
        pytest.skip(f"the package's test image {TEST_IMAGE} is not in {data_root}")
    if not model_path.with_suffix(".safetensors").is_file():
        pytest.skip(f"no PyTorch weights beside {model_path}")
    out = tmp_path_factory.mktemp("bioimageio") / "livecell-unet.bioimageio.zip"
    assert main(["--model", str(model_path), "--out", str(out), "--no-test"]) == 0
    return out


def test_bioimageio_test_passes_offline(package):
    """`bioimageio test` (bioimageio.core's CLI) on the package, with every HTTP(S) request sent to a
    dead proxy: both weight formats must reproduce the test outputs without the network."""
    cli = Path(sys.executable).with_name("bioimageio")
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead, "NO_PROXY": ""}
    run = subprocess.run([str(cli), "test", str(package)], env=env, capture_output=True, text=True, timeout=600)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-3000:]
    for weights in ("onnx", "torchscript"):
        assert f"Reproduce test outputs from test inputs ({weights})" in report


def test_package_describes_the_model(package):
    with zipfile.ZipFile(package) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        names = set(z.namelist())
    assert rdf["format_version"].startswith("0.5.") and rdf["type"] == "model"
    assert rdf["license"] == "CC-BY-NC-4.0"
    assert any(c.get("doi") == "10.1038/s41592-021-01249-6" for c in rdf["cite"])  # LIVECell
    assert set(rdf["weights"]) == {"onnx", "torchscript"}
    (pre,) = [step for step in rdf["inputs"][0]["preprocessing"] if step["id"] == "scale_range"]
    assert (pre["kwargs"]["min_percentile"], pre["kwargs"]["max_percentile"]) == (NORMALIZATION["low"], NORMALIZATION["high"])
    assert [a.get("id", a["type"]) for a in rdf["inputs"][0]["axes"]] == ["batch", "channel", "y", "x"]
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["foreground", "boundary", "distance"]
    for file in (rdf["documentation"], rdf["covers"][0], rdf["inputs"][0]["test_tensor"], rdf["outputs"][0]["test_tensor"]):
        assert file["source"] in names


def test_package_predicts_like_the_runtime(package, onnx_model, demo_images):
    """On an image that is not its test tensor, bioimageio.core (its preprocessing, then ONNX)
    gives the runtime's maps: the package's normalisation is the runtime's."""
    from bioimageio.core import create_prediction_pipeline, load_model_description, predict
    from bioimageio.core.digest_spec import create_sample_for_model

    png = next(p for p in demo_images if p.suffix == ".png")  # a Kaggle-Sartorius image, 704x520
    raw = read_image(png)[:512, :704].astype(np.float32)
    expected = onnx_model.predict(normalize(raw)[None, None])[0]
    description = load_model_description(package)
    sample = create_sample_for_model(description, inputs={"raw": raw[None, None]})
    result = predict(model=create_prediction_pipeline(description, weight_format="onnx"), inputs=sample)
    got = result.members["probabilities"].data.values[0]
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_a_size_the_package_refuses_is_padded_by_reflection_as_its_readme_says(package, onnx_model, tif):
    """A user's trial: on a 704 x 520 LIVECell image (520 is not 64 + 32n, so core refuses it) a tool that
    pads with zeros gets other maps near the padded edge than the runtime, which pads by reflection. The
    package's README now says to pad by reflection; this measures both (-s prints the figures quoted there)."""
    from bioimageio.core import create_prediction_pipeline, load_model_description, predict
    from bioimageio.core.digest_spec import create_sample_for_model

    from cellseg.inference import Segmentation
    from cellseg.preprocess import pad_to

    with zipfile.ZipFile(package) as z:
        assert 'mode="reflect"' in z.read("README.md").decode()
    raw = read_image(tif).astype(np.float32)
    assert raw.shape == (520, 704)
    expected = onnx_model.predict(pad_to(normalize(raw), 544, 704)[None, None])[0][:, :520]
    description = load_model_description(package)
    pipeline = create_prediction_pipeline(description, weight_format="onnx")
    cells = {"runtime": Segmentation.from_maps(expected, onnx_model.default_params).labels.max()}
    share = {}
    for mode in ("reflect", "constant"):
        padded = np.pad(raw, ((0, 24), (0, 0)), mode=mode)
        sample = create_sample_for_model(description, inputs={"raw": padded[None, None]})
        got = predict(model=pipeline, inputs=sample).members["probabilities"].data.values[0][:, :520]
        difference = np.abs(got - expected).max(axis=0)
        share[mode] = float((difference > 0.05).mean())
        cells[mode] = Segmentation.from_maps(got, onnx_model.default_params).labels.max()
        print(f"{mode}: max {difference.max():.2f}, {share[mode]:.2%} of pixels differ by > 0.05")
    print("cells", cells)
    assert share["reflect"] < 0.01 < 0.05 < share["constant"]
    assert abs(cells["reflect"] - cells["runtime"]) <= 2


@pytest.mark.parametrize("out", ["model", "folder"])
def test_output_over_an_input_is_refused_before_writing(tmp_path, out, demo_images):
    """--out equal to --model used to overwrite the model, then the package read itself back while
    growing without end; an --out that is a folder holding an input would replace it too."""
    import shutil

    from export.bioimageio import main

    model = tmp_path / "m.onnx"
    shutil.copy(Path(__file__).parent.parent / "models" / "livecell-unet.onnx", model)
    shutil.copy(Path(__file__).parent.parent / "models" / "livecell-unet.safetensors", tmp_path / "m.safetensors")
    before = model.read_bytes()
    target = model if out == "model" else tmp_path
    with pytest.raises(SystemExit, match="would overwrite the input"):
        main(["--model", str(model), "--out", str(target), "--image", str(demo_images[-1]), "--no-test"])
    assert model.read_bytes() == before


def test_maintainers_go_into_the_package(tmp_path, model_path):
    """bioimage.io asks for a GitHub account that answers for a package: `--maintainer` puts it in
    the RDF's `maintainers`; without one the field stays empty (and bioimageio.spec warns). GitHub is
    not asked here (no io checks), so the handle is a test value; the export itself checks it."""
    spec = pytest.importorskip("bioimageio.spec")
    from export.bioimageio import build_description, maintainers

    torchscript = tmp_path / "weights.torchscript.pt"
    torchscript.write_bytes(b"not read without io checks")
    raw = np.random.default_rng(0).random((1, 1, 64, 64), np.float32)
    output = np.random.default_rng(1).random((1, 3, 64, 64), np.float32)
    rdfs = {}
    with spec.ValidationContext(perform_io_checks=False):
        for users in ([], ["cellseg-test-maintainer"]):
            workdir = tmp_path / f"work{len(users)}"
            workdir.mkdir()
            description = build_description(model_path, workdir, raw, output, torchscript, maintainers(users))
            package = tmp_path / f"package{len(users)}.zip"
            spec.save_bioimageio_package(description, output_path=package)
            with zipfile.ZipFile(package) as z:
                rdfs[len(users)] = yaml.safe_load(z.read("rdf.yaml"))
    assert not rdfs[0].get("maintainers")
    assert rdfs[1]["maintainers"] == [{"github_user": "cellseg-test-maintainer"}]


def test_a_maintainer_github_cannot_confirm_stops_the_export_at_once(tmp_path, model_path, monkeypatch):
    """Offline (every request sent to a dead proxy), `--maintainer` cannot be checked: the export
    stops before its slow steps with a message saying why, instead of an httpx traceback."""
    pytest.importorskip("bioimageio.spec")
    from export.bioimageio import main

    dead = "http://127.0.0.1:9"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    image = tmp_path / "image.tif"
    image.write_bytes(b"never read")
    with pytest.raises(SystemExit, match="--maintainer cellseg-test-maintainer: .*needs the network"):
        main(["--model", str(model_path), "--image", str(image), "--out", str(tmp_path / "p.zip"),
              "--maintainer", "cellseg-test-maintainer", "--no-test"])
    assert not (tmp_path / "p.zip").exists()
