import numpy as np
import pytest

from cellseg.instances import instances_from_labels, labels_from_instances
from cellseg.rle import decode_coco, decode_kaggle, encode_coco, encode_kaggle, kaggle_to_coco, labels_to_coco_rles


@pytest.fixture
def labels():
    rng = np.random.default_rng(1)
    lab = np.zeros((40, 50), np.int32)
    for i in range(1, 6):
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        lab[y : y + 8, x : x + 9] = i
    return lab


def test_coco_rle_round_trip(labels):
    for index in range(1, labels.max() + 1):
        mask = labels == index
        rle = encode_coco(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == [40, 50]
        np.testing.assert_array_equal(decode_coco(rle), mask)


def test_kaggle_rle_round_trip_and_layout(labels):
    mask = labels == 1
    text = encode_kaggle(mask)
    np.testing.assert_array_equal(decode_kaggle(text, 40, 50), mask)
    # 1-based starts, pixels numbered row by row: pixel (row 0, col 2) is number 3.
    single = np.zeros((4, 5), bool)
    single[0, 2:4] = True
    single[1, 0] = True
    assert encode_kaggle(single) == "3 2 6 1"
    np.testing.assert_array_equal(decode_kaggle("3 2 6 1", 4, 5), single)


def test_kaggle_rle_rejects_bad_input():
    for read in (decode_kaggle, kaggle_to_coco):
        with pytest.raises(ValueError, match="even"):
            read("1 2 3", 4, 5)
        with pytest.raises(ValueError, match="outside"):
            read("19 5", 4, 5)


@pytest.mark.parametrize("text", ["", "1 20", "20 1", "1 1", "3 2 6 1", "2 9 5 3", "4 3 14 7 20 1"])
def test_kaggle_to_coco_equals_encoding_the_decoded_mask(text):
    """The cell's own runs give pycocotools' own string for its mask: empty and whole images, the
    first and last pixels, runs that wrap to the next row and runs that overlap."""
    from pycocotools import mask as mask_utils

    mask = decode_kaggle(text, 4, 5)
    expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    got = kaggle_to_coco(text, 4, 5)
    assert got["counts"] == expected["counts"] and list(got["size"]) == [4, 5]
    np.testing.assert_array_equal(mask_utils.decode(got).astype(bool), mask)


def test_kaggle_to_coco_equals_encoding_random_masks():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(3)
    for _ in range(50):
        height, width = rng.integers(1, 30, size=2)
        mask = rng.random((height, width)) < rng.random()
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert kaggle_to_coco(encode_kaggle(mask), height, width)["counts"] == expected["counts"]


def test_instances_round_trip(labels):
    present = np.unique(labels[labels > 0])
    records = instances_from_labels(labels)
    assert [r["id"] for r in records] == list(present)
    assert [r["area"] for r in records] == [int((labels == i).sum()) for i in present]
    first = records[0]
    ys, xs = np.nonzero(labels == first["id"])
    assert first["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    np.testing.assert_array_equal(labels_from_instances(records, *labels.shape), labels)
    assert len(labels_to_coco_rles(labels)) == labels.max()


def test_run_encoding_and_decoding_equal_pycocotools():
    from pycocotools import mask as mask_utils

    from cellseg.rle import coco_counts

    def one_cell(mask: np.ndarray) -> dict:  # the mask as cell 1 of a label image
        return labels_to_coco_rles(mask.astype(np.int32))[0]

    rng = np.random.default_rng(3)
    for _ in range(20):
        h, w = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        mask = np.zeros((h, w), bool)
        y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > 0.4
        expected = encode_coco(mask)
        if mask.any():
            assert one_cell(mask) == expected
        counts = coco_counts(expected)
        assert counts.sum() == h * w
        np.testing.assert_array_equal(np.repeat(np.arange(counts.size) % 2, counts).reshape(w, h).T, mask)
        # very long runs exercise the multi-byte and delta coding of the compressed string
        big = np.zeros((1000, 1000), bool)
        big[y0 * 10 :, x0 * 10 :] = True
        big_rle = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))
        np.testing.assert_array_equal(coco_counts(big_rle).sum(), 10**6)
        assert one_cell(big) == encode_coco(big)
    absent = np.zeros((8, 9), np.int32)
    absent[0, 0] = 2  # label 1 is absent: its mask is empty
    assert labels_to_coco_rles(absent)[0] == encode_coco(np.zeros((8, 9), bool))


@pytest.mark.parametrize("seed", range(5))
def test_all_cells_encoded_at_once_equal_pycocotools_per_cell(seed):
    """Random labels with cells on every edge (runs that reach the bottom of one column and the top
    of the next), ragged shapes and absent labels: one pass gives pycocotools' string per cell."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
    labels = ndi.label(ndi.gaussian_filter(rng.random((h, w)), 2) > 0.5)[0].astype(np.int32)
    labels[:, 0] = labels[:, 0].max() + 1  # a full left column: its runs join across columns
    labels[labels == 2] = 0  # an absent label in the middle
    rles = labels_to_coco_rles(labels)
    assert len(rles) == labels.max()
    for index, rle in enumerate(rles, start=1):
        assert rle == encode_coco(labels == index)


def test_instance_centroids_equal_pixel_means(labels):
    from cellseg import instances

    expected = [[round(float(np.nonzero(labels == i)[1].mean()), 2), round(float(np.nonzero(labels == i)[0].mean()), 2)]
                for i in np.unique(labels[labels > 0])]
    assert [r["centroid"] for r in instances.instances_from_labels(labels)] == expected
