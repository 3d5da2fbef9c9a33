"""The precision check (cellseg/precision.py): int8 answers only where, on the CPU at hand, its cells
agree with fp32's and it is faster; otherwise fp32 answers and says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from cellseg import precision
from cellseg.precision import (
    Agreement,
    choose_precision,
    fp32_sibling,
    int8_sibling,
    measure_agreement,
    reference_images,
    requested_precision,
)


def test_requested_precision_reads_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("CELLSEG_PRECISION", raising=False)
    assert requested_precision() == "auto"
    monkeypatch.setenv("CELLSEG_PRECISION", "FP32")
    assert requested_precision() == "fp32"
    assert requested_precision("int8") == "int8"  # a command's flag beats the environment
    with pytest.raises(ValueError, match="CELLSEG_PRECISION='int4'"):
        monkeypatch.setenv("CELLSEG_PRECISION", "int4")
        requested_precision()
    with pytest.raises(ValueError, match="--precision='bf16'"):
        requested_precision("bf16")


def test_siblings():
    assert int8_sibling(Path("runs/x/model.onnx")) == Path("runs/x/model.int8.onnx")
    assert fp32_sibling(Path("runs/x/model.int8.onnx")) == Path("runs/x/model.onnx")
    assert fp32_sibling(Path("runs/x/model.onnx")) is None


def test_reference_images_are_real_crops():
    images = reference_images()
    assert len(images) == 4 and all(image.shape == (256, 256) for image in images)
    assert all(image.std() > 5 for image in images)  # textured cells, not blank


def broken_int8(int8: Path, out: Path) -> Path:
    """A valid int8 ONNX file whose stem convolution's weights are negated: it loads and runs, and
    gets other cells than fp32 (as saturating kernels do)."""
    model = onnx.load(str(int8))
    weights = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weights)
    weights.CopyFrom(onnx.numpy_helper.from_array(np.negative(array, dtype=np.int8), weights.name))
    onnx.save(model, str(out))
    return out


@pytest.fixture
def model_pair(tmp_path, model_path) -> tuple[Path, Path]:
    fp32 = tmp_path / "m.onnx"
    shutil.copy(model_path, fp32)
    shutil.copy(model_path.with_suffix(".int8.onnx"), tmp_path / "m.int8.onnx")
    return fp32, tmp_path / "m.int8.onnx"


def test_shipped_int8_agrees_with_fp32_on_this_cpu(model_path):
    """On whatever CPU runs the tests, the shipped int8 file's cells agree with fp32's."""
    choice = choose_precision(model_path, requested="int8")
    assert choice.check.agrees, choice.reason
    assert choice.check.foreground_iou >= precision.MIN_FOREGROUND_IOU
    assert choice.check.check_s < 10


def test_a_disagreeing_int8_file_makes_fp32_answer_and_says_why(model_pair):
    fp32, int8 = model_pair
    broken_int8(int8, int8)
    choice = choose_precision(fp32, requested="auto")
    assert choice.precision == "fp32" and choice.path == fp32
    assert choice.reason.startswith("int8 disagrees with fp32 on this CPU")
    assert not choice.check.agrees and choice.to_dict()["check"]["foreground_iou"] < precision.MIN_FOREGROUND_IOU
    forced = choose_precision(fp32, requested="int8")  # forced: int8 answers, and the reason warns
    assert forced.precision == "int8" and forced.path == int8 and "DISAGREES" in forced.reason
    assert choose_precision(fp32, requested="fp32").reason == "fp32 asked for"


def test_an_unreadable_int8_file_makes_fp32_answer(model_pair):
    fp32, int8 = model_pair
    int8.write_bytes(b"not an onnx file")
    choice = choose_precision(fp32)
    assert choice.precision == "fp32" and "could not be checked" in choice.reason
    with pytest.raises(Exception):  # noqa: B017  forced int8 that cannot load fails loudly
        choose_precision(fp32, requested="int8")


def test_int8_that_is_not_faster_here_is_not_served(model_pair, monkeypatch):
    fp32, _ = model_pair
    slow = Agreement(0.99, 0.99, 0.001, fp32_ms=100, int8_ms=95, check_s=1)
    monkeypatch.setattr(precision, "measure_agreement", lambda *a, **k: slow)
    choice = choose_precision(fp32)
    assert choice.precision == "fp32" and "not faster" in choice.reason


def test_int8_without_validation_figures_within_tolerance_is_not_checked(model_pair, monkeypatch):
    fp32, _ = model_pair
    monkeypatch.setattr(precision, "measure_agreement", lambda *a, **k: pytest.fail("no check expected"))
    choice = choose_precision(fp32, int8_validated=False)
    assert choice.precision == "fp32" and "validation" in choice.reason


def test_the_check_runs_once_per_process(model_pair, monkeypatch):
    fp32, _ = model_pair
    calls = []
    fast = Agreement(0.99, 0.99, 0.001, fp32_ms=100, int8_ms=50, check_s=1)
    monkeypatch.setattr(precision, "measure_agreement", lambda *a, **k: calls.append(1) or fast)
    first, second = choose_precision(fp32), choose_precision(fp32)
    assert first is second and first.precision == "int8" and len(calls) == 1


def test_batch_jobs_choose_like_the_runtime(model_pair, model_path):
    """`cellseg segment`'s choice for a model: its int8 sibling where the recorded figures and the
    check allow it; an int8 file given by name is checked against its fp32 sibling."""
    from cellseg.variants import INT8_TOLERANCE, choose_for_model

    fp32, int8 = model_pair
    (fp32.parent / "m.metrics.json").write_text(json.dumps({"ap50": 0.41, "msa": 0.17}))
    (fp32.parent / "m.int8.metrics.json").write_text(json.dumps({"ap50": 0.41 - 2 * INT8_TOLERANCE, "msa": 0.17}))
    assert choose_for_model(fp32).precision == "fp32"  # int8 lost too much on validation: never checked
    (fp32.parent / "m.int8.metrics.json").write_text(json.dumps({"ap50": 0.41, "msa": 0.17}))
    here = choose_precision(model_path)
    assert choose_for_model(fp32).precision == here.precision  # the same files choose alike
    given = choose_for_model(int8)
    assert given.precision == "int8" and given.requested == "int8" and given.check is not None
    assert choose_for_model(int8, "fp32").path == fp32


@pytest.mark.skipif(not shutil.which("qemu-x86_64"), reason="qemu-user not installed (.ci/run installs it)")
def test_shipped_int8_agrees_with_fp32_on_an_avx2_cpu(model_path):
    """The shipped int8 file on a CPU without VNNI (emulated: its int8 kernels, exact results). The U8S8
    file shipped before failed this (foreground IoU 0.81, F1 0.70 against fp32)."""
    from cellseg.emulation import emulated_maps
    from cellseg.onnx_model import OnnxModel

    fp32, images = OnnxModel(model_path), reference_images()
    fp32_maps = precision._timed_maps(fp32, images)[0]
    int8_maps = emulated_maps(model_path.with_suffix(".int8.onnx"), images, timeout_s=600)
    iou, f1 = precision._cell_agreement(fp32_maps, int8_maps, fp32.default_params)
    assert iou >= precision.MIN_FOREGROUND_IOU and f1 >= precision.MIN_MATCHED_F1, (iou, f1)


def test_measure_agreement_times_both(model_path):
    from cellseg.onnx_model import OnnxModel

    model = OnnxModel(model_path)
    same = measure_agreement(model, model, reference_images()[:1])
    assert same.foreground_iou == 1.0 and same.matched_f1 == 1.0 and same.mean_abs_diff == 0.0
    assert same.fp32_ms > 0 and same.int8_ms > 0


def test_int8_kernels_are_named_from_the_cpu_flags():
    from cellseg.cpu import describe_cpu, has_vnni, int8_kernels

    assert int8_kernels({"avx2", "avx512bw", "avx512_vnni", "amx_int8"}) == "AMX"
    assert int8_kernels({"avx2", "avx512bw", "avx512_vnni"}) == "AVX-512 VNNI"
    assert int8_kernels({"avx2", "avx_vnni"}) == "AVX-VNNI"
    assert int8_kernels({"avx2", "avx512f", "avx512bw"}) == "AVX-512 without VNNI"
    assert int8_kernels({"avx2", "fma"}) == "AVX2 without VNNI" and not has_vnni({"avx2", "fma"})
    assert has_vnni({"avx2", "avx512bw", "avx512_vnni"})
    assert describe_cpu().endswith(int8_kernels())


def test_shipped_int8_weights_are_7_bit(model_path):
    """The recipe that holds without VNNI: every int8 weight in -64..64, so a pair of uint8 x int8
    products (2 x 255 x 64 = 32640 < 32768) fits the 16-bit sums of AVX2 kernels; the file records the recipe."""
    from cellseg.onnx_model import read_metadata
    from export.int8 import Int8Recipe

    int8 = model_path.with_suffix(".int8.onnx")
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(int8)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(weights) > 20 and all(w.min() >= -64 and w.max() <= 64 for w in weights)
    assert Int8Recipe().reduce_range and read_metadata(int8)["quantization"]["reduce_range"] is True


def test_agreement_is_checked_on_the_thresholds_cells_not_the_cell_rules(model_path):
    """The shipped model's cell rules keep or drop borderline cells on tiny map differences: checked
    with them, int8's foreground IoU on the reference crops sat at 0.951 against the 0.95 floor (0.961
    without), so the choice could differ between CPUs for no fault of the kernels."""
    from cellseg.onnx_model import OnnxModel

    fp32, int8 = OnnxModel(model_path), OnnxModel(model_path.with_suffix(".int8.onnx"))
    assert fp32.default_params.cell_filter is not None
    images = reference_images()
    fp32_maps, int8_maps = precision._timed_maps(fp32, images)[0], precision._timed_maps(int8, images)[0]
    with_rules = precision._cell_agreement(fp32_maps, int8_maps, fp32.default_params)
    thresholds = precision._cell_agreement(fp32_maps, int8_maps, fp32.default_params.without_rules())
    assert with_rules == thresholds and thresholds[0] >= precision.MIN_FOREGROUND_IOU + 0.005
