import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.imageio import ImageError, ImageTooLargeError, decode_image, read_frame, read_image, stack_info
from cellseg.preprocess import normalize


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray, compression=None) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression=compression)
    return buffer.getvalue()


def test_bit_depths_and_layouts_normalise_to_the_same_array(synthetic_gray):
    g8 = synthetic_gray
    g16 = g8.astype(np.uint16) * 257  # the same picture stored as full-range 16-bit
    rgba = np.dstack([g8, g8, g8, np.full_like(g8, 255)])
    rgb = np.dstack([g8, g8, g8])
    reference = normalize(read_image(tiff_bytes(g8)))
    variants = {
        "8-bit TIFF (LZW)": tiff_bytes(g8, compression="lzw"),
        "16-bit TIFF": tiff_bytes(g16),
        "8-bit PNG": png_bytes(g8),
        "16-bit PNG": png_bytes(g16),
        "RGBA PNG": png_bytes(rgba),
        "RGB TIFF": tiff_bytes(rgb),
    }
    for name, data in variants.items():
        np.testing.assert_allclose(normalize(read_image(data)), reference, atol=1e-5, err_msg=name)
    # the raw 16-bit values really are 16-bit (not squashed to 8 bits on the way)
    assert read_image(png_bytes(g16)).max() == pytest.approx(g16.max())


def test_arrays_and_pil_images_are_accepted(synthetic_gray):
    from_array = read_image(synthetic_gray)
    from_pil = read_image(Image.fromarray(synthetic_gray))
    np.testing.assert_array_equal(from_array, from_pil)
    assert from_array.dtype == np.float32 and from_array.shape == synthetic_gray.shape


def test_not_an_image_raises_clear_error():
    with pytest.raises(ImageError, match="not a recognised image"):
        decode_image(b"this is a text file, not an image at all")


def test_empty_input_raises():
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_truncated_png_raises(synthetic_gray):
    data = png_bytes(synthetic_gray)
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 2])


def test_truncated_tiff_raises(synthetic_gray):
    data = tiff_bytes(synthetic_gray)
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 3])
    # cut before its image directory (LIVECell's TIFFs keep it at the end): the message says so,
    # where it used to end in a bare "0"
    whole = tiff_bytes(np.zeros((200, 200), np.uint8))
    directory_past_the_end = whole[:4] + (len(whole) + 100).to_bytes(4, "little") + whole[8:]
    with pytest.raises(ImageError, match="truncated or corrupt.*no readable image page"):
        decode_image(directory_past_the_end)


def test_too_many_pixels_raises_before_decoding(synthetic_gray):
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        read_image(png_bytes(synthetic_gray), max_pixels=1000)


def test_too_small_and_bad_shapes_raise():
    with pytest.raises(ImageError, match="at least"):
        read_image(png_bytes(np.zeros((8, 8), np.uint8)))
    with pytest.raises(ImageError, match="2-D"):
        read_image(np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        read_image(np.full((32, 32), np.nan, np.float32))


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "absent.tif")


def test_flat_image_normalises_without_dividing_by_zero():
    out = normalize(np.full((32, 32), 7.0))
    assert np.isfinite(out).all() and (out == 0).all()


def test_a_tiny_file_declaring_a_huge_image_is_refused_from_its_header(monkeypatch):
    """Issue 7.1: an 800 KB TIFF of 4 x 200,000,000 px once decoded to 5.9 GB before being refused."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((4, 200_000_000), np.uint8), compression="zlib", rowsperstrip=1)
    assert len(buffer.getvalue()) < 1_000_000

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels were decoded before the size checks")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_decoding)
    with pytest.raises(ImageTooLargeError, match="800,000,000 pixels"):
        decode_image(buffer.getvalue(), max_pixels=16_000_000)
    # the same for a thin strip under the pixel limit: refused for its side, still undecoded
    with pytest.raises(ImageError, match="at least 16"):
        decode_image(tiff_bytes(np.zeros((4, 5000), np.uint8)), max_pixels=16_000_000)
    # and for PNG: Pillow's header gives the size, load() is never reached
    thin_png = png_bytes(np.zeros((4, 5000), np.uint8))
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(ImageError, match="at least 16"):
        decode_image(thin_png)


def test_decoded_bytes_are_limited_too():
    # 64x64 float64 RGB = 98 KB decoded: over 8 bytes per pixel at a 64x64 pixel limit
    with pytest.raises(ImageTooLargeError, match="decode to"):
        decode_image(tiff_bytes(np.zeros((64, 64, 3), np.float64)), max_pixels=64 * 64)
    assert decode_image(tiff_bytes(np.zeros((64, 64), np.uint16)), max_pixels=64 * 64).shape == (64, 64)


def test_stacks_and_animations_are_refused_not_cut_to_one_plane():
    """Issue 7.11: a multi-page TIFF was silently reduced to its first page. Issue 19: the message
    says where stacks are taken (the service answers it as a 400)."""
    with pytest.raises(ImageError, match="multi-page TIFF \\(5 pages\\).*batch jobs \\(`cellseg segment`\\) take "
                                         "time-lapse stacks"):
        decode_image(tiff_bytes(np.zeros((5, 40, 40), np.uint8)))
    frames = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (0, 128)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="2 frames"):
        decode_image(buffer.getvalue())


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "WEBP"])
def test_undocumented_formats_are_refused(fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(buffer, format=fmt)
    with pytest.raises(ImageError, match=f"{fmt} images are not accepted"):
        decode_image(buffer.getvalue())


# Time-lapse stacks (issue 19): batch jobs read them frame by frame.

def time_lapse(frames: int = 5, shape: tuple[int, ...] = (48, 64)) -> np.ndarray:
    """Frames that differ, so that reading the wrong one shows. (Not 3 or 4 frames without stating the
    axes: tifffile would write those as the colour samples of one page.)"""
    return np.stack([np.full(shape, 10 * (i + 1), np.uint16) for i in range(frames)])


def write_tiff(path, data: np.ndarray, **kwargs):
    tifffile.imwrite(path, data, **kwargs)
    return path


@pytest.mark.parametrize("metadata", [{}, {"metadata": None}], ids=["tifffile-shaped", "no-metadata"])
def test_a_plain_multipage_tiff_is_a_time_lapse_of_its_pages(tmp_path, metadata):
    frames = time_lapse()
    path = write_tiff(tmp_path / "plain.tif", frames, **metadata)
    info = stack_info(path)
    assert (info.frames, info.interval_s, info.kind) == (5, None, "tiff")
    assert info.time_s(3) is None
    for i in range(5):
        frame = read_frame(path, i)
        assert frame.dtype == np.uint16 and frame.shape == (48, 64)
        np.testing.assert_array_equal(frame, frames[i])


def test_rgb_frames_are_frames_too(tmp_path):
    path = write_tiff(tmp_path / "rgb.tif", np.zeros((5, 48, 64, 3), np.uint8))
    assert stack_info(path).frames == 5 and read_frame(path, 4).shape == (48, 64, 3)


@pytest.mark.parametrize("interval, unit, seconds", [(600, None, 600.0), (10, "min", 600.0), (0.5, "hour", 1800.0),
                                                     (3, "fortnight", None)])
def test_an_imagej_hyperstack_gives_its_frame_interval(tmp_path, interval, unit, seconds):
    metadata = {"axes": "TYX", "finterval": interval, **({"tunit": unit} if unit else {})}
    path = write_tiff(tmp_path / "ij.tif", time_lapse(), imagej=True, metadata=metadata)
    info = stack_info(path)
    assert (info.frames, info.interval_s, info.kind) == (5, seconds, "imagej")  # an unknown unit: no guess
    if seconds:
        assert info.time_s(3) == 3 * seconds
    np.testing.assert_array_equal(read_frame(path, 2), time_lapse()[2])


def test_an_ome_time_lapse_gives_its_time_increment(tmp_path):
    path = write_tiff(tmp_path / "t.ome.tif", time_lapse(3), ome=True,
                      metadata={"axes": "TYX", "TimeIncrement": 0.5, "TimeIncrementUnit": "h"})
    info = stack_info(path)
    assert (info.frames, info.interval_s, info.kind) == (3, 1800.0, "ome")
    np.testing.assert_array_equal(read_frame(path, 1), time_lapse(3)[1])


@pytest.mark.parametrize("data, kwargs, message", [
    (time_lapse(4), {"imagej": True, "metadata": {"axes": "ZYX"}}, "ImageJ stack of 4 Z-slices.*Image > Properties"),
    (time_lapse(3), {"imagej": True, "metadata": {"axes": "CYX"}}, "ImageJ stack of 3 channels"),
    (time_lapse(3), {"ome": True, "metadata": {"axes": "ZYX"}}, "OME-TIFF of 3 Z-slices"),
    (np.zeros((3, 2, 48, 64), np.uint16), {"ome": True, "metadata": {"axes": "TCYX"}}, "OME-TIFF of 3 frames x 2 channels"),
    (np.zeros((3, 2, 48, 64), np.uint16), {}, "multi-page TIFF of 3 planes x 2 planes"),
], ids=["imagej-z", "imagej-channels", "ome-z", "ome-time-and-channels", "two-unnamed-axes"])
def test_stacks_that_are_not_time_lapses_are_refused_with_the_reason(tmp_path, data, kwargs, message):
    path = write_tiff(tmp_path / "stack.tif", data, **kwargs)
    with pytest.raises(ImageError, match=message) as refused:
        stack_info(path)
    assert "batch jobs take time-lapse stacks (frames only)" in str(refused.value)


def test_pages_of_different_sizes_are_not_a_time_lapse(tmp_path):
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((48, 64), np.uint8), metadata=None)
        tif.write(np.zeros((40, 64), np.uint8), metadata=None)
    with pytest.raises(ImageError, match="not all alike \\(64x48 uint8, 64x40 uint8\\)"):
        stack_info(path)


def test_single_images_are_not_stacks(tmp_path, synthetic_gray):
    (tmp_path / "a.png").write_bytes(png_bytes(synthetic_gray))
    (tmp_path / "b.tif").write_bytes(tiff_bytes(synthetic_gray))
    assert stack_info(tmp_path / "a.png").frames == stack_info(tmp_path / "b.tif").frames == 1
    with pytest.raises(ImageError, match="no such file"):
        stack_info(tmp_path / "absent.tif")


def test_frames_have_the_limits_of_single_images_and_are_decoded_one_at_a_time(tmp_path, monkeypatch):
    path = write_tiff(tmp_path / "big.tif", np.zeros((6, 300, 400), np.uint8), compression="zlib")
    decoded = []
    real_asarray = tifffile.TiffPage.asarray

    def counting_asarray(page, *args, **kwargs):
        decoded.append(page.index)
        return real_asarray(page, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", counting_asarray)
    # the whole stack is refused once, from its first page's header, with nothing decoded
    with pytest.raises(ImageTooLargeError, match="over the limit of 100,000"):
        stack_info(path, max_pixels=100_000)
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        read_frame(path, 2, max_pixels=100_000)
    assert decoded == []
    assert stack_info(path).frames == 6 and decoded == []
    assert read_frame(path, 4).shape == (300, 400)
    assert decoded == [4]  # that page alone: never the whole stack
    with pytest.raises(ImageError, match="no frame 6"):
        read_frame(path, 6)
