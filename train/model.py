"""The network: an smp U-Net with a grayscale input and three sigmoid output maps."""

from __future__ import annotations

import os

import torch


def _ensure_torchvision_ops() -> None:
    """Let segmentation_models_pytorch import where torchvision's compiled ops are missing.

    smp imports timm, which imports torchvision. The PyPI torchvision wheel next to a CPU-only
    torch has no compiled ops, and its import fails at `register_fake("torchvision::nms")` with
    "operator torchvision::nms does not exist". Declaring the two schemas it registers fakes for
    (the same signatures torchvision's C++ library declares) lets the import finish; the U-Net
    never calls them. Where torchvision works, the ops exist and nothing is defined here.
    """
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return
    except RuntimeError:
        pass
    try:
        import torchvision  # noqa: F401  (a working torchvision defines the ops itself)

        return
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass  # already defined by a partial torchvision import
    _ensure_torchvision_ops.library = lib  # keep the registration alive
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package so timm re-imports it cleanly


_ensure_torchvision_ops()

import segmentation_models_pytorch as smp  # noqa: E402

from cellseg.targets import OUTPUT_CHANNELS  # noqa: E402
from train.pretrained import PACKAGED_WEIGHTS, load_packaged_encoder  # noqa: E402

DEFAULT_ENCODER = "resnet18"
# A light decoder: smp's default (256,128,64,32,16) costs more than the encoder on a CPU.
DEFAULT_DECODER_CHANNELS = (128, 64, 32, 32, 16)


def build_model(encoder: str = DEFAULT_ENCODER, encoder_weights: str | None = None,
                decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS) -> torch.nn.Module:
    """U-Net returning logits, (N, 1, H, W) -> (N, 3, H, W).

    `encoder_weights`: None (random), a packaged source from `train.pretrained.PACKAGED_WEIGHTS`
    (installed from the package index, works offline), or an smp hub name such as "imagenet".
    """
    if encoder_weights in PACKAGED_WEIGHTS:
        expected = PACKAGED_WEIGHTS[encoder_weights].encoder
        if encoder != expected:
            raise ValueError(f"--encoder-weights {encoder_weights} fits --encoder {expected}, not {encoder}")
        model = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3,
                         classes=len(OUTPUT_CHANNELS), decoder_channels=tuple(decoder_channels))
        load_packaged_encoder(model.encoder, encoder_weights, in_channels=1)
        return model
    return smp.Unet(
        encoder_name=encoder, encoder_weights=encoder_weights, in_channels=1,
        classes=len(OUTPUT_CHANNELS), decoder_channels=tuple(decoder_channels),
    )


class WithSigmoid(torch.nn.Module):
    """The exported form: probabilities, so every consumer thresholds the same numbers."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


def load_checkpoint(path, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """Model (eval mode, logits) and the checkpoint dict (with its `config`)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    cfg = checkpoint["config"]
    model = build_model(cfg["encoder"], None, tuple(cfg["decoder_channels"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def save_weights(model: torch.nn.Module, config: dict, path) -> None:
    """The network's weights as safetensors (no pickle), with the architecture config in the metadata:
    what TorchScript and other PyTorch formats are rebuilt from (`python -m export bioimageio`)."""
    import json

    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    arch = {k: config[k] for k in ("encoder", "decoder_channels")}
    save_file(state, str(path), metadata={"format": "pt", "architecture": json.dumps(arch)})
    # safetensors creates the file owner-only (0600); give it the mode every other output gets
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def weights_architecture(path) -> dict:
    """The architecture config (`encoder`, `decoder_channels`) `save_weights` stored with the weights."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["architecture"])


def load_weights(path) -> torch.nn.Module:
    """Inverse of `save_weights`: the model (eval mode, logits)."""
    from safetensors.torch import load_file

    arch = weights_architecture(path)
    model = build_model(arch["encoder"], None, tuple(arch["decoder_channels"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
