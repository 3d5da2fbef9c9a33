"""Reading the Kaggle-Sartorius annotations: every cell's COCO RLE (`Sample.rles`) and every image's
label map (`Sample.labels`), as training, evaluation and the few-shot runs read them. With
`--against REV` the same is timed with that revision's code (a temporary `git worktree`), in a
subprocess, alternating with this tree's; both must give the same label maps (a digest of every
tenth image's, compared across all runs: the script fails otherwise).

    python scripts/bench_data.py --against 0cd1400 --json docs/bench_data.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run by this script in a subprocess: `python -c TIMING root data` prints {"rles_s", "labels_s", ...}.
TIMING = """
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from cellseg.data import read_kaggle
samples = read_kaggle(Path(sys.argv[2]) / "sartorius")
start = time.perf_counter()
cells = sum(len(s.rles) for s in samples)
rles_s = time.perf_counter() - start
start = time.perf_counter()
digest = hashlib.sha256()
for s in samples[::10]:
    digest.update(s.labels().tobytes())
spread_s = time.perf_counter() - start
for s in samples:
    s.labels()
labels_s = time.perf_counter() - start
print(json.dumps({"images": len(samples), "cells": cells, "rles_s": round(rles_s, 2),
                  "labels_s": round(labels_s, 2), "labels_digest": digest.hexdigest()}))
"""


def time_tree(root: Path, data: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", TIMING, str(root), str(data)], capture_output=True, text=True,
                         check=True, cwd=root)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from cellseg.cpu import describe_cpu
    from cellseg.data import default_data_root

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", help="a git revision whose data-reading code to time beside this tree's")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--repeats", type=int, default=2, help="runs of each tree, alternating")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (args.data / "sartorius" / "train.csv").is_file():
        print(f"no Kaggle-Sartorius data under {args.data}", file=sys.stderr)
        return 2
    trees = {"this tree": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            worktree = Path(tmp) / "then"
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.against], cwd=ROOT, check=True,
                           capture_output=True)
            trees[args.against] = worktree
        try:
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for _ in range(args.repeats):
                for name, root in trees.items():
                    runs[name].append(time_tree(root, args.data))
                    print(name, runs[name][-1], flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees[args.against])], cwd=ROOT)
    digests = {r["labels_digest"] for results in runs.values() for r in results}
    if len(digests) != 1:
        print("the trees give different label maps", file=sys.stderr)
        return 1
    best = {name: {k: min(r[k] for r in results) for k in ("rles_s", "labels_s")} | {
        "images": results[0]["images"], "cells": results[0]["cells"]} for name, results in runs.items()}
    result = {"cpu": describe_cpu(), "command": " ".join(["python", *sys.argv]), "best_of": args.repeats,
              "same_labels": True, "trees": best}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
