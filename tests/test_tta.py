"""Test-time augmentation in the shared inference path: mirrored passes are undone exactly and averaged."""

import numpy as np

from cellseg.inference import TTA_FLIPS, predict_maps, tta_expand, tta_reduce


def equivariant(batch: np.ndarray) -> np.ndarray:
    """A 'network' that commutes with mirroring: per-pixel function of the input."""
    p = 1 / (1 + np.exp(-batch))
    return np.concatenate([p, 1 - p, p * p], axis=1).astype(np.float32)


def left_biased(batch: np.ndarray) -> np.ndarray:
    """A 'network' that does not: it adds a ramp rising to the right."""
    ramp = np.linspace(0, 1, batch.shape[-1], dtype=np.float32)
    out = equivariant(batch)
    out[:, 0] = ramp
    return out


def test_expand_then_reduce_is_the_identity():
    arrays = [np.random.default_rng(i).random((3, 37, 53)).astype(np.float32) for i in range(2)]
    expanded = tta_expand([a[0] for a in arrays])
    assert len(expanded) == 2 * len(TTA_FLIPS)
    # feed the mirrored inputs through an identity "network" (3 channels = the input thrice)
    outputs = [np.stack([e, e, e]) for e in expanded]
    for merged, original in zip(tta_reduce(outputs), arrays):
        np.testing.assert_allclose(merged, np.stack([original[0]] * 3), atol=1e-6)


def test_tta_equals_plain_for_an_equivariant_network_and_averages_otherwise(synthetic_gray):
    image = synthetic_gray.astype(np.float32)
    plain = predict_maps(equivariant, [image])[0]
    np.testing.assert_allclose(predict_maps(equivariant, [image], tta=True)[0], plain, atol=1e-6)
    # with a ramp 0..1 in x, the left-right mirrored passes give 1..0: the average is flat at 0.5
    averaged = predict_maps(left_biased, [image], tta=True)[0]
    assert predict_maps(left_biased, [image])[0][0].std() > 0.2
    np.testing.assert_allclose(averaged[0], 0.5, atol=0.02)


def test_maps_travel_as_8_bit_codes_within_half_a_step():
    from cellseg.inference import MAP_LEVELS, decode_maps, encode_maps

    maps = np.random.default_rng(0).random((3, 17, 23)).astype(np.float32)
    codes = encode_maps([maps])
    assert codes[0].dtype == np.uint8 and codes[0].nbytes * 4 == maps.nbytes
    back = decode_maps(codes)[0]
    assert back.dtype == np.float32 and np.abs(back - maps).max() <= 0.5 / MAP_LEVELS + 1e-7
    assert decode_maps(encode_maps([np.array([0.0, 1.0, 1.5, -0.2])]))[0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_codes_are_round_of_clipped_maps_times_255_for_any_float_type():
    from cellseg.inference import encode_maps

    rng = np.random.default_rng(1)
    for dtype in (np.float16, np.float32, np.float64):
        maps = (rng.random((3, 40, 50)) * 1.4 - 0.2).astype(dtype)
        maps.flat[:4] = [0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0]  # halfway cases: round half to even
        np.testing.assert_array_equal(encode_maps([maps])[0], np.rint(np.clip(maps, 0.0, 1.0) * 255).astype(np.uint8))
