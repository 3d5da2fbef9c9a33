import numpy as np

from cellseg.inference import predict_maps, predict_padded
from cellseg.tiling import plan_tiles


def local_predict(batch: np.ndarray) -> np.ndarray:
    """A 'network' whose output at a pixel depends only on a 3x3 neighbourhood."""
    from scipy import ndimage as ndi

    smoothed = np.stack([ndi.uniform_filter(b[0], 3, mode="reflect") for b in batch])
    return np.stack([smoothed, smoothed * 2, -smoothed], axis=1)


def test_tiles_cover_the_image_exactly_once_in_their_cores():
    for h, w in [(100, 100), (1000, 700), (2049, 1500)]:
        cover = np.zeros((h, w), int)
        for t in plan_tiles(h, w, tile=512, context=64):
            assert t.y1 - t.y0 <= 512 and t.x1 - t.x0 <= 512
            assert t.y0 <= t.keep_y0 and t.keep_y1 <= t.y1
            cover[t.keep_y0 : t.keep_y1, t.keep_x0 : t.keep_x1] += 1
        assert cover.min() >= 1


def test_tiled_prediction_equals_whole_image_prediction():
    rng = np.random.default_rng(0)
    image = rng.random((300, 410)).astype(np.float32) * 200
    whole = predict_maps(local_predict, [image], tile_size=1024)[0]
    tiled = predict_maps(local_predict, [image], tile_size=128, context=16)[0]
    assert whole.shape == tiled.shape == (3, 300, 410)
    # Seams between tiles must be invisible. At the image's own border the two paths pad
    # differently (a tile ending at the border needs no padding), so the outer pixel is excluded.
    np.testing.assert_allclose(tiled[:, 1:-1, 1:-1], whole[:, 1:-1, 1:-1], atol=1e-5)


def test_mixed_sizes_in_one_batch_keep_their_own_shapes_and_values():
    rng = np.random.default_rng(1)
    a, b = rng.random((40, 70)).astype(np.float32), rng.random((100, 33)).astype(np.float32)
    together = predict_padded(local_predict, [a, b])
    alone = predict_padded(local_predict, [a]) + predict_padded(local_predict, [b])
    assert [o.shape for o in together] == [(3, 40, 70), (3, 100, 33)]
    for x, y in zip(together, alone):
        np.testing.assert_array_equal(x, y)
