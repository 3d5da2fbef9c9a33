"""Export a training checkpoint to ONNX, check it, evaluate it, document it; register it in BentoML.

    python -m export --checkpoint runs/unet/best.pt --out models/livecell-unet.onnx [--int8]
    python -m export register --model models/livecell-unet.onnx
    python -m export int8 --model models/livecell-unet.onnx --out models/livecell-unet.int8.onnx
    python -m export bioimageio --model models/livecell-unet.onnx --out dist/livecell-unet.bioimageio.zip
    python -m export cell-rules --model models/livecell-unet.onnx
"""

from __future__ import annotations

import sys

from export.onnx_export import main as export_main
from export.register import main as register_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "register":
        return register_main(argv[1:])
    if argv and argv[0] == "int8":
        from export.int8 import main as int8_main

        return int8_main(argv[1:])
    if argv and argv[0] == "cell-rules":
        from export.cell_rules import main as cell_rules_main  # fits with scikit-learn

        return cell_rules_main(argv[1:])
    if argv and argv[0] == "bioimageio":
        from export.bioimageio import main as bioimageio_main  # needs bioimageio.core

        return bioimageio_main(argv[1:])
    if argv and argv[0] == "onnx":
        argv = argv[1:]
    try:
        return export_main(argv)
    except (FileNotFoundError, ValueError) as exc:  # a wrong --checkpoint or --data: one line, not a traceback
        print(f"python -m export: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
