"""Test-time augmentation in the shared inference path: mirrored passes are undone exactly and averaged."""

import numpy as np

from cellseg.inference import TTA_FLIPS, predict_maps, tta_expand, tta_reduce


def equivariant(batch: np.ndarray) -> np.ndarray:
    """A 'network' that commutes with mirroring: per-pixel function of the input."""
    p = 1 / (1 + np.exp(-batch))
    return np.concatenate([p, 1 - p, p * p], axis=1).astype(np.float32)


def left_biased(batch: np.ndarray) -> np.ndarray:
    """A 'network' that does not: it adds a ramp rising to the right."""
    ramp = np.linspace(0, 1, batch.shape[-1], dtype=np.float32)
    out = equivariant(batch)
    out[:, 0] = ramp
    return out


def test_expand_then_reduce_is_the_identity():
    arrays = [np.random.default_rng(i).random((3, 37, 53)).astype(np.float32) for i in range(2)]
    expanded = tta_expand([a[0] for a in arrays])
    assert len(expanded) == 2 * len(TTA_FLIPS)
    # feed the mirrored inputs through an identity "network" (3 channels = the input thrice)
    outputs = [np.stack([e, e, e]) for e in expanded]
    for merged, original in zip(tta_reduce(outputs), arrays):
        np.testing.assert_allclose(merged, np.stack([original[0]] * 3), atol=1e-6)


def test_tta_equals_plain_for_an_equivariant_network_and_averages_otherwise(synthetic_gray):
    image = synthetic_gray.astype(np.float32)
    plain = predict_maps(equivariant, [image])[0]
    np.testing.assert_allclose(predict_maps(equivariant, [image], tta=True)[0], plain, atol=1e-6)
    # with a ramp 0..1 in x, the left-right mirrored passes give 1..0: the average is flat at 0.5
    averaged = predict_maps(left_biased, [image], tta=True)[0]
    assert predict_maps(left_biased, [image])[0][0].std() > 0.2
    np.testing.assert_allclose(averaged[0], 0.5, atol=0.02)


def test_maps_travel_as_8_bit_codes_within_half_a_step():
    from cellseg.inference import MAP_LEVELS, decode_maps, encode_maps

    maps = np.random.default_rng(0).random((3, 17, 23)).astype(np.float32)
    codes = encode_maps([maps])
    assert codes[0].dtype == np.uint8 and codes[0].nbytes * 4 == maps.nbytes
    back = decode_maps(codes)[0]
    assert back.dtype == np.float32 and np.abs(back - maps).max() <= 0.5 / MAP_LEVELS + 1e-7
    assert decode_maps(encode_maps([np.array([0.0, 1.0, 1.5, -0.2])]))[0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_codes_are_round_of_clipped_maps_times_255_for_any_float_type():
    from cellseg.inference import encode_maps

    rng = np.random.default_rng(1)
    for dtype in (np.float16, np.float32, np.float64):
        maps = (rng.random((3, 40, 50)) * 1.4 - 0.2).astype(dtype)
        maps.flat[:4] = [0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0]  # halfway cases: round half to even
        np.testing.assert_array_equal(encode_maps([maps])[0], np.rint(np.clip(maps, 0.0, 1.0) * 255).astype(np.uint8))


def model_with_tta_default(source, folder):
    """A copy of `source` whose metadata says "tta": true, as a fine-tuned model's does."""
    import shutil

    from cellseg.onnx_model import read_metadata
    from export.onnx_export import set_metadata

    path = folder / "tta-default.onnx"
    shutil.copyfile(source, path)
    set_metadata(path, {**read_metadata(source), "tta": True})
    return path


def test_a_model_whose_metadata_says_tta_runs_with_it_unless_told_otherwise(model_path, tmp_path):
    """Issue 29: a fine-tuned model's thresholds are picked on TTA maps, so every path must apply TTA
    by default for it (and only for it): the library, `cellseg segment` and `cellseg segment --no-tta`."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from cellseg.imageio import read_image
    from cellseg.instances import png_bytes
    from cellseg.onnx_model import OnnxModel

    repo = Path(__file__).resolve().parent.parent
    tta_model = OnnxModel(model_with_tta_default(model_path, tmp_path))
    shipped = OnnxModel(model_path)
    assert tta_model.default_tta and not shipped.default_tta
    image = read_image(repo / "cellseg" / "reference" / "livecell-A172.png")
    by_default = tta_model.segment([image])[0]
    np.testing.assert_array_equal(by_default.probs, shipped.segment([image], tta=True)[0].probs)
    np.testing.assert_array_equal(tta_model.segment([image], tta=False)[0].probs, shipped.segment([image])[0].probs)
    assert not np.array_equal(by_default.probs, shipped.segment([image])[0].probs)

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "cells.png").write_bytes(png_bytes(np.clip(image, 0, 255).astype(np.uint8)))
    for extra, expected in (([], True), (["--no-tta"], False)):
        out = tmp_path / f"out{len(extra)}"
        run = subprocess.run([sys.executable, "-m", "cellseg", "segment", str(inputs), "--out", str(out), "--model",
                              str(tta_model.path), "--precision", "fp32", "--quiet", *extra],
                             cwd=repo, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads((out / "job.json").read_text())["tta"] is expected
