"""Is a fine-tuned model better than its base? One clear answer from the held-back images, with its
uncertainty, so that no run hands back a worse model unannounced (issue 29).

The per-image mSA differences (after - before, the same images) are resampled (paired bootstrap) for
a 90% interval of their mean: better where the whole interval is above 0, not better where it is
below 0, can't tell otherwise, or with fewer than MIN_IMAGES held-back images (two images cannot tell
better from worse: issue 29 saw them disagree with ten unseen ones), or none (a run of fewer than
three images measures on its own training images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MIN_IMAGES = 3
RESAMPLES = 2000
LEVEL = 0.90
EXIT_NOT_BETTER = 5  # the run's exit status where the fine-tuned model is not better (0 otherwise)
BETTER, NOT_BETTER, CANT_TELL = "better", "not better", "can't tell"


@dataclass(frozen=True)
class Verdict:
    outcome: str  # better | not better | can't tell
    reason: str
    images: int  # held-back images measured
    msa_before: float
    msa_after: float
    low: float  # LEVEL interval of the mean per-image mSA difference
    high: float
    held_back: bool = True  # False: measured on the training images (fewer than 3 images)

    @property
    def exit_status(self) -> int:
        return EXIT_NOT_BETTER if self.outcome == NOT_BETTER else 0

    def line(self) -> str:
        interval = f", {LEVEL:.0%} interval of the per-image difference {self.low:+.3f}..{self.high:+.3f}" \
            if self.images >= MIN_IMAGES else ""
        kind = "held-back" if self.held_back else "training"
        return (f"VERDICT: {self.outcome.upper()}: mSA {self.msa_before:.3f} -> {self.msa_after:.3f} on "
                f"{self.images} {kind} image{'s' if self.images != 1 else ''}{interval}; {self.reason}")

    def to_dict(self) -> dict:
        return {**asdict(self), "line": self.line(), "exit_status": self.exit_status}


# A BETTER measured on images held back from the training folders speaks for those plates and days:
# a 100-image astrocyte run was BETTER on its 20 held-back images (mSA 0.121 -> 0.134) while 10 images
# of other plates did not move (0.093 -> 0.094; docs/METRICS.md, issue 29).
SAME_SOURCE = "on images like these (held back from the training folders); for other plates or days, measure on " \
              "them with --measure-on"


def judge(before: list[dict], after: list[dict], held_back: bool, steps: int | None, seed: int = 0, note: str = "",
          same_source: bool = False) -> Verdict:
    """The verdict from `evaluate_segmentations`' per-image rows of the base (`before`) and the
    fine-tuned model (`after`) on the same images; `steps` made, to say when training barely ran (None:
    none was asked, `--no-train`),
    `note`, what else the reader must know (the machine was shared while it trained), and
    `same_source`: the images were held back from the training folders (not given by --measure-on)."""
    after_by_id = {row["id"]: row["msa"] for row in after}
    differences = np.array([after_by_id[row["id"]] - row["msa"] for row in before])
    # rounded as metrics.json and the model card's table round them, so the line's 3 digits agree with theirs
    msa_before = round(float(np.mean([row["msa"] for row in before])), 4) if before else 0.0
    msa_after = round(float(np.mean(list(after_by_id.values()))), 4) if after else 0.0
    few_steps = (f" (only {steps} training step{'s' if steps != 1 else ''} {'were' if steps != 1 else 'was'} made: "
                 "too few to learn much; give more --minutes)"
                 if steps is not None and steps < 100 else "")
    if note:
        few_steps += f" ({note})"
    if not held_back:
        return Verdict(CANT_TELL, "no image was held back (fewer than 3 annotated images): these figures come from "
                       f"the training images themselves; annotate more images to know{few_steps}", len(before),
                       msa_before, msa_after, 0.0, 0.0, held_back=False)
    if len(differences) < MIN_IMAGES:
        lower = "lower on them, but " if msa_after < msa_before else ""
        images = f"{len(differences)} held-back image{' is' if len(differences) == 1 else 's are'}"
        return Verdict(CANT_TELL, f"{lower}{images} too few to tell better from worse; hold "
                       f"back at least {MIN_IMAGES} (--hold-out){few_steps}", len(differences), msa_before, msa_after,
                       0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(RESAMPLES, len(differences)))].mean(axis=1)
    low, high = (float(v) for v in np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]))
    if low > 0:
        outcome, reason = BETTER, f"use it {SAME_SOURCE}" if same_source else "use it"
    elif high < 0:
        outcome, reason = NOT_BETTER, "keep the base model; `export register` refuses this one without --force"
    else:
        outcome, reason = CANT_TELL, "the difference is within what these images vary by"
    return Verdict(outcome, reason + few_steps, len(differences), msa_before, msa_after, low, high)
