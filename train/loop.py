"""What every training run shares: the loss, one optimiser step, the learning-rate schedule, the
checkpoint save and the network as a predictor for evaluation (`python -m train` and
`python -m train finetune`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.speed import autocast, to_layout

# Boundaries are a thin minority class: their positive pixels weigh this much more in the BCE.
BOUNDARY_POS_WEIGHT = 3.0


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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
               device: str, precision: str, channels_last: bool, boundary_pos_weight: float = BOUNDARY_POS_WEIGHT) -> dict:
    """One optimiser step on a batch: moved to `device` (channels_last where asked), forward under
    `precision`'s autocast, the loss in fp32, backward, step. Returns the losses (tensors); the
    learning rate is the caller's to set or schedule."""
    images = to_layout(images.to(device, non_blocking=True), channels_last)
    targets = targets.to(device, non_blocking=True)
    with autocast(device, precision):
        logits = model(images)
    # The loss in fp32: sigmoid/BCE/Dice sums lose too much in bf16.
    losses = segmentation_loss(logits.float(), targets, boundary_pos_weight)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return losses


def freeze_encoder(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Keep the encoder's weights and batch-norm statistics as they are (call after `model.train()`,
    which would switch its batch norms back to learning): only the decoder and head learn, the
    backward pass stops at the decoder. Returns the parameters left to train, for the optimiser."""
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    model.encoder.eval()
    return [p for p in model.parameters() if p.requires_grad]


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """torch.save to `path`.tmp, then renamed over `path`: a kill never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise


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


