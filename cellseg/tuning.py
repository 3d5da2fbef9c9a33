"""Choosing post-processing settings on annotated images: the network runs once per image, only the
watershed is redone for each candidate. Used by scripts/tune_postprocess.py (the shipped defaults) and
by `python -m train finetune` (a lab's own cells). Always on training images, never on the images a
result is reported on.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from cellseg.data import Sample
from cellseg.evaluate import evaluate_segmentations, selection_score
from cellseg.inference import Segmentation
from cellseg.postprocess import PostprocessParams


def params_grid(base: PostprocessParams, **values: Iterable) -> list[PostprocessParams]:
    """Every combination of the given values (field name -> candidates) on top of `base`."""
    names = list(values)
    return [base.with_overrides(**dict(zip(names, combo)))  # with_overrides validates
            for combo in itertools.product(*(list(values[n]) for n in names))]


def score_params(samples: Sequence[Sample], maps: Sequence[np.ndarray], params: PostprocessParams) -> dict:
    """One row: the settings, the selection score (mean over sources of (AP50 + mSA) / 2) and the
    per-source and per-cell-type figures."""
    segs = [Segmentation.from_maps(m, params) for m in maps]
    r = evaluate_segmentations(samples, segs, groups=("per_source", "per_cell_type"), overall=False)
    return {**params.to_dict(), "score": round(selection_score(r), 4),
            **{f"{source}_{k}": round(m[k], 4) for source, m in r["per_source"].items()
               for k in ("foreground_iou", "ap50", "msa")},
            **{f"type_{name}_msa": round(m["msa"], 4) for name, m in r["per_cell_type"].items()}}


def lowest_type_msa(row: dict) -> float:
    return min(v for k, v in row.items() if k.startswith("type_"))


def rank_params(samples: Sequence[Sample], maps: Sequence[np.ndarray], grid: Sequence[PostprocessParams],
                min_type_msa: float = 0.0, progress: bool = True,
                seconds: float | None = None) -> list[tuple[PostprocessParams, dict]]:
    """Every candidate tried with its row, best first: settings where every cell type reaches
    `min_type_msa` come first, then by score. With `seconds`, no candidate is started once that much
    time has gone (the first is always tried): a budget holds even where its estimate of a candidate's
    cost was low."""
    started = time.monotonic()
    rows = []
    for params in tqdm(grid, desc="post-processing grid", disable=not progress):
        if rows and seconds is not None and time.monotonic() - started >= seconds:
            break
        rows.append((params, score_params(samples, maps, params)))
    rows.sort(key=lambda pair: (lowest_type_msa(pair[1]) < min_type_msa, -pair[1]["score"]))
    return rows
