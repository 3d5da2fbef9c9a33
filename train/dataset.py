"""Random native-resolution crops with augmentation; targets are built after augmenting the
label image, so boundaries stay BOUNDARY_WIDTH px wide at every scale."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations calls PyPI on import otherwise

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cellseg.preprocess import normalize  # noqa: E402
from cellseg.targets import make_targets  # noqa: E402


def build_augmentation(crop: int, scale: tuple[float, float] = (0.75, 1.33)) -> A.Compose:
    # Cut a larger window first so rotation/zoom-out rarely reach beyond real pixels. An image smaller
    # than the window (crops of 384 px and more in 520 x 704 images, a lab's small images) is padded
    # as the rotation pads, with background: a mirrored border would copy each cell touching the
    # border into one cell of twice its size (one label on both sides), a target no image shows.
    window = int(crop * 1.5)
    return A.Compose([
        A.PadIfNeeded(window, window, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        A.RandomCrop(window, window),
        A.Affine(scale=scale, rotate=(-30, 30), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.8),
        A.CenterCrop(crop, crop),
        A.HorizontalFlip(),
        A.VerticalFlip(),
        A.RandomRotate90(),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.3, p=0.8),
        A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
        A.GaussianBlur(blur_limit=(3, 5), p=0.15),
    ])


def balanced_weights(groups: list[tuple[str, ...]]) -> np.ndarray:
    """Sampling probabilities that give every top-level group the same share, split equally among
    its subgroups, then equally among its images.

    With groups (source, cell type), the 11 LIVECell training images get half the crops and the
    470 Sartorius ones the other half, and within Sartorius the 57-image SH-SY5Y set counts as much
    as the 309-image cortical-neuron set: no source or cell type is drowned by a bigger one.
    """

    def shares(members: list[int], depth: int) -> dict[int, float]:
        if depth == len(groups[members[0]]):
            return {i: 1.0 / len(members) for i in members}
        by_key: dict[str, list[int]] = {}
        for i in members:
            by_key.setdefault(groups[i][depth], []).append(i)
        out: dict[int, float] = {}
        for sub in by_key.values():
            for i, w in shares(sub, depth + 1).items():
                out[i] = w / len(by_key)
        return out

    if not groups:
        return np.zeros(0)
    weights = shares(list(range(len(groups))), 0)
    return np.array([weights[i] for i in range(len(groups))])


class CropDataset(torch.utils.data.Dataset):
    """`length` random crops over the given (raw image, label image) pairs: images drawn with the
    given probabilities (uniform by default), crops placed uniformly within them."""

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray], crop: int, length: int, seed: int,
                 weights: np.ndarray | None = None):
        self.images = [normalize(im) for im in images]  # whole-image normalisation, as at inference
        self.labels = [lab.astype(np.int32) for lab in labels]
        self.augment = build_augmentation(crop)
        self.length = length
        self.seed = seed
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, index))

    def _pick(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.images), p=self.weights))

    def image_index(self, index: int) -> int:
        """Which image item `index` is cut from (drawn with the sampling weights)."""
        return self._pick(self._rng(index))

    def __getitem__(self, index: int):
        rng = self._rng(index)
        k = self._pick(rng)
        # albumentations draws from its own generator; seeding it per item keeps runs reproducible.
        self.augment.set_random_seed(int(rng.integers(2**31)))
        out = self.augment(image=self.images[k], mask=self.labels[k])
        targets = make_targets(out["mask"])
        return torch.from_numpy(out["image"][None].astype(np.float32)), torch.from_numpy(targets)
