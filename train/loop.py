"""What every training run shares: the loss, the learning-rate schedule and the network as a
predictor for evaluation (`python -m train` and `python -m train finetune`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from train.speed import autocast


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2))
    return 1 - ((2 * inter + 1) / (prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1)).mean()


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, boundary_pos_weight: float) -> dict:
    fg, bd, dist = logits[:, 0], logits[:, 1], logits[:, 2]
    pos_weight = torch.tensor(boundary_pos_weight, device=logits.device)
    parts = {
        "fg": F.binary_cross_entropy_with_logits(fg, targets[:, 0]) + soft_dice_loss(fg, targets[:, 0]),
        # Boundaries are a thin minority class: up-weighted so they come out sharp, not blurry.
        "boundary": F.binary_cross_entropy_with_logits(bd, targets[:, 1], pos_weight=pos_weight)
        + soft_dice_loss(bd, targets[:, 1]),
        # BCE against soft targets is minimised at the target value: a bounded regression.
        "distance": F.binary_cross_entropy_with_logits(dist, targets[:, 2]),
    }
    parts["total"] = sum(parts.values())
    return parts


def lr_factor(step: int, total: int, warmup: int, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 1% over the steps (or over `progress` in 0..1 when given:
    the share of a time budget spent)."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def torch_predictor(model: torch.nn.Module, device: str, precision: str = "fp32"):
    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        with autocast(device, precision):
            logits = model(torch.from_numpy(batch).to(device))
        return torch.sigmoid(logits.float()).cpu().numpy()
    return predict


