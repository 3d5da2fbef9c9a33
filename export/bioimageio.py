"""A bioimage.io model package (format 0.5) of the shipped model, for the bioimage ecosystem
(bioimage.io, ilastik, deepImageJ, QuPath, napari), built and validated with `bioimageio.spec`/`core`.

    python -m export bioimageio --model models/livecell-unet.onnx --out dist/livecell-unet.bioimageio.zip
    # to publish: add --maintainer GITHUB_USER (bioimage.io's `maintainers`; the project has no account)

Weights: the ONNX file itself, and TorchScript traced from the PyTorch weights saved beside it
(`<model>.safetensors`, written by `python -m export`); the two are checked to agree before packaging.
Preprocessing is the runtime's normalisation (`cellseg.preprocess.normalize`: the image's 1st-99th
percentiles to 0-1, unclipped) as a bioimage.io `scale_range`; the test tensors come from a real
LIVECell image run through the runtime (normalise, then ONNX Runtime), so `bioimageio test` checks
that the package reproduces what the service computes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import tifffile
import torch

from cellseg.data import default_data_root
from cellseg.imageio import read_image
from cellseg.instances import display_gray
from cellseg.onnx_model import OnnxModel
from cellseg.preprocess import NORMALIZATION, SIZE_DIVISOR, normalize

LIVECELL_DOI = "10.1038/s41592-021-01249-6"
# A LIVECell image from the official test split (A172, phase contrast, 704x520), cropped to 512 rows
# so both sides are multiples of 32, as the network needs.
TEST_IMAGE = "livecell/images/livecell_test_images/A172/A172_Phase_C7_1_01d12h00m_3.tif"
TEST_SHAPE = (512, 704)
TORCHSCRIPT_TOLERANCE = 1e-4  # max |TorchScript - ONNX Runtime| on the test image


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export bioimageio", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/livecell-unet.onnx"), help="the fp32 ONNX model")
    p.add_argument("--weights", type=Path, default=None,
                   help="its PyTorch weights (default: the .safetensors beside --model)")
    p.add_argument("--out", type=Path, default=Path("dist/livecell-unet.bioimageio.zip"))
    p.add_argument("--image", type=Path, default=None,
                   help=f"test image (default: {TEST_IMAGE} under $CELLSEG_DATA or ../shared/data)")
    p.add_argument("--no-test", action="store_true", help="skip bioimageio.core's test of the written package")
    p.add_argument("--maintainer", action="append", default=[], metavar="GITHUB_USER",
                   help="GitHub account that answers for the package on bioimage.io (repeatable; bioimageio.spec "
                        "checks that it exists, which needs the network). Without one, bioimageio.spec warns "
                        "that maintainers are missing: the project has no such account of its own")
    return p.parse_args(argv)


def maintainers(github_users: list[str]) -> list:
    """bioimage.io Maintainer entries, each GitHub account checked by bioimageio.spec (before anything
    slow runs): a name GitHub does not know, or no network to ask it, stops the export."""
    import httpx
    from bioimageio.spec.model.v0_5 import Maintainer

    entries = []
    for user in github_users:
        try:
            entries.append(Maintainer(github_user=user))
        except (ValueError, httpx.HTTPError) as exc:
            raise SystemExit(f"--maintainer {user}: bioimageio.spec could not confirm this GitHub account "
                             f"(it asks api.github.com, so it needs the network): {exc}") from None
    return entries


def reference_tensors(model: OnnxModel, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(raw input (1, 1, H, W) float32, runtime output (1, 3, H, W)) for the package's test."""
    raw = read_image(image_path)[: TEST_SHAPE[0], : TEST_SHAPE[1]].astype(np.float32)
    if raw.shape != TEST_SHAPE:
        raise SystemExit(f"{image_path}: need at least {TEST_SHAPE} pixels, got {raw.shape}")
    output = model.predict(normalize(raw)[None, None])
    return raw[None, None], output.astype(np.float32)


def trace_torchscript(weights: Path, example: np.ndarray, out: Path):
    """TorchScript of the PyTorch weights, with the final sigmoid like the ONNX graph, traced on
    `example` (a normalised (1, 1, H, W) array; height and width stay dynamic) and saved to `out`."""
    from train.model import WithSigmoid, load_weights

    module = WithSigmoid(load_weights(weights)).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, torch.from_numpy(example))
    traced.save(str(out))
    return traced


def write_cover(raw: np.ndarray, output: np.ndarray, path: Path) -> None:
    """2:1 cover: the normalised image (left) and its foreground/boundary maps in colour (right)."""
    from PIL import Image

    gray = display_gray(raw)
    side = min(gray.shape)
    gray = gray[:side, :side]
    probs = output[:, :side, :side]
    colour = np.stack([np.maximum(gray // 2, (probs[1] * 255).astype(np.uint8)),
                       np.maximum(gray // 2, (probs[0] * 200).astype(np.uint8)), gray // 2], axis=-1)
    Image.fromarray(np.concatenate([np.repeat(gray[..., None], 3, axis=2), colour], axis=1)).save(path)


def _rules_note(post: dict) -> str:
    """The cell rules (merge, filter) are logistic regressions over per-cell numbers that no bioimage.io
    post-processing step expresses: say that tools running the package alone get cells without them."""
    present = [name for key, name in (("cell_merge", "a learnt merge of touching cells"),
                                      ("cell_filter", "a learnt filter of cells annotators do not draw"))
               if post.get(key)]
    if not present:
        return ""
    return (f"\nThe `cellseg` package then applies {' and '.join(present)} (`cellseg/cell_merge.py`, "
            "`cellseg/cell_filter.py`; coefficients in the ONNX file's metadata), which the bioimage.io "
            "format cannot express: a tool that runs this package alone gets the cells of the watershed "
            "without them, and the validation figures below include them.")


def documentation(meta: dict, metrics: dict | None) -> str:
    from export.model_card import _metrics_table, thresholds_only

    post = meta.get("postprocess", {})
    text = f"""# LIVECell U-Net (cellseg)

Instance segmentation of cells in label-free phase-contrast microscopy images (LIVECell-style,
about 0.6 µm per pixel). A U-Net (`segmentation_models_pytorch`, encoder `{meta.get('encoder', '?')}`)
maps one grayscale image to three sigmoid maps: **foreground**, **boundary** (the inner 2-pixel rim
of each cell) and **distance** (per-cell normalised distance to the cell's edge).

## Input and output
- Input `raw`: (batch, channel=1, y, x), float32, any intensity range. Height and width must be
  multiples of {SIZE_DIVISOR} (64 + 32·n). Preprocessing: the image's {NORMALIZATION['low']}th–{NORMALIZATION['high']}th
  percentiles are mapped to 0–1 (`scale_range` over y and x, values outside are kept).
- Other sizes: pad the image at the bottom and right by **reflection** to the next such size (numpy
  `pad(..., mode="reflect")`, what `cellseg.preprocess.pad_to` does), predict, and crop the maps back.
  Zero padding changes the maps (the percentiles then count the zeros): on a 704 × 520 LIVECell image
  padded to 544 rows, 9.8% of pixels moved by more than 0.05 (68 cells where cellseg finds 74),
  against 0.26% (73 cells) with reflection.
- Output `probabilities`: (batch, channel=3, y, x), float32 in 0–1, same size as the input.

## From maps to cells
Cells are the regions of a seeded watershed: seeds where the smoothed core score
(distance × (1 − boundary)) exceeds `seed_threshold`, flooded over foreground above `fg_threshold`.
The tuned defaults are `{json.dumps(thresholds_only(post))}`. The `cellseg` package (`cellseg.postprocess.maps_to_labels`)
does exactly this and is what the project's service and batch jobs use; images larger than 1024
pixels a side are best tiled with 64 px of context (`cellseg.inference`).{_rules_note(post)}

## Training data
LIVECell (Edlund et al. 2021, CC BY-NC 4.0) and the Kaggle-Sartorius cell instance segmentation
images (same microscope family), {meta.get('training', {}).get('train_images', 'see the model card')} training images.

## Validation
Validation images held out from training ({metrics['n_images'] if metrics else '?'} images,
{metrics['n_cells'] if metrics else '?'} cells; AP50 is the COCO-style precision of cells matched at IoU 0.5,
mSA the mean segmentation accuracy over IoU 0.5–0.95), with the default post-processing:

{_metrics_table(metrics) if metrics else 'Not measured.'}

## Licence
The weights were trained on LIVECell, licensed CC BY-NC 4.0: **non-commercial use only**.
Cite LIVECell (doi:{LIVECELL_DOI}) when using this model.
"""
    return text


def build_description(model_path: Path, workdir: Path, raw: np.ndarray, output: np.ndarray, torchscript: Path,
                      maintainers: list | None = None):
    from bioimageio.spec.model.v0_5 import (
        Author,
        AxisId,
        BatchAxis,
        ChannelAxis,
        CiteEntry,
        Doi,
        FileDescr,
        Identifier,
        InputTensorDescr,
        IntervalOrRatioDataDescr,
        LicenseId,
        ModelDescr,
        OnnxWeightsDescr,
        OutputTensorDescr,
        ParameterizedSize,
        ScaleRangeDescr,
        ScaleRangeKwargs,
        SizeReference,
        SpaceInputAxis,
        SpaceOutputAxis,
        TensorId,
        TorchscriptWeightsDescr,
        Version,
        WeightsDescr,
    )

    onnx_model = OnnxModel(model_path)
    meta = onnx_model.metadata
    metrics_file = model_path.with_suffix(".metrics.json")
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    np.save(workdir / "test_input.npy", raw)
    np.save(workdir / "test_output.npy", output)
    # sample tensors: the same arrays as images people can open
    tifffile.imwrite(workdir / "sample_input.tif", raw[0, 0])
    tifffile.imwrite(workdir / "sample_output.tif", output[0])
    write_cover(raw[0, 0], output[0], workdir / "cover.png")
    (workdir / "README.md").write_text(documentation(meta, metrics), encoding="utf-8")

    space = ParameterizedSize(min=2 * SIZE_DIVISOR, step=SIZE_DIVISOR)
    raw_id, out_id = TensorId("raw"), TensorId("probabilities")
    inputs = [InputTensorDescr(
        id=raw_id,
        description="grayscale phase-contrast image, any intensity range",
        axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier("phase")]),
              SpaceInputAxis(id=AxisId("y"), size=space), SpaceInputAxis(id=AxisId("x"), size=space)],
        test_tensor=FileDescr(source=workdir / "test_input.npy"),
        sample_tensor=FileDescr(source=workdir / "sample_input.tif"),
        data=IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[ScaleRangeDescr(kwargs=ScaleRangeKwargs(
            axes=(AxisId("y"), AxisId("x")),
            min_percentile=NORMALIZATION["low"], max_percentile=NORMALIZATION["high"]))],
    )]
    outputs = [OutputTensorDescr(
        id=out_id,
        description="sigmoid probabilities: foreground, boundary, distance",
        axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in ("foreground", "boundary", "distance")]),
              SpaceOutputAxis(id=AxisId("y"), size=SizeReference(tensor_id=raw_id, axis_id=AxisId("y"))),
              SpaceOutputAxis(id=AxisId("x"), size=SizeReference(tensor_id=raw_id, axis_id=AxisId("x")))],
        test_tensor=FileDescr(source=workdir / "test_output.npy"),
        sample_tensor=FileDescr(source=workdir / "sample_output.tif"),
        data=IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )]
    graph = onnx.load(str(model_path), load_external_data=False)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    weights = WeightsDescr(
        onnx=OnnxWeightsDescr(source=model_path, opset_version=opset),
        # traced from the training weights the ONNX file was exported from; checked equal to it
        torchscript=TorchscriptWeightsDescr(source=torchscript, pytorch_version=Version(torch.__version__.split("+")[0]),
                                            parent="onnx"),
    )
    return ModelDescr(
        name="LIVECell U-Net cell segmentation (cellseg)",
        description="U-Net for instance segmentation of cells in label-free phase-contrast images: foreground, "
                    "boundary and distance maps for a seeded watershed. Trained on LIVECell and Kaggle-Sartorius.",
        authors=[Author(name="cellseg contributors")],
        maintainers=maintainers or [],
        cite=[CiteEntry(text="Edlund C. et al. LIVECell—A large-scale dataset for label-free live cell segmentation. "
                             "Nature Methods 18, 1038–1045 (2021)", doi=Doi(LIVECELL_DOI))],
        license=LicenseId("CC-BY-NC-4.0"),
        documentation=FileDescr(source=workdir / "README.md"),
        covers=[FileDescr(source=workdir / "cover.png")],
        tags=["cell-segmentation", "instance-segmentation", "phase-contrast", "livecell", "unet", "2d", "pytorch", "onnx"],
        version=Version("0.1.0"),
        inputs=inputs,
        outputs=outputs,
        weights=weights,
    )


def refuse_output_over_inputs(out: Path, inputs: list[Path]) -> None:
    """Stop before anything is written where --out is one of the inputs, or a folder holding one:
    the package would overwrite the model, then read itself back while growing (13.8 GB in 5 minutes)."""
    target = out.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or target in source.parents:
            raise SystemExit(f"--out {out} would overwrite the input {path}: choose another output path")


def main(argv=None) -> int:
    args = parse_args(argv)
    from bioimageio.spec import save_bioimageio_package

    weights = args.weights or args.model.with_suffix(".safetensors")
    for path, what in ((args.model, "ONNX model"), (weights, "PyTorch weights (written by `python -m export`)")):
        if not path.is_file():
            raise SystemExit(f"{what} not found: {path}")
    image = args.image or default_data_root() / TEST_IMAGE
    if not image.is_file():
        raise SystemExit(f"test image not found: {image} (pass --image or set CELLSEG_DATA)")
    refuse_output_over_inputs(args.out, [args.model, weights, image])
    package_maintainers = maintainers(args.maintainer)
    model = OnnxModel(args.model)
    raw, output = reference_tensors(model, image)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        torchscript = workdir / "weights.torchscript.pt"
        normalized = normalize(raw[0, 0])[None, None]
        traced = trace_torchscript(weights, normalized, torchscript)
        with torch.no_grad():
            diff = float(np.abs(traced(torch.from_numpy(normalized)).numpy() - output).max())
        print(f"TorchScript vs ONNX Runtime on {image.name}: max |difference| = {diff:.2e}")
        if diff > TORCHSCRIPT_TOLERANCE:
            raise SystemExit(f"{weights} does not match {args.model} (max difference {diff:.2e}): re-export both")
        description = build_description(args.model, workdir, raw, output, torchscript, package_maintainers)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_bioimageio_package(description, output_path=args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    if args.no_test:
        return 0
    return 0 if run_bioimageio_test(args.out) else 1


def run_bioimageio_test(package: Path) -> bool:
    """bioimageio.core's own test of the package (each weight format reproduces the test tensors)."""
    from bioimageio.core import test_model

    summary = test_model(package)
    summary.display()
    return summary.status == "passed"


if __name__ == "__main__":
    sys.exit(main())
