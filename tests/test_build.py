"""`bentoml build` packages service + runtime package + model, with serving-only dependencies."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert (src / "cellseg" / "web" / "index.html").is_file()  # the /ui page works inside the container
    # the precision check's reference images: without them the container could never serve int8
    from cellseg.precision import REFERENCE_DIR

    assert sorted(p.name for p in (src / "cellseg" / "reference").glob("*.png")) == \
        sorted(p.name for p in REFERENCE_DIR.glob("*.png"))
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


def test_register_is_idempotent_and_records_what_inference_needs(tmp_path, model_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    out = [subprocess.run([sys.executable, "-m", "export", "register", "--model", str(model_path)], cwd=REPO,
                          env={**os.environ}, check=True, capture_output=True, text=True).stdout for _ in range(2)]
    first, second = (json.loads(o.strip().splitlines()[-1]) for o in out)
    assert first["created"] is True and second["created"] is False and first["tag"] == second["tag"]
    meta = yaml.safe_load(open(os.path.join(first["path"], "model.yaml")))
    assert meta["labels"]["format"] == "onnx"
    assert {"sha256", "normalization", "postprocess", "output_channels", "input", "metrics"} <= set(meta["metadata"])
    # both precisions are in the one model, with their files, checksums and validation metrics
    from cellseg.onnx_model import sha256_file
    from cellseg.variants import default_precision

    variants = meta["metadata"]["variants"]
    int8 = model_path.with_suffix(".int8.onnx")
    assert set(variants) == ({"fp32", "int8"} if int8.is_file() else {"fp32"})
    for variant in variants.values():
        stored = os.path.join(first["path"], variant["file"])
        assert sha256_file(stored) == variant["sha256"]
        assert {"ap50", "msa"} <= set(variant["metrics"])
    assert meta["metadata"]["default_precision"] == default_precision(
        variants["fp32"]["metrics"], variants.get("int8", {}).get("metrics"))
    # the printed summary names each precision's file sha256 and the default (answers carry the
    # default's sha256 as model.sha256; a single "sha256" used to be fp32's while int8 was served)
    files = {"fp32": model_path, "int8": int8} if int8.is_file() else {"fp32": model_path}
    assert first["sha256"] == {precision: sha256_file(path) for precision, path in files.items()}
    assert first["default_precision"] == meta["metadata"]["default_precision"] in first["sha256"]
    # the model card travels with the model (a user's trial found the store without it)
    with open(os.path.join(first["path"], "MODEL_CARD.md")) as card:
        assert card.read() == (model_path.parent / "MODEL_CARD.md").read_text()


def test_int8_is_the_default_only_within_tolerance():
    from cellseg.variants import INT8_TOLERANCE, default_precision

    fp32 = {"ap50": 0.41, "msa": 0.17}
    assert default_precision(fp32, {"ap50": 0.41 - INT8_TOLERANCE / 2, "msa": 0.17}) == "int8"
    assert default_precision(fp32, {"ap50": 0.43, "msa": 0.18}) == "int8"  # better is fine
    assert default_precision(fp32, {"ap50": 0.41 - 2 * INT8_TOLERANCE, "msa": 0.17}) == "fp32"
    assert default_precision(fp32, {"ap50": 0.41, "msa": 0.17 - 2 * INT8_TOLERANCE}) == "fp32"
    assert default_precision(fp32, None) == "fp32"
    assert default_precision(fp32, {}) == "fp32"  # no measurement, no switch


def test_model_file_is_verified_against_its_sha256(tmp_path, model_path):
    import shutil

    from cellseg.onnx_model import sha256_file, verify_sha256

    copy = tmp_path / "model.onnx"
    shutil.copyfile(model_path, copy)
    expected = sha256_file(model_path)
    assert verify_sha256(copy, expected) == expected
    with open(copy, "r+b") as fh:  # flip one byte in the middle of the weights
        fh.seek(copy.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="corrupt or replaced"):
        verify_sha256(copy, expected)


class StoredModel:
    """What the service reads of a model-store entry: its metadata and its files."""

    def __init__(self, folder: Path, metadata: dict):
        self.folder, self.info = folder, type("Info", (), {"metadata": metadata})()

    def path_of(self, name: str) -> str:
        return str(self.folder / name)


def stored(tmp_path: Path, model_path: Path, default: str = "int8") -> StoredModel:
    from cellseg.onnx_model import sha256_file

    shutil.copy(model_path, tmp_path / "model.onnx")
    shutil.copy(model_path.with_suffix(".int8.onnx"), tmp_path / "model.int8.onnx")
    variants = {p: {"file": f, "sha256": sha256_file(tmp_path / f), "metrics": {"ap50": 0.4}}
                for p, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"))}
    return StoredModel(tmp_path, {"default_precision": default, "variants": variants})


def test_served_precision_is_checked_on_this_cpu_unless_forced(tmp_path, model_path):
    import service
    from cellseg.precision import choose_precision

    entry = stored(tmp_path, model_path)
    choice, variant = service.choose_variant(entry, "auto")
    here = choose_precision(model_path)  # the same files choose alike, here
    assert choice.precision == here.precision and variant == entry.info.metadata["variants"][choice.precision]
    assert service.choose_variant(entry, "fp32")[0].reason == "fp32 asked for"
    assert service.choose_variant(entry, "int8")[0].precision == "int8"
    recorded_fp32 = stored(tmp_path, model_path, default="fp32")  # int8 lost too much on validation
    assert service.choose_variant(recorded_fp32, "auto")[0].precision == "fp32"
    old = StoredModel(tmp_path, {"sha256": entry.info.metadata["variants"]["fp32"]["sha256"]})  # before variants
    assert service.choose_variant(old, "auto")[0].path == tmp_path / "model.onnx"


def test_a_corrupt_int8_file_in_the_store_makes_fp32_answer(tmp_path, model_path):
    """Issue 27 (11): a store entry whose int8 file is corrupt made the network process crash-loop."""
    import service

    entry = stored(tmp_path, model_path)
    (tmp_path / "model.int8.onnx").write_bytes(b"corrupt")
    choice, variant = service.choose_variant(entry, "auto")
    assert choice.precision == "fp32" and "int8 file is unusable" in choice.reason and variant["file"] == "model.onnx"
    with pytest.raises(ValueError, match="corrupt or replaced"):
        service.choose_variant(entry, "int8")  # asked for by name: refused loudly


def test_json_answers_are_encoded_by_the_service_and_nan_falls_back_to_bentoml():
    from starlette.responses import Response

    import service

    answer = {"count": 2, "cells": [{"id": 1, "rle": {"counts": "a1b"}}, {"id": 2, "score": 0.5}], "name": "é"}
    response = service.json_response(answer)
    assert isinstance(response, Response) and response.media_type == "application/json"
    assert json.loads(response.body) == answer
    png = Response(b"\x89PNG", media_type="image/png")
    assert service.json_response(png) is png  # files and errors pass through
    with_nan = {"eccentricity": float("nan")}
    assert service.json_response(with_nan) is with_nan  # BentoML writes it as null; json.dumps would write NaN


def test_batch_jobs_default_to_the_shipped_model_and_choose_its_precision_here(model_path):
    """`cellseg segment` without --model runs the shipped model, int8 only where the check allows it."""
    from cellseg.cli import build_parser
    from cellseg.precision import choose_precision
    from cellseg.variants import choose_for_model

    args = build_parser().parse_args(["segment", "x.tif", "--out", "o"])
    assert args.model == model_path and args.precision is None
    assert choose_for_model(args.model).path == choose_precision(model_path).path


@pytest.mark.parametrize("name", ["../x", "", " ", "a b", "x" * 300, "细胞", "a:b:c", "livecell-unet:v1", "-x"])
def test_register_refuses_hostile_names_in_one_line(name, model_path, monkeypatch, capsys):
    """Issue 27 (14): these gave tracebacks; 'livecell-unet:v1' registered as livecell-unet:latest."""
    import export.register as register

    monkeypatch.setattr(register, "register", lambda *a: pytest.fail("nothing may be registered"))
    assert register.main(["--model", str(model_path), f"--name={name}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m export register: error: --name") and error.count("\n") == 1


def test_only_the_shipped_model_takes_the_default_name(tmp_path, model_path, monkeypatch, capsys):
    """Issue 27 (9): a fine-tuned model registered without --name became livecell-unet:latest, what the
    service serves by default."""
    import onnx

    import export.register as register

    calls = []
    monkeypatch.setattr(register, "register", lambda path, name, int8: calls.append(name) or (None, True))
    monkeypatch.setattr(register, "summary", lambda model, created: {})
    other = tmp_path / "lab.onnx"
    model = onnx.load(str(model_path))
    model.doc_string = "fine-tuned elsewhere"  # another file, the same network
    onnx.save(model, str(other))
    assert register.main(["--model", str(other)]) == 2
    assert "not the shipped model" in capsys.readouterr().err and calls == []
    assert register.main(["--model", str(other), "--name", "lab"]) == 0 and calls == ["lab"]
    assert register.main(["--model", str(model_path)]) == 0 and calls == ["lab", "livecell-unet"]


def test_a_lab_name_without_a_model_file_is_refused(monkeypatch, capsys):
    """A user's trial: `export register --name astro-x`, --model forgotten, registered the shipped model
    as astro-x, which then served under the lab's name."""
    import export.register as register

    monkeypatch.setattr(register, "register", lambda *a: pytest.fail("nothing may be registered"))
    assert register.main(["--name", "astro-x"]) == 2
    assert "--name astro-x needs --model" in capsys.readouterr().err


def test_register_refuses_missing_foreign_and_non_onnx_files(tmp_path, monkeypatch, capsys):
    import onnx
    from onnx import TensorProto, helper

    import export.register as register

    monkeypatch.setattr(register, "register", lambda *a: pytest.fail("nothing may be registered"))
    (tmp_path / "text.onnx").write_text("not a model")
    rgb = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "rgb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "h", "w"])]))
    onnx.save(rgb, str(tmp_path / "rgb.onnx"))
    for path, says in ((tmp_path / "missing.onnx", "no such file"), (tmp_path / "text.onnx", "is not an ONNX file"),
                       (tmp_path / "rgb.onnx", "is not a cellseg network")):
        assert register.main(["--model", str(path), "--name", "x"]) == 2
        assert says in capsys.readouterr().err


def test_an_empty_model_tag_means_the_default():
    """Issue 27 (14): CELLSEG_MODEL_TAG="" gave a 69-line traceback at startup."""
    run = subprocess.run([sys.executable, "-c", "import service; print(service.MODEL_TAG)"], cwd=REPO, text=True,
                         env={**os.environ, "CELLSEG_MODEL_TAG": ""}, capture_output=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "livecell-unet:latest", run.stderr[-1000:]


def test_an_int8_file_of_another_model_is_not_paired_with_an_fp32_file(tmp_path, model_path, monkeypatch, capsys):
    """A user's trial: `export int8 --model models/livecell-unet.onnx --out outputs/livecell-unet.int8.onnx`
    (README order) put the shipped model's int8 beside the user's own fp32 file; register paired them
    with int8 as the default (its AP50 0.483 against fp32's 0.014), and batch jobs took it as the
    sibling. The int8 file records the fp32 file it was made from, and that is checked now."""
    import onnx

    import export.register as register
    from cellseg.variants import choose_for_model

    mine = onnx.load(str(model_path))
    onnx.helper.set_model_props(mine, {**{p.key: p.value for p in mine.metadata_props}, "note": "another network"})
    fp32 = tmp_path / "livecell-unet.onnx"
    onnx.save(mine, str(fp32))  # another file (another sha256) than the one the int8 file was made from
    shutil.copy(model_path.with_suffix(".int8.onnx"), tmp_path / "livecell-unet.int8.onnx")
    monkeypatch.setattr(register, "register", lambda *a: pytest.fail("nothing may be registered"))
    assert register.main(["--model", str(fp32), "--name", "mixed-pair"]) == 2
    err = capsys.readouterr().err
    assert "was quantized from another model" in err and "--no-int8" in err
    choice = choose_for_model(fp32)
    assert choice.precision == "fp32" and "another model's" in choice.reason
    with pytest.raises(ValueError, match="quantized from another model"):
        choose_for_model(fp32, "int8")
