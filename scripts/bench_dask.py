"""Batch-job throughput, all on the same images and the same model file in one run: the model
reading and segmenting them in process one at a time (the ceiling), `cellseg segment` with its
default outputs and with each optional format added (rois, geojson), locally and on Dask workers
(`--dask local:N`, N workers x 1 thread, one cluster for the whole run), with the memory of each
Dask worker. LIVECell TIFFs first, then Sartorius PNGs (both 704x520) up to --images. Every round
runs every row in turn, and the figures are medians over the rounds: this machine's speed drifts
by more than the differences measured here.

    python scripts/bench_dask.py --images 64 --workers 2 --rounds 3 --json docs/bench_dask.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_inference import command_line, machine_description, publish_report  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.onnx_model import default_model_path  # noqa: E402
from cellseg.variants import choose_for_model  # noqa: E402

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


def run_job(inputs: Path, out: Path, model: Path, formats: str, extra: list[str] | None = None) -> float:
    """Wall time of `cellseg segment` (in this process; `extra`: e.g. --dask ADDRESS)."""
    from cellseg.cli import main

    t0 = time.perf_counter()
    assert main(["segment", str(inputs), "--out", str(out), "--model", str(model), "--formats", formats,
                 "--quiet", *(extra or [])]) == 0
    return time.perf_counter() - t0


@contextlib.contextmanager
def dask_cluster(workers: int) -> Iterator[tuple[str, object]]:
    """(scheduler address, client) of a LocalCluster with the workers `--dask local` starts, their
    task modules imported (as this process imported cellseg.cli: once per process, not a job's time)."""
    import dask
    from distributed import Client, LocalCluster

    from cellseg.dask_backend import LOCAL_WORKER_ENVIRON

    with dask.config.set(LOCAL_WORKER_ENVIRON):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
    with cluster, Client(cluster) as client:
        client.run(_import_task_modules)
        yield cluster.scheduler_address, client


def _import_task_modules() -> None:
    import cellseg.batch  # noqa: F401
    import cellseg.dask_backend  # noqa: F401
    import cellseg.onnx_model  # noqa: F401
    import cellseg.outputs  # noqa: F401
    import cellseg.postprocess  # noqa: F401


def peak_rss(client) -> list[int]:
    """Each worker's peak resident memory, MB."""
    peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    return sorted(round(b / 2**20) for b in peaks.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="the ONNX file every row runs (default: the one `cellseg segment` "
                                               "runs by default on this CPU)")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.model = args.model or choose_for_model(default_model_path()).path
    sources = (sorted((args.data / "livecell" / "images").rglob("*.tif"))
               + sorted((args.data / "sartorius" / "train").glob("*.png")))[: args.images]
    format_sets = {"default": DEFAULT, **{fmt: f"{DEFAULT},{fmt}" for fmt in OPTIONAL}}
    rounds: list[dict[str, float]] = []  # seconds of each row, per round
    import cellseg.cli  # noqa: F401  (once per process: not a job's time)

    with tempfile.TemporaryDirectory() as tmp, dask_cluster(args.workers) as (scheduler, client):
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for path in sources:
            shutil.copy(path, inputs / path.name)
        for r in range(args.rounds):  # rows alternate, so the machine's drift touches all alike
            seconds = {"in_process": run_in_process(inputs, args.model)}
            for name, formats in format_sets.items():
                seconds[f"local_{name}"] = run_job(inputs, Path(tmp) / f"{r}-local-{name}", args.model, formats)
                seconds[f"dask_{name}"] = run_job(inputs, Path(tmp) / f"{r}-dask-{name}", args.model, formats,
                                                  ["--dask", scheduler])
            rounds.append(seconds)
        worker_rss = peak_rss(client)
    n = len(sources)

    def rate(row: str) -> float:
        return round(statistics.median(n / r[row] for r in rounds), 2)

    def ratio(faster: str, slower: str) -> float:  # median of the per-round ratios
        return round(statistics.median(r[slower] / r[faster] for r in rounds), 2)

    def extra_ms(row: str, base: str) -> float:
        return round(statistics.median(1000 * (r[row] - r[base]) / n for r in rounds), 1)

    report = {
        "machine": machine_description(), "model": args.model.name, "images": n, "rounds": args.rounds,
        "image_size": "704x520 (LIVECell TIFF, Sartorius PNG)",
        "in_process_images_per_s": rate("in_process"),
        "local_images_per_s": rate("local_default"),
        "local_vs_in_process": ratio("local_default", "in_process"),
        **{f"local_with_{fmt}_images_per_s": rate(f"local_{fmt}") for fmt in OPTIONAL},
        **{f"{fmt}_ms_per_image": extra_ms(f"local_{fmt}", "local_default") for fmt in OPTIONAL},
        f"dask_local_{args.workers}_images_per_s": rate("dask_default"),
        **{f"dask_with_{fmt}_images_per_s": rate(f"dask_{fmt}") for fmt in OPTIONAL},
        "dask_vs_local": ratio("dask_default", "local_default"),
        "dask_worker_peak_rss_mb": worker_rss,
        "seconds_per_round": [{row: round(t, 2) for row, t in r.items()} for r in rounds],
        "note": "medians over the rounds; every row runs the same model file; job times include the CLI's model "
                "load, in-process times exclude it, Dask times exclude the cluster's start-up; local and Dask "
                "write the same outputs",
        "command": command_line(),
        "cores": os.cpu_count(),
    }
    publish_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
