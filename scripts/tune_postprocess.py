"""Pick post-processing defaults (fg_threshold, seed_threshold, seed_sigma, min_seed_size, min_size)
on the TRAINING split, so validation numbers stay honest. The network runs once per image; only the
watershed is redone.

    python scripts/tune_postprocess.py --model models/livecell-unet.onnx --split train --per-type 8

`--per-type N` tunes on at most N images of each cell type (drawn with a fixed seed), so the 299
cortical-neuron images do not outvote the 11 LIVECell ones and the grid stays affordable. The
objective is `cellseg.evaluate.selection_score`: the mean over sources of (AP50 + mSA) / 2. Prints
the best settings and the per-type figures of the winner; pass them to
`python -m export --fg-threshold .. --seed-threshold .. --seed-sigma .. --min-seed-size .. --min-size ..
--merge-threshold ..`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from cellseg.data import default_data_root, load_split, subsample_per_type  # noqa: E402
from cellseg.evaluate import evaluate_segmentations, format_table  # noqa: E402
from cellseg.inference import Segmentation, predict_maps  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402
from cellseg.postprocess import PostprocessParams  # noqa: E402
from cellseg.tuning import params_grid, rank_params  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--split", default="train")
    p.add_argument("--fg", default="0.4,0.5,0.6")
    p.add_argument("--seed", default="0.3,0.4,0.5,0.6")
    p.add_argument("--sigma", default="0,1,2", help="seed_sigma values")
    p.add_argument("--min-seed", default="3,10,25", help="min_seed_size values")
    p.add_argument("--min-size", default="20")
    p.add_argument("--merge", default="0", help="merge_threshold values (0 = no merging)")
    p.add_argument("--peak", default="0", help="seed_peak values (0 = off)")
    p.add_argument("--per-type", type=int, default=None, help="at most this many images per cell type")
    p.add_argument("--tta", action="store_true", help="tune on test-time-augmented maps")
    p.add_argument("--min-type-msa", type=float, default=0.0,
                   help="prefer settings where every cell type reaches this mSA (issue 16: 0.10); the best "
                        "score among them wins, the best overall where none does")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    model = OnnxModel(args.model)
    samples = load_split(args.data, args.split)
    if args.per_type:
        samples = subsample_per_type(samples, args.per_type)
    print(f"tuning on {len(samples)} images of split {args.split!r}")
    maps = [predict_maps(model.predict, [s.image()], tta=args.tta)[0] for s in tqdm(samples, desc="network")]
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    grid = params_grid(PostprocessParams(), fg_threshold=floats(args.fg), seed_threshold=floats(args.seed),
                       seed_sigma=floats(args.sigma), min_seed_size=ints(args.min_seed), min_size=ints(args.min_size),
                       merge_threshold=floats(args.merge), seed_peak=floats(args.peak))
    results = rank_params(samples, maps, grid, args.min_type_msa)
    rows = [row for _, row in results]
    print(f"{'fg':>5} {'seed':>5} {'sigma':>5} {'mseed':>5} {'min':>4} {'merge':>5} {'peak':>5} {'score':>7}  "
          "per source AP50/mSA, lowest type mSA")
    for r in rows[:15]:
        per_source = "  ".join(f"{k.removesuffix('_ap50')} {r[k]:.3f}/{r[k.replace('_ap50', '_msa')]:.3f}"
                               for k in r if k.endswith("_ap50"))
        lowest = min((k for k in r if k.startswith("type_")), key=r.get)  # noqa: B023
        print(f"{r['fg_threshold']:>5} {r['seed_threshold']:>5} {r['seed_sigma']:>5} {r['min_seed_size']:>5} "
              f"{r['min_size']:>4} {r['merge_threshold']:>5} {r['seed_peak']:>5} {r['score']:>7}  {per_source}  "
              f"{lowest.removeprefix('type_').removesuffix('_msa')} {r[lowest]:.3f}")
    best = results[0][0]
    print(format_table(evaluate_segmentations(samples, [Segmentation.from_maps(m, best) for m in maps])))
    print("best:", json.dumps(rows[0]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
