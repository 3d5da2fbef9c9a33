"""A few real training steps on real crops lower the loss (skipped without the data)."""

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.data


def test_a_few_steps_lower_the_loss(data_root):
    from cellseg.data import load_split
    from train.dataset import CropDataset
    from train.loop import segmentation_loss
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
              "--workers", "0", "--device", "cpu", "--max-images", "4"]
    assert main([*common, "--epochs", "2"]) == 0
    first = torch.load(tmp_path / "last.pt", weights_only=False)
    assert first["epoch"] == 1 and len(first["history"]) == 2
    assert (tmp_path / "best.pt").is_file()
    assert first["config"]["val_images"] and "ap50" in first["val_metrics"]
    # validation is reported per source and per cell type every epoch
    record = first["history"][-1]
    assert set(record["val_per_source"]) == {"livecell"} and "msa" in record["val_per_cell_type"]["BT474"]
    assert first["config"]["balance"] == "source-type" and first["config"]["encoder_weights_source"] is None
    # A run killed after its first epoch leaves this checkpoint; resuming must run only epoch 2.
    first["epoch"], first["history"] = 0, first["history"][:1]
    torch.save(first, tmp_path / "killed.pt")
    assert main([*common, "--epochs", "2", "--resume", str(tmp_path / "killed.pt")]) == 0
    resumed = torch.load(tmp_path / "last.pt", weights_only=False)
    assert resumed["epoch"] == 1 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    # A user's trial: resumed without repeating --max-images, it trained and validated on all 467/36
    # images while its checkpoint named 4 and 4 ("its config wins", the help says). Now it does.
    import train.__main__ as train_main

    seen = []
    real_validate = train_main.validate
    train_main.validate = lambda model, samples, *a: seen.append([s.id for s in samples]) or real_validate(model, samples, *a)
    try:
        assert main(["--data", str(data_root), "--out", str(tmp_path), "--workers", "0", "--device", "cpu",
                     "--resume", str(tmp_path / "killed.pt")]) == 0
    finally:
        train_main.validate = real_validate
    assert seen == [first["config"]["val_images"]]
    # a new run into a folder holding one is refused, not mixed into its history
    assert main([*common, "--epochs", "1"]) == 2
    assert len(torch.load(tmp_path / "last.pt", weights_only=False)["history"]) == 2


def test_a_reseeded_dataset_draws_the_crops_of_a_new_one():
    """Fine-tuning builds its CropDataset once and sets the seed per round of crops: each round draws
    exactly what a dataset built with that seed would."""
    from train.dataset import CropDataset

    images = [np.random.default_rng(i).random((80, 80)).astype(np.float32) for i in range(3)]
    labels = [np.kron(np.arange(16, dtype=np.int32).reshape(4, 4), np.ones((20, 20), np.int32))] * 3

    def crops(dataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=0, drop_last=True)
        return [pair for batch in loader for pair in zip(*batch)]

    reused = CropDataset(images, labels, crop=32, length=4, seed=1)
    crops(reused)  # a first round
    reused.seed = 7
    for (image, targets), (new_image, new_targets) in zip(crops(reused), crops(CropDataset(images, labels, 32, 4, seed=7)),
                                                          strict=True):
        torch.testing.assert_close(image, new_image, rtol=0, atol=0)
        torch.testing.assert_close(targets, new_targets, rtol=0, atol=0)


@pytest.mark.parametrize("crop", [256, 512])
def test_crops_never_copy_a_cell_across_the_image_border(crop):
    """Crops of 512 px come from windows of 768 px, larger than a 520 x 704 image: the padding around
    it is background, so a cell touching the border keeps its own pixels (a mirrored pad made it a
    cell of twice its area, one label on both sides of the border)."""
    from train.dataset import build_augmentation

    image = np.random.default_rng(0).random((520, 704)).astype(np.float32)
    labels = np.zeros((520, 704), np.int32)
    labels[0:10, 100:120] = 1  # touches the top border
    labels[200:230, 300:330] = 2
    padded = build_augmentation(crop).transforms[0](image=image, mask=labels)["mask"]
    assert padded.shape == (max(520, int(crop * 1.5)), max(704, int(crop * 1.5)))
    assert (padded == 1).sum() == 200 and (padded == 2).sum() == 900


def test_balanced_sampling_shares():
    from train.dataset import balanced_weights

    groups = [("livecell", "A")] * 2 + [("livecell", "B")] + [("sartorius", "cort")] * 6 + [("sartorius", "astro")] * 2
    w = balanced_weights(groups)
    assert w.sum() == pytest.approx(1.0)
    assert w[:3].sum() == pytest.approx(0.5) and w[3:].sum() == pytest.approx(0.5)  # sources equal
    assert w[2] == pytest.approx(0.25) and w[0] == pytest.approx(0.125)  # types equal within a source
    assert w[3:9].sum() == pytest.approx(w[9:].sum())  # 6 cort images weigh as much as 2 astro ones


def test_crops_follow_the_sampling_weights():
    from train.dataset import CropDataset

    images = [np.random.default_rng(i).random((80, 80)).astype(np.float32) for i in range(3)]
    labels = [np.zeros((80, 80), np.int32)] * 3
    dataset = CropDataset(images, labels, crop=32, length=3000, seed=1, weights=np.array([0.0, 1.0, 3.0]))
    counts = np.bincount([dataset.image_index(i) for i in range(3000)], minlength=3)
    assert counts[0] == 0 and 0.2 < counts[1] / 3000 < 0.3 and 0.7 < counts[2] / 3000 < 0.8
    uniform = CropDataset(images, labels, crop=32, length=3000, seed=1)
    counts = np.bincount([uniform.image_index(i) for i in range(3000)], minlength=3)
    assert counts.min() > 900


def test_precision_follows_the_cpu():
    from train.speed import choose_precision, cpu_has_native_bf16

    assert cpu_has_native_bf16({"avx2", "avx512f", "avx512_bf16"})
    assert cpu_has_native_bf16({"avx2", "amx_bf16"})
    assert not cpu_has_native_bf16({"avx2", "avx512f"})  # bf16 emulated there: slower than fp32
    assert choose_precision("auto", "cpu", {"avx2"}) == "fp32"
    assert choose_precision("auto", "cpu", {"avx512_bf16"}) == "bf16"
    assert choose_precision("fp32", "cpu", {"avx512_bf16"}) == "fp32"
    assert choose_precision("bf16", "cpu", {"avx2"}) == "bf16"  # asked for explicitly


def test_fast_step_matches_fp32():
    """A channels_last + bf16-autocast step gives the fp32 NCHW loss and gradients within bf16's
    precision, so the speed-up does not change what is learned."""
    from train.loop import segmentation_loss
    from train.model import build_model
    from train.speed import autocast, to_layout

    torch.manual_seed(0)
    model = build_model("resnet18", None, (32, 32, 16, 16, 8))
    images = torch.randn(2, 1, 64, 64)
    targets = (torch.rand(2, 3, 64, 64) > 0.5).float()

    def step(channels_last: bool, precision: str):
        net = to_layout(build_model("resnet18", None, (32, 32, 16, 16, 8)), channels_last)
        net.load_state_dict(model.state_dict())
        with autocast("cpu", precision):
            logits = net(to_layout(images, channels_last))
        loss = segmentation_loss(logits.float(), targets, 3.0)["total"]
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        return loss.item(), grad

    ref_loss, ref_grad = step(False, "fp32")
    cl_loss, cl_grad = step(True, "fp32")
    bf_loss, bf_grad = step(True, "bf16")
    assert cl_loss == pytest.approx(ref_loss, rel=1e-4)
    assert bf_loss == pytest.approx(ref_loss, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(bf_grad, ref_grad, dim=0) > 0.95


def test_time_budget_and_warm_start(data_root, tmp_path):
    """--minutes ends the run on time with the schedule decayed; --init-weights starts from given weights."""
    from cellseg.onnx_model import sha256_file
    from train.__main__ import main
    from train.model import build_model, save_weights

    torch.manual_seed(3)
    start = build_model("resnet18", None, (16, 16, 8, 8, 8))
    save_weights(start, {"encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 8]}, tmp_path / "start.safetensors")
    args = ["--data", str(data_root), "--out", str(tmp_path / "run"), "--crop", "64", "--batch-size", "2",
            "--steps-per-epoch", "2", "--warmup-steps", "1", "--decoder-channels", "16,16,8,8,8", "--workers", "0",
            "--device", "cpu", "--max-images", "3", "--minutes", "0.02", "--lr", "0",
            "--init-weights", str(tmp_path / "start.safetensors")]
    assert main(args) == 0
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert 1 <= len(last["history"]) < 50 and last["train_seconds"] < 0.02 * 60 + 30
    assert last["config"]["minutes"] == 0.02 and last["config"]["init_weights"].endswith("start.safetensors")
    assert last["config"]["epochs"] == len(last["history"])  # the epochs the budget allowed, not a sentinel
    assert last["config"]["init_weights_sha256"] == sha256_file(tmp_path / "start.safetensors")
    # With a zero learning rate the weights are exactly the ones the run started from (batch-norm
    # statistics, which are not learned by the optimiser, move on).
    for name, value in start.named_parameters():
        torch.testing.assert_close(last["model"][name], value, msg=name)


def test_budget_schedule_decays_with_time():
    from train.loop import lr_factor

    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, progress=0.0) == pytest.approx(1.0)
    assert lr_factor(50, 100, 10, progress=0.5) == pytest.approx(0.505)
    assert lr_factor(50, 100, 10, progress=1.0) == pytest.approx(0.01)


def run_chooser(chooser, seconds_per_step, steps: int, train_seconds: float = 0.0) -> float:
    """Steps under a load model: seconds_per_step(thread count) -> seconds; returns the training seconds."""
    for step in range(steps):
        chooser.before_step(step, train_seconds)
        spent = seconds_per_step(chooser._running)
        train_seconds += spent
        chooser.after_step(spent, step + 1, train_seconds)
    return train_seconds


def test_training_threads_follow_load_that_comes_and_goes():
    """Issue 29: with one of two cores busy, a 2-thread step is ~5x slower than idle and a 1-thread
    one ~2x: the chooser moves to 1 thread while the load lasts, back to 2 once it is gone, and keeps
    all cores on an idle machine where one thread fewer is only a little faster or slower."""
    from train.speed import ThreadChooser

    set_to = []
    chooser = ThreadChooser(2, interval=60, probe_steps=3, set_threads=set_to.append)
    assert chooser.candidates == [2, 1]
    busy = {2: 7.0, 1: 2.8}
    idle = {2: 1.4, 1: 2.6}
    seconds = run_chooser(chooser, busy.get, 20)
    assert chooser.threads == 1 and set_to[-1] == 1
    assert chooser.history[0]["seconds_per_step"] == {"2": 7.0, "1": 2.8}
    # the load goes: the next probe, a minute of training later, returns to both cores
    run_chooser(chooser, idle.get, 40, seconds)
    assert chooser.threads == 2 and [h["threads"] for h in chooser.history][:2] == [1, 2]

    steady = ThreadChooser(2, interval=60, probe_steps=3, set_threads=lambda n: None)
    run_chooser(steady, {2: 1.40, 1: 1.35}.get, 30)  # 4% faster with one: not worth leaving the default
    assert steady.threads == 2 and steady.history
    single = ThreadChooser(1, set_threads=lambda n: None)
    run_chooser(single, {1: 1.0}.get, 10)
    assert single.candidates == [1] and single.history == []  # nothing to choose between


def test_saved_weights_get_the_mode_every_other_output_gets(tmp_path):
    """A user's trial: model.safetensors came out 0600 (safetensors' own mode) beside 0644 files, so
    a lab's shared folder could not read the weights bioimage.io and TorchScript are made from."""
    import os

    from train.model import build_model, save_weights

    path = tmp_path / "w.safetensors"
    save_weights(build_model("resnet18", None, (16, 16, 8, 8, 8)),
                 {"encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 8]}, path)
    (tmp_path / "other.txt").write_text("x")
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "other.txt").st_mode & 0o777


def test_a_wrong_data_folder_is_one_line_not_a_traceback(tmp_path, capsys):
    """A user's trial: `python -m train --data /nonexistent` and `--data my_lab` (a lab's folder) ended in
    tracebacks; a lab's folder now also hears of `train finetune`."""
    from train.__main__ import main

    assert main(["--data", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]) == 2
    assert "python -m train: error:" in capsys.readouterr().err
    lab = tmp_path / "my_lab"
    lab.mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(lab / "a.png")
    assert main(["--data", str(lab), "--out", str(tmp_path / "out")]) == 2
    assert "python -m train finetune FOLDER --out DIR" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
