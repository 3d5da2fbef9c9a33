"""Batch-job throughput, all on the same images and the same model file in one run: the model
reading and segmenting them in process one at a time (the ceiling; the faster of a run before and
one after the jobs), `cellseg segment` with its default outputs and with each
optional format added (rois, geojson), locally and on Dask workers (`--dask local:N`, N workers x 1
thread), with the memory of each Dask worker. LIVECell TIFFs first, then Sartorius PNGs (both
704x520) up to --images.

    python scripts/bench_dask.py --images 64 --workers 2 --json docs/bench_dask.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_inference import machine_description, write_report  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.onnx_model import default_model_path  # noqa: E402
from cellseg.variants import default_variant  # noqa: E402

DEFAULT = "labels,csv,coco"  # cellseg segment's default outputs
OPTIONAL = ("rois", "geojson")  # each measured added to the default ones


def run_in_process(inputs: Path, model: Path) -> float:
    """Read and segment every image one at a time (the model's load is not counted)."""
    from cellseg.imageio import read_image
    from cellseg.onnx_model import OnnxModel

    onnx_model = OnnxModel(model)
    t0 = time.perf_counter()
    for path in sorted(inputs.iterdir()):
        onnx_model.segment([read_image(path)])
    return time.perf_counter() - t0


def run_local(inputs: Path, out: Path, model: Path, formats: str = "labels,csv,coco") -> float:
    from cellseg.cli import main

    t0 = time.perf_counter()
    assert main(["segment", str(inputs), "--out", str(out), "--model", str(model), "--formats", formats,
                 "--quiet"]) == 0
    return time.perf_counter() - t0


def run_dask(inputs: Path, out: Path, model: Path, workers: int, format_sets: list[str]) -> tuple[list[float], list[int]]:
    """Wall time of a job per format set, each on the same LocalCluster started beforehand (its
    start-up is not counted; the workers load the model in the first job), and each worker's peak
    resident memory."""
    import dask
    from distributed import Client, LocalCluster

    from cellseg.cli import main
    from cellseg.dask_backend import LOCAL_WORKER_ENVIRON

    with dask.config.set(LOCAL_WORKER_ENVIRON):  # the workers `--dask local` starts
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
    seconds = []
    with cluster, Client(cluster) as client:
        for index, formats in enumerate(format_sets):
            t0 = time.perf_counter()
            assert main(["segment", str(inputs), "--out", str(out / str(index)), "--model", str(model),
                         "--formats", formats, "--dask", cluster.scheduler_address, "--quiet"]) == 0
            seconds.append(time.perf_counter() - t0)
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    return seconds, sorted(peaks.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_variant(default_model_path()),
                   help="the ONNX file every row runs (default: the one `cellseg segment` runs by default)")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    sources = (sorted((args.data / "livecell" / "images").rglob("*.tif"))
               + sorted((args.data / "sartorius" / "train").glob("*.png")))[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for path in sources:
            shutil.copy(path, inputs / path.name)
        # The ceiling is measured before and after the jobs, and the faster of the two kept: the
        # machine's speed drifts during a run by more than the differences measured here.
        import cellseg.cli  # noqa: F401  (once per process: not a job's time)

        in_process = run_in_process(inputs, args.model)
        local = run_local(inputs, Path(tmp) / "local", args.model)
        with_formats = {fmt: run_local(inputs, Path(tmp) / f"local-{fmt}", args.model, f"{DEFAULT},{fmt}")
                        for fmt in OPTIONAL}
        (dask, *dask_formats), worker_rss = run_dask(inputs, Path(tmp) / "dask", args.model, args.workers,
                                                     [DEFAULT, *(f"{DEFAULT},{fmt}" for fmt in OPTIONAL)])
        in_process = min(in_process, run_in_process(inputs, args.model))
    n = len(sources)
    report = {
        "machine": machine_description(), "model": args.model.name, "images": n,
        "image_size": "704x520 (LIVECell TIFF, Sartorius PNG)",
        "in_process_images_per_s": round(n / in_process, 2),
        "local_images_per_s": round(n / local, 2),
        "local_vs_in_process": round(in_process / local, 2),
        **{f"local_with_{fmt}_images_per_s": round(n / seconds, 2) for fmt, seconds in with_formats.items()},
        **{f"{fmt}_ms_per_image": round(1000 * (seconds - local) / n, 1) for fmt, seconds in with_formats.items()},
        f"dask_local_{args.workers}_images_per_s": round(n / dask, 2),
        **{f"dask_with_{fmt}_images_per_s": round(n / seconds, 2) for fmt, seconds in zip(OPTIONAL, dask_formats)},
        "dask_vs_local": round(local / dask, 2),
        "dask_worker_peak_rss_mb": [round(b / 2**20) for b in worker_rss],
        "note": "every row runs the same model file; job times include the CLI's model load, in-process and "
                "Dask times exclude the model load and the cluster start-up; local and Dask write the same outputs",
        "command": "python scripts/bench_dask.py " + " ".join(sys.argv[1:]),
        "cores": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
