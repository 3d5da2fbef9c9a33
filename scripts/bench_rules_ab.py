"""The cell rules' cost end to end, this working tree's code against an earlier revision's, side by
side in one process: the served path (`segment_images`, network included) on one 704 x 520 LIVECell
image, interleaved run by run (old rules, new rules, no rules) so that the machine's drift over
minutes falls on all three alike; median of `--repeats`. The earlier revision's `cellseg/cell_filter.py`
and `cellseg/cell_merge.py` are read with `git show` into a temporary package; both must cut the same
cells (checked before timing).

    python scripts/bench_rules_ab.py --against cf650d7 --json docs/bench_rules_ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402

from bench_inference import livecell_images  # noqa: E402
from cellseg.cpu import describe_cpu  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.inference import segment_images  # noqa: E402
from cellseg.onnx_model import OnnxModel  # noqa: E402


def rules_at(revision: str, folder: Path):
    """(CellMerge, CellFilter) classes of `revision`, imported from a copy under `folder`."""
    package = folder / "rules_then"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("cell_filter", "cell_merge"):
        text = subprocess.run(["git", "show", f"{revision}:cellseg/{name}.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (package / f"{name}.py").write_text(text.replace("from cellseg.cell_filter", "from rules_then.cell_filter"))
    sys.path.insert(0, str(folder))
    from rules_then.cell_filter import CellFilter
    from rules_then.cell_merge import CellMerge
    return CellMerge, CellFilter


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="the git revision whose rule code to compare with")
    p.add_argument("--model", type=Path, default=ROOT / "models/livecell-unet.onnx", help="carries the rules")
    p.add_argument("--int8", type=Path, default=ROOT / "models/livecell-unet.int8.onnx", help="the served network")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    params = OnnxModel(args.model).default_params
    if params.cell_merge is None or params.cell_filter is None:
        raise SystemExit(f"{args.model} does not carry both cell rules")
    network = OnnxModel(args.int8)
    image = read_image(livecell_images(args.data, 1)[0])
    with tempfile.TemporaryDirectory() as folder:
        merge_then, filter_then = rules_at(args.against, Path(folder))
        variants = {"rules then": replace(params, cell_merge=merge_then(**params.cell_merge.to_dict()),
                                          cell_filter=filter_then(**params.cell_filter.to_dict())),
                    "rules now": params, "no rules": params.without_rules()}
        cut = {name: segment_images(network.predict, [image], v)[0].labels for name, v in variants.items()}
        if not np.array_equal(cut["rules then"], cut["rules now"]):
            raise SystemExit(f"the rules of {args.against} and of this tree cut different cells: not comparable")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, v in variants.items():
                started = time.perf_counter()
                segment_images(network.predict, [image], v)
                times[name].append(time.perf_counter() - started)
    p50 = {name: round(1000 * statistics.median(t), 1) for name, t in times.items()}
    served = args.int8.resolve()
    result = {"cpu": describe_cpu(), "against": args.against, "image": "704x520 LIVECell",
              "network": str(served.relative_to(ROOT) if served.is_relative_to(ROOT) else served),
              "command": "python " + " ".join(sys.argv), "end_to_end_p50_ms": p50,
              "rules_cost_ms": {"then": round(p50["rules then"] - p50["no rules"], 1),
                                "now": round(p50["rules now"] - p50["no rules"], 1)}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
