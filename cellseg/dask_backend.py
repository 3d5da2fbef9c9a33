"""A batch-job backend on Dask `distributed`: the same per-image step (`cellseg.batch.image_outputs`)
run by the workers of a local or remote cluster.

    cellseg segment INPUTS --out DIR --dask local          # a LocalCluster, one 1-thread worker per core
    cellseg segment INPUTS --out DIR --dask local:4        # 4 workers x 1 thread
    cellseg segment INPUTS --out DIR --dask tcp://host:8786  # any running scheduler (dask-jobqueue, k8s...)

- Workers read the inputs and the model from paths they can see (a shared file system on a cluster)
  and load the model once per worker process, with ONNX Runtime sized to the worker's threads; a
  worker whose model file differs from the client's (sha256) refuses to run. A time-lapse stack is
  one task per frame, each reading only its own frame. A --pixel-size travels with every task;
  without one, workers read each file's own (a stack's for its frames) from its metadata.
- Workers return encoded outputs; the client writes them, so the output folder needs to be
  visible only to the client, and every file is written atomically as in a local run.
- Workers of a cluster of your own run ~1.4x faster without Dask's default MALLOC_TRIM_THRESHOLD_
  (see LOCAL_WORKER_ENVIRON): start them with this in a Dask configuration file (e.g.
  ~/.config/dask/cellseg.yaml; an environment variable cannot unset it):
      distributed: {nanny: {pre-spawn-environ: {MALLOC_TRIM_THRESHOLD_: null}}}
- At most a few tasks per worker thread are in flight, so a million inputs never become a million
  futures. A killed worker's tasks are re-run by Dask on the others; an image whose task fails for
  good (e.g. it kills workers again and again) is reported in errors.json, and a re-run redoes it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from cellseg.batch import (
    DEFAULT_FORMATS,
    Backend,
    ImageOutputs,
    Item,
    Segmenter,
    _guarded,
    available_cores,
    onnx_segmenter,
)
from cellseg.pixelsize import PixelSize
from cellseg.postprocess import PostprocessParams
from cellseg.precision import PrecisionChoice

TASKS_PER_THREAD = 2
_MODELS: dict[tuple[str, int], object] = {}  # per worker process: the model, loaded once


class WorkerPrecisionError(RuntimeError):
    """int8 was chosen where the job started, but disagrees with fp32 on this worker's CPU."""


def check_worker_precision(model_path: str, precision: dict, threads: int) -> None:
    """Where the job runs int8 by the client's automatic choice, this worker checks it on its own CPU
    (once per process: cellseg.precision caches it). A cluster's machines may differ, and one job
    folder holds the results of one file: a worker whose CPU gets other cells from int8 refuses its
    images (reported in errors.json) rather than mixing fp32 results in."""
    from cellseg.precision import choose_precision, fp32_sibling

    if precision.get("precision") != "int8" or precision.get("requested") != "auto":
        return
    fp32 = fp32_sibling(Path(model_path))
    here = choose_precision(fp32, Path(model_path), "auto", threads=threads) if fp32 and fp32.is_file() else None
    if here is not None and here.precision != "int8":
        raise WorkerPrecisionError(f"int8 was chosen on the machine that started the job, but on this worker "
                                   f"({here.cpu}) {here.reason}: run the job with --precision fp32 (into another --out)")


def _worker_segmenter(model_path: str, sha256: str, params: dict, tta: bool, precision: dict) -> Segmenter:
    from distributed import get_worker

    from cellseg.onnx_model import OnnxModel, verify_sha256

    threads = get_worker().state.nthreads
    key = (model_path, threads)
    if key not in _MODELS:
        verify_sha256(Path(model_path), sha256)  # the file this worker sees is the client's model
        check_worker_precision(model_path, precision, threads)
        _MODELS[key] = OnnxModel(model_path, threads=threads)
    return onnx_segmenter([_MODELS[key]], PostprocessParams(**params), tta)


def _task(item: Item, model_path: str, sha256: str, params: dict, tta: bool, precision: dict,
          formats: tuple[str, ...], pixel_size: PixelSize | None = None) -> tuple[Item, ImageOutputs | Exception]:
    try:
        segment = _worker_segmenter(model_path, sha256, params, tta, precision)
    except WorkerPrecisionError as exc:
        return item, exc
    return _guarded(item, segment, formats, pixel_size)


# Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, to hand freed memory back to the system
# at once. Setting it also turns off glibc's adaptive mmap threshold, so every array over 128 KiB is
# mapped afresh and page-faulted in: a LIVECell-size image took 250 instead of 185 ms of CPU per task
# and 64 images ran at 6.6 instead of 9.0 images/s on 2 workers (docs/BENCHMARKS.md). Workers of
# a cluster this process starts run without it; the memory of one image at a time stays bounded.
LOCAL_WORKER_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def connect(address: str):
    """(client, cluster or None) for `local`, `local:N` or a scheduler address."""
    import dask
    from distributed import Client, LocalCluster

    if address == "local" or address.startswith("local:"):
        count = address.partition(":")[2]
        workers = int(count) if count else available_cores()
        if workers < 1:
            raise ValueError(f"--dask {address}: the number of workers must be at least 1")
        with dask.config.set(LOCAL_WORKER_ENVIRON):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(address, timeout="20s"), None
    except OSError as exc:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc


def dask_backend(address: str, choice: PrecisionChoice, sha256: str, params: PostprocessParams, tta: bool = False,
                 formats: tuple[str, ...] = DEFAULT_FORMATS, pixel_size: PixelSize | None = None) -> Backend:
    """Each image a task on the cluster; `choice` is the file to run and its precision, chosen where
    the job started (workers re-check an automatic int8 choice on their CPUs)."""
    client, cluster = connect(address)
    model_path, precision = choice.path, choice.to_dict()

    def run(items: list[Item]) -> Iterator[tuple[Item, ImageOutputs | Exception]]:
        from distributed import as_completed

        pending_items = iter(items)
        submitted: dict[str, Item] = {}

        def submit(item: Item):
            future = client.submit(_task, item, str(Path(model_path).resolve()), sha256,
                                   params.to_dict(), tta, precision, formats, pixel_size, pure=False)
            submitted[future.key] = item
            return future

        try:
            limit = max(2, TASKS_PER_THREAD * sum(client.nthreads().values()))
            in_flight = as_completed([submit(item) for item in itertools.islice(pending_items, limit)])
            for future in in_flight:
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001  (e.g. KilledWorker after repeated worker deaths)
                    result = (submitted[future.key], exc)
                del submitted[future.key]
                future.release()
                yield result
                following = next(pending_items, None)
                if following is not None:
                    in_flight.add(submit(following))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    return run
