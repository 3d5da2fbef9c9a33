"""A few real training steps on real crops lower the loss (skipped without the data)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.data


def test_a_few_steps_lower_the_loss(data_root):
    from cellseg.data import load_split
    from train.__main__ import segmentation_loss
    from train.dataset import CropDataset
    from train.model import build_model

    torch.manual_seed(0)
    samples = load_split(data_root, "train")[:3]
    dataset = CropDataset([s.image() for s in samples], [s.labels() for s in samples], crop=128, length=4, seed=0)
    images, targets = map(torch.stack, zip(*[dataset[i] for i in range(4)]))
    assert images.shape == (4, 1, 128, 128) and targets.shape == (4, 3, 128, 128)
    assert set(np.unique(targets[:, 0].numpy())) <= {0.0, 1.0} and targets[:, 0].sum() > 0
    model = build_model("resnet18", None, (32, 32, 16, 16, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = segmentation_loss(model(images), targets, 3.0)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses


def test_augmentation_is_reproducible(data_root):
    from cellseg.data import load_split
    from train.dataset import CropDataset

    s = load_split(data_root, "train")[0]
    a = CropDataset([s.image()], [s.labels()], crop=96, length=2, seed=5)
    b = CropDataset([s.image()], [s.labels()], crop=96, length=2, seed=5)
    for i in range(2):
        torch.testing.assert_close(a[i][0], b[i][0])
        torch.testing.assert_close(a[i][1], b[i][1])


def test_training_checkpoints_and_resumes(data_root, tmp_path):
    from train.__main__ import main

    common = ["--data", str(data_root), "--out", str(tmp_path), "--crop", "64", "--batch-size", "2",
              "--steps-per-epoch", "2", "--warmup-steps", "1", "--decoder-channels", "16,16,8,8,8",
              "--workers", "0", "--device", "cpu"]
    assert main([*common, "--epochs", "2"]) == 0
    first = torch.load(tmp_path / "last.pt", weights_only=False)
    assert first["epoch"] == 1 and len(first["history"]) == 2
    assert (tmp_path / "best.pt").is_file()
    assert first["config"]["val_images"] and "ap50" in first["val_metrics"]
    # A run killed after its first epoch leaves this checkpoint; resuming must run only epoch 2.
    first["epoch"], first["history"] = 0, first["history"][:1]
    torch.save(first, tmp_path / "killed.pt")
    assert main([*common, "--epochs", "2", "--resume", str(tmp_path / "killed.pt")]) == 0
    resumed = torch.load(tmp_path / "last.pt", weights_only=False)
    assert resumed["epoch"] == 1 and [h["epoch"] for h in resumed["history"]] == [1, 2]
