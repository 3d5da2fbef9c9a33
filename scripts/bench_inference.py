"""In-process inference speed on LIVECell-size images (704x520): ONNX Runtime fp32 (and int8 if
given) vs PyTorch eager, network only and end to end (normalise -> network -> watershed), with the
ratios of issue 9 (end to end vs eager, post-processing share, fraction of the matmul peak).

    python scripts/bench_inference.py --repeats 20 [--int8 models/livecell-unet.int8.onnx]
        [--baseline other.onnx] [--tta]

--baseline times another ONNX model (e.g. the previously shipped one) in the same run, so the two
compare on the same machine; --tta adds the end-to-end time with test-time augmentation.

PyTorch eager is timed with the weights beside the ONNX file (<model>.safetensors), or the training
checkpoint's if --checkpoint is given, else random weights of the same architecture: the network's
time does not depend on them, but post-processing's does (random maps give few cells to cut, and the
cell rules work per cell), so end to end compares fairly only with the real weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from cellseg.cpu import describe_cpu  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.inference import predict_padded, segment_images  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402
from cellseg.preprocess import normalize  # noqa: E402


def livecell_images(root: Path, limit: int) -> list[Path]:
    images = sorted((root / "livecell" / "images").rglob("*.tif"))
    if not images:
        raise SystemExit(f"no LIVECell images under {root}")
    return images[:limit]


def timeit(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return {"mean_ms": round(statistics.mean(times), 1), "p50_ms": round(statistics.median(times), 1),
            "min_ms": round(min(times), 1)}


def torch_predictor(onnx_model: OnnxModel, checkpoint: Path | None, threads: int):
    import torch

    from train.model import WithSigmoid, build_model, load_checkpoint, load_weights

    torch.set_num_threads(threads)
    weights = onnx_model.path.with_suffix(".safetensors")
    if checkpoint:
        model, _ = load_checkpoint(checkpoint)
    elif weights.is_file():  # the same weights as the ONNX file: the same maps, so the same cells to cut
        model = load_weights(weights)
    else:  # the network's time does not depend on its weights, but the post-processing's does
        arch = onnx_model.metadata["architecture"]
        model = build_model(arch["encoder"], None, tuple(arch["decoder_channels"]))
    wrapped = WithSigmoid(model).eval()

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        return wrapped(torch.from_numpy(batch)).numpy()
    return predict


def machine_description() -> str:
    """CPU model, cores and the int8 instructions that decide ONNX Runtime's kernels (cellseg.cpu)."""
    return describe_cpu()


def network_flops(onnx_model: OnnxModel, height: int = 544, width: int = 704) -> int:
    """Floating-point operations of one forward pass at (height, width), counted by PyTorch's
    flop counter on the same architecture (a multiply-add counts as 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from train.model import build_model

    arch = onnx_model.metadata["architecture"]
    model = build_model(arch["encoder"], None, tuple(arch["decoder_channels"])).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, height, width))
    return int(counter.get_total_flops())


def peak_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """What these cores reach on a large fp32 matrix multiply (PyTorch's BLAS), in GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(timeit_once(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def peak_int8_gops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """What these cores reach on a large int8 matrix multiply (ONNX Runtime's MatMulInteger, uint8 x
    int8 -> int32, the kernel its QDQ convolutions use), in GOP/s (a multiply-add counts as 2)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (size, size), dtype=np.uint8), "b": rng.integers(-127, 127, (size, size), dtype=np.int8)}
    session.run(None, feed)
    best = min(timeit_once(lambda: session.run(None, feed)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def timeit_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_report(report: dict, path: Path | None) -> None:
    """A benchmark's JSON report, where --json asked for it (every bench script writes through here)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def publish_report(report: dict, path: Path | None) -> None:
    """Print a benchmark's JSON report, and write it where --json asked."""
    print(json.dumps(report, indent=2))
    write_report(report, path)


def command_line() -> str:
    """How this script was run, as the docs quote each figure's command: `python scripts/NAME ARGS`."""
    return " ".join(["python", f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def run(args) -> dict:
    threads = args.threads or os.cpu_count() or 1
    paths = livecell_images(args.data, args.images)
    images = [read_image(p) for p in paths]
    one = [normalize(images[0])]
    fp32 = OnnxModel(args.model, threads=threads)
    backends = {"onnxruntime_fp32": (fp32.predict, fp32.default_params)}
    if args.int8:
        backends["onnxruntime_int8"] = (OnnxModel(args.int8, threads=threads).predict, fp32.default_params)
    backends["pytorch_eager"] = (torch_predictor(fp32, args.checkpoint, threads), fp32.default_params)
    if args.baseline:
        baseline = OnnxModel(args.baseline, threads=threads)
        backends["baseline_onnxruntime_fp32"] = (baseline.predict, baseline.default_params)
    results = {}
    for name, (predict, params) in backends.items():
        results[name] = {
            "network_1_image": timeit(lambda p=predict: predict_padded(p, one), args.repeats),
            "end_to_end_1_image": timeit(lambda p=predict, q=params: segment_images(p, images[:1], q), args.repeats),
            "end_to_end_per_image_batch4": {
                k: round(v / 4, 1) for k, v in
                timeit(lambda p=predict, q=params: segment_images(p, images[:4], q, batch_size=4), args.repeats).items()},
        }
        print(name, json.dumps(results[name]), flush=True)
    if args.tta:
        results["onnxruntime_fp32_tta"] = {"end_to_end_1_image": timeit(
            lambda: segment_images(fp32.predict, images[:1], fp32.default_params, tta=True), max(3, args.repeats // 4))}
        print("onnxruntime_fp32_tta", json.dumps(results["onnxruntime_fp32_tta"]), flush=True)
    base = results["pytorch_eager"]["network_1_image"]["p50_ms"]
    ratios = {name: round(base / r["network_1_image"]["p50_ms"], 2) for name, r in results.items()
              if "network_1_image" in r}
    eager_e2e = results["pytorch_eager"]["end_to_end_1_image"]["p50_ms"]
    report_ratios = {
        # issue 9: end to end in process, one image, against the seed's way (PyTorch eager, then the same post-processing)
        "end_to_end_speedup_vs_pytorch_eager": {
            name: round(eager_e2e / r["end_to_end_1_image"]["p50_ms"], 2) for name, r in results.items()
            if "end_to_end_1_image" in r and name.startswith("onnxruntime") and "tta" not in name},
        # everything but the network (normalisation, padding, map rounding, watershed, merge) as a share of end to end
        "post_processing_share_of_end_to_end": {
            name: round(1 - r["network_1_image"]["p50_ms"] / r["end_to_end_1_image"]["p50_ms"], 3)
            for name, r in results.items() if "network_1_image" in r and not name.startswith("baseline")},
    }
    if args.baseline:
        new, old = results["onnxruntime_fp32"], results["baseline_onnxruntime_fp32"]
        report_ratios["end_to_end_model_vs_baseline"] = round(
            new["end_to_end_1_image"]["p50_ms"] / old["end_to_end_1_image"]["p50_ms"], 2)
    if args.tta:
        report_ratios["tta_end_to_end_cost"] = round(results["onnxruntime_fp32_tta"]["end_to_end_1_image"]["p50_ms"]
                                                     / results["onnxruntime_fp32"]["end_to_end_1_image"]["p50_ms"], 2)
    flops = network_flops(fp32)
    peak = peak_gflops(threads)
    peak_int8 = peak_int8_gops(threads)
    achieved = {name: round(flops / (r["network_1_image"]["p50_ms"] / 1000) / 1e9, 1)
                for name, r in results.items() if "network_1_image" in r and not name.startswith("baseline")}
    # each backend against the peak of its own arithmetic: int8 against the int8 matmul
    own_peak = {name: peak_int8 if "int8" in name else peak for name in achieved}
    limit = {"network_gflop_per_image": round(flops / 1e9, 2), "peak_matmul_gflops": round(peak, 1),
             "peak_int8_matmul_gops": round(peak_int8, 1), "achieved_gflops": achieved,
             "fraction_of_peak": {k: round(v / own_peak[k], 3) for k, v in achieved.items()}}
    print("limit", json.dumps(limit), flush=True)
    return {"machine": machine_description(), "model": str(args.model), "baseline": args.baseline and str(args.baseline),
            "ratios": report_ratios, "distance_to_limit": limit,
            "threads": threads, "image": "704x520 LIVECell (padded to 704x544)", "repeats": args.repeats,
            "results": results, "speedup_vs_pytorch_eager_network": ratios}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--int8", type=Path)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--baseline", type=Path, help="another ONNX model to time in the same run")
    p.add_argument("--tta", action="store_true", help="also time end to end with test-time augmentation")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    report = run(args)
    print(json.dumps(report["speedup_vs_pytorch_eager_network"]), json.dumps(report["ratios"]))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
