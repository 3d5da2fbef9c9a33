"""The seeded watershed, the largest post-processing stage, against other libraries' watersheds on
the same maps, in one run: milliseconds per image and how many pixels differ from skimage's.

    pip install diplib==3.6.1 higra==0.6.13      # optional: a library that is missing is skipped
    python scripts/compare_watersheds.py --images 8 --json docs/watershed_comparison.json

Maps: the served int8 model on LIVECell images, 8-bit as everywhere, the model's own thresholds.
Also measured: whether one image's watershed could be split across the two cores (the share of
the pixels to flood that lie in one connected region), and how much faster two threads run two
independent watersheds than one thread runs them one after the other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.segmentation import watershed  # noqa: E402

from bench_inference import livecell_images, machine_description, timeit, write_report  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.inference import predict_maps  # noqa: E402
from cellseg.onnx_model import OnnxModel  # noqa: E402
from cellseg.postprocess import core_score, seed_cores, seeded_watershed  # noqa: E402


def candidates(probs: np.ndarray, cores: np.ndarray, foreground: np.ndarray) -> dict:
    """name -> function giving a label image, each on the same maps and seeds."""
    codes = np.rint(probs[2] * 255).astype(np.uint16)
    found = {
        "skimage, seed interiors skipped (as used)": lambda: seeded_watershed(-probs[2], cores, foreground),
        "skimage, plain call": lambda: watershed(-probs[2], markers=cores, mask=foreground),
        # background pixels as a marker of their own behind the highest wall, removed afterwards
        "scipy watershed_ift (uint16 heights)": lambda: np.where(foreground, ndi.watershed_ift(
            np.where(foreground, 255 - codes, 256).astype(np.uint16), np.where(foreground, cores, -1)), 0),
        "nearest seed by distance transform (not a watershed)": lambda: np.where(foreground, cores[tuple(
            ndi.distance_transform_edt(cores == 0, return_distances=False, return_indices=True))], 0),
    }
    try:
        import diplib as dip

        found["DIPlib SeededWatershed"] = lambda: np.asarray(dip.SeededWatershed(
            dip.Image((255 - codes).astype(np.uint8)), dip.Image(cores.astype(np.uint32)), dip.Image(foreground),
            1, 0, 0, {"no gaps"}))
    except ImportError:
        pass
    try:
        import higra as hg

        graph = hg.get_4_adjacency_graph(codes.shape)
        heights = np.where(foreground, 255 - codes, 1e9).astype(np.float32)  # background: walls

        def higra_watershed():
            weights = hg.weight_graph(graph, heights, hg.WeightFunction.max)
            return np.where(foreground, hg.labelisation_seeded_watershed(graph, weights, cores), 0)

        found["Higra labelisation_seeded_watershed"] = higra_watershed
    except ImportError:
        pass
    return found


def largest_region_share(cores: np.ndarray, foreground: np.ndarray) -> float:
    """Of the foreground pixels that no seed covers, the share in the largest connected region: what
    a split of one image's watershed into independent parts could at best leave to the busiest part."""
    regions, _ = ndi.label(foreground & (cores == 0))
    sizes = np.bincount(regions.ravel())[1:]
    return float(sizes.max() / sizes.sum()) if sizes.size else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/livecell-unet.int8.onnx"))
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    model = OnnxModel(args.model)
    params = model.default_params
    images = [read_image(path) for path in livecell_images(args.data, args.images)]
    maps = predict_maps(model.predict, images, batch_size=1)
    times: dict[str, list[float]] = {}
    differing: dict[str, list[float]] = {}
    shares, seeds = [], []
    for probs in maps:
        foreground = probs[0] > params.fg_threshold
        cores = seed_cores(core_score(probs, params.seed_sigma), foreground, params)
        seeds.append((cores, foreground))
        shares.append(largest_region_share(cores, foreground))
        reference = watershed(-probs[2], markers=cores, mask=foreground)
        for name, fn in candidates(probs, cores, foreground).items():
            labels = fn()
            times.setdefault(name, []).append(timeit(fn, args.repeats)["p50_ms"])
            differing.setdefault(name, []).append(float(np.mean(labels != reference)))

    def all_watersheds():
        for probs, (cores, foreground) in zip(maps, seeds):
            watershed(-probs[2], markers=cores, mask=foreground)

    def all_watersheds_two_threads():
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: watershed(-maps[i][2], markers=seeds[i][0], mask=seeds[i][1]), range(len(maps))))

    one_thread = timeit(all_watersheds, args.repeats)["p50_ms"]
    two_threads = timeit(all_watersheds_two_threads, args.repeats)["p50_ms"]
    report = {
        "machine": machine_description(), "model": str(args.model), "images": len(maps), "repeats": args.repeats,
        "ms_per_image": {name: round(statistics.mean(v), 1) for name, v in times.items()},
        "pixels_differing_from_skimage": {name: [round(min(v), 4), round(max(v), 4)] for name, v in differing.items()},
        "largest_flood_region_share": [round(s, 2) for s in shares],
        "two_threads_speedup_on_independent_images": round(one_thread / two_threads, 2),
    }
    for key in ("ms_per_image", "pixels_differing_from_skimage", "largest_flood_region_share",
                "two_threads_speedup_on_independent_images"):
        print(key, report[key])
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
