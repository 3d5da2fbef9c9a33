"""Fitting a lab's cell rules on its annotated training images: which touching cells are one
(cellseg.cell_merge) and which cut cells its annotators would draw at all (cellseg.cell_filter).

Each rule is a logistic regression (scikit-learn) on examples cut from the training images' maps:
touching pairs labelled by whether both pieces lie mostly in the same annotated cell; cells labelled
by whether they match an annotated cell (IoU >= 0.5). The cutoff is picked by leave-one-image-out:
each image is cut with a rule fitted on the other images, so the cutoff is chosen on images the rule
never saw. The figures returned say what the rule is worth there against the rule there is (a
base's own, or none) and, where the base carries one, what dropping it is worth; `python -m train
finetune` changes the rule there is only where another candidate beats it and the held-back images
confirm it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from cellseg.cell_filter import CellFilter, LogisticRule, cell_features
from cellseg.cell_merge import CellMerge, merge_pairs, pair_features
from cellseg.data import Sample
from cellseg.matching import iou_matrix, mean_score_accuracy
from cellseg.postprocess import PostprocessParams, maps_to_labels

FILTER_CUTOFFS = (0.1, 0.2, 0.3, 0.4, 0.5)  # P(annotated) under which a cell is dropped
MERGE_CUTOFFS = (0.1, 0.2, 0.3, 0.4, 0.5)  # P(one cell) at and above which touching cells merge
REGULARISATION = 0.3  # sklearn's C: a few hundred examples, about a dozen features; stronger than its 1.0
MIN_EXAMPLES_PER_CLASS = 5  # fewer yes (or no) examples than this teach nothing


@dataclass
class Examples:
    """One training image's examples for a rule: features, yes/no, and how to score a decision."""

    features: np.ndarray
    truth: np.ndarray
    score: Callable[[np.ndarray], float]  # mSA of the image with the rule's decision (bool per example)


@dataclass
class RuleFit:
    rule: LogisticRule | None  # None: too few examples of either kind to fit one
    msa_without: float  # mean mSA on the training images with the rule there is (the base's, or none)
    msa_cross_validated: dict[float, float]  # cutoff -> mean mSA, each image cut by the others' fit
    reason: str = ""
    msa_no_rule: float | None = None  # where the base carries a rule of this kind: mean mSA without it

    @property
    def gain(self) -> float:
        return max(self.msa_cross_validated.values(), default=self.msa_without) - self.msa_without

    @property
    def gain_without_base(self) -> float | None:
        """What dropping the base's rule gains on the training images (None: the base has none). No
        fitting involved: the base's rule never saw these images, so the figure is not in-sample."""
        return None if self.msa_no_rule is None else self.msa_no_rule - self.msa_without

    def to_dict(self) -> dict:
        return {"msa_without": round(self.msa_without, 4), "gain": round(self.gain, 4), "fit_reason": self.reason,
                "msa_cross_validated": {str(k): round(v, 4) for k, v in self.msa_cross_validated.items()},
                "cutoff": self.rule.cutoff if self.rule else None,
                **({} if self.msa_no_rule is None else {"msa_no_rule": round(self.msa_no_rule, 4)})}


def mean_msa(samples: Sequence[Sample], maps: Sequence[np.ndarray], params: PostprocessParams) -> float:
    """Mean over images of mSA (cellseg.evaluate's figure) of the cells `params` cut, rules included."""
    return float(np.mean([mean_score_accuracy(s.labels(), maps_to_labels(m, params)) for s, m in zip(samples, maps)]))


def fit_logistic(kind: type[LogisticRule], features: np.ndarray, truth: np.ndarray, cutoff: float) -> LogisticRule:
    from sklearn.linear_model import LogisticRegression

    mean, scale = features.mean(axis=0), features.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature (no cell on the border) weighs nothing
    model = LogisticRegression(C=REGULARISATION, max_iter=2000).fit((features - mean) / scale, truth)
    return kind(tuple(mean.tolist()), tuple(scale.tolist()), tuple(model.coef_[0].tolist()),
                float(model.intercept_[0]), cutoff)


def fit_rule(kind: type[LogisticRule], examples: list[Examples], without: float, cutoffs: Sequence[float],
             decide: Callable[[np.ndarray, float], np.ndarray], no_rule: float | None = None) -> RuleFit:
    """`decide(probabilities, cutoff)`: the rule's decision per example (drop / merge). `without`: the
    figure with the base's rule (or none); `no_rule`: the figure with none where the base has one."""
    truth = np.concatenate([e.truth for e in examples]) if examples else np.zeros(0, bool)
    kinds = (int(truth.sum()), int((~truth).sum()))
    if len(examples) < 2 or min(kinds) < MIN_EXAMPLES_PER_CLASS:
        return RuleFit(None, without, {}, f"too few examples to learn from ({kinds[0]} yes, {kinds[1]} no, in "
                                          f"{len(examples)} image(s))", no_rule)
    scores = {cutoff: [] for cutoff in cutoffs}
    for i, held in enumerate(examples):
        rest = [e for j, e in enumerate(examples) if j != i]
        rest_truth = np.concatenate([e.truth for e in rest])
        if len(held.truth) == 0 or rest_truth.all() or not rest_truth.any():
            for cutoff in cutoffs:  # nothing to fit or decide here: the image scores as it is
                scores[cutoff].append(held.score(np.zeros(len(held.truth), bool)))
            continue
        fitted = fit_logistic(kind, np.concatenate([e.features for e in rest]), rest_truth, 0.0)
        probabilities = fitted.predict(held.features)
        for cutoff in cutoffs:
            scores[cutoff].append(held.score(decide(probabilities, cutoff)))
    cross_validated = {cutoff: float(np.mean(v)) for cutoff, v in scores.items()}
    best = max(cross_validated, key=cross_validated.get)
    return RuleFit(fit_logistic(kind, np.concatenate([e.features for e in examples]), truth, best), without,
                   cross_validated, msa_no_rule=no_rule)


def fit_cell_merge(samples: Sequence[Sample], maps: Sequence[np.ndarray], params: PostprocessParams,
                   cutoffs: Sequence[float] = MERGE_CUTOFFS) -> RuleFit:
    """A merge rule for touching cells, fitted on every training image, its cutoff the best by
    leave-one-image-out mSA. Examples are cut with `params` without any merge or filter; the figure
    to beat (`msa_without`) is `params`' own merge, if it has one (a base that carries rules)."""
    base_rule = params.cell_merge
    params = params.without_rules()
    examples, with_current, no_rule = [], [], []
    for sample, probs in zip(samples, maps):
        gt, labels = sample.labels(), maps_to_labels(probs, params)
        first, second, features = pair_features(labels, probs)
        no_rule.append(mean_score_accuracy(gt, labels))
        # the base's merge on the cells already cut: what maps_to_labels would give, without cutting them again
        with_current.append(mean_score_accuracy(gt, base_rule.apply(labels, probs)) if base_rule else no_rule[-1])
        examples.append(Examples(features, one_annotated_cell(gt, labels, first, second),
                                 lambda merge, gt=gt, labels=labels, a=first, b=second:
                                 mean_score_accuracy(gt, merge_pairs(labels, a, b, merge))))
    return fit_rule(CellMerge, examples, float(np.mean(with_current)), cutoffs, lambda p, cutoff: p >= cutoff,
                    float(np.mean(no_rule)) if base_rule else None)


def fit_cell_filter(samples: Sequence[Sample], maps: Sequence[np.ndarray], params: PostprocessParams,
                    cutoffs: Sequence[float] = FILTER_CUTOFFS, kind: type[LogisticRule] = CellFilter,
                    featurize: Callable[[Sample, np.ndarray, np.ndarray], np.ndarray] | None = None) -> RuleFit:
    """A cell filter fitted on every training image, its cutoff the best by leave-one-image-out mSA.
    Cut with `params` (its merge rule included) without a filter; the figure to beat is `params`' own
    filter, if it has one. `kind` and `featurize(sample, labels, maps)`: another filter's features
    (scripts/finetune_probes.py tries the image's own pixels); by default CellFilter's."""
    base_rule = params.cell_filter
    params = replace(params, cell_filter=None)  # the cells the filter will be shown
    examples, with_current, no_rule = [], [], []
    for sample, probs in zip(samples, maps):
        gt, labels = sample.labels(), maps_to_labels(probs, params)
        iou = iou_matrix(gt, labels)
        matched = iou.max(axis=0) >= 0.5 if iou.size else np.zeros(int(labels.max()), bool)
        no_rule.append(mean_score_accuracy(gt, labels))
        with_current.append(mean_score_accuracy(gt, base_rule.apply(labels, probs)) if base_rule else no_rule[-1])
        features = featurize(sample, labels, probs) if featurize else cell_features(labels, probs)
        examples.append(Examples(features, matched,
                                 lambda drop, gt=gt, labels=labels: mean_score_accuracy(gt, without_cells(labels, drop))))
    return fit_rule(kind, examples, float(np.mean(with_current)), cutoffs, lambda p, cutoff: p < cutoff,
                    float(np.mean(no_rule)) if base_rule else None)


def without_cells(labels: np.ndarray, drop: np.ndarray) -> np.ndarray:
    lut = np.zeros(len(drop) + 1, dtype=labels.dtype)
    keep = ~drop
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels]


def one_annotated_cell(gt: np.ndarray, labels: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per touching pair: whether both cells lie mostly (over half their pixels) in the same annotated cell."""
    n, g = int(labels.max()), int(gt.max())
    overlap = np.bincount((gt.astype(np.int64) * (n + 1) + labels).ravel(), minlength=(g + 1) * (n + 1))
    overlap = overlap.reshape(g + 1, n + 1)
    if g == 0:
        return np.zeros(len(first), bool)
    owner = overlap[1:].argmax(axis=0) + 1
    owner[overlap[1:].max(axis=0) * 2 <= np.maximum(overlap.sum(axis=0), 1)] = -1  # not mostly in one cell
    owner[0] = -1
    return (owner[first] == owner[second]) & (owner[first] > 0)
