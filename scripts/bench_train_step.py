"""One training step (forward, loss, backward, AdamW) of the shipped architecture on a batch of
8 x 256² crops, in every layout/precision combination, side by side in one process: rounds
alternate the variants so that the machine's drift hits all of them alike; medians are reported.

    python scripts/bench_train_step.py --steps 8 --rounds 3 --json docs/bench_train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from train.loop import freeze_encoder, train_step  # noqa: E402
from train.model import DEFAULT_DECODER_CHANNELS, build_model  # noqa: E402
from train.speed import cpu_has_native_bf16, describe_device, to_layout  # noqa: E402

# name: (channels_last, precision, frozen encoder). The frozen-encoder variants are fine-tuning's
# option (`python -m train finetune --freeze-encoder`): the backward pass stops at the decoder.
VARIANTS = {"fp32, NCHW": (False, "fp32", False), "fp32, channels_last": (True, "fp32", False),
            "bf16, NCHW": (False, "bf16", False), "bf16, channels_last": (True, "bf16", False),
            "fp32, channels_last, frozen encoder": (True, "fp32", True),
            "bf16, channels_last, frozen encoder": (True, "bf16", True)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="timm-tf_efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 1, args.crop, args.crop)
    targets = (torch.rand(args.batch_size, 3, args.crop, args.crop) > 0.5).float()
    setups = {}
    for name, (channels_last, precision, frozen) in VARIANTS.items():
        model = to_layout(build_model(args.encoder, None, DEFAULT_DECODER_CHANNELS), channels_last).train()
        trained = freeze_encoder(model) if frozen else list(model.parameters())
        setups[name] = (model, torch.optim.AdamW(trained, lr=1e-4), to_layout(images, channels_last), precision,
                        channels_last)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}

    def step(name: str) -> None:
        model, optimizer, batch, precision, channels_last = setups[name]
        train_step(model, optimizer, batch, targets, "cpu", precision, channels_last)  # the step training runs

    for name in VARIANTS:  # warm-up: oneDNN picks and caches its kernels on the first calls
        step(name)
        step(name)
    for _ in range(args.rounds):
        for name in VARIANTS:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32, NCHW"])
    report = {"device": describe_device("cpu"), "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
              "batch": f"{args.batch_size}x{args.crop}^2", "encoder": args.encoder, "variants": {}}
    for name, values in times.items():
        median = statistics.median(values)
        report["variants"][name] = {"seconds_per_step": round(median, 3), "steps_per_second": round(1 / median, 3),
                                    "speedup": round(base / median, 2)}
        print(f"{name:36} {median:.3f} s/step  {1 / median:.2f} steps/s  {base / median:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
