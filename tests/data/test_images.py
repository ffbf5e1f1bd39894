import io

import numpy as np
import pytest
from PIL import Image

from transferkit.data.images import UnreadableImage, decode_images, load_image, read_image


def save(image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def check_rgb(array, shape=None):
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    if shape:
        assert array.shape[:2] == shape


def test_grayscale_rgba_palette_cmyk_are_rgb(tmp_path):
    gray = read_image(save(Image.new("L", (5, 4), 100), tmp_path / "g.png"))
    check_rgb(gray, (4, 5))
    assert (gray == 100).all()
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    check_rgb(read_image(save(rgba, tmp_path / "a.png")))
    assert (read_image(tmp_path / "a.png") == 255).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert tuple(read_image(save(palette, tmp_path / "p.png"))[0, 0]) == (10, 20, 30)
    cmyk = read_image(save(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    check_rgb(cmyk)
    assert cmyk[0, 0, 0] > 200 and cmyk[0, 0, 1] < 60


def test_sixteen_bit_and_float_tiff_are_scaled(tmp_path):
    values = np.full((3, 3), 65535, dtype="uint16")
    sixteen = read_image(save(Image.fromarray(values), tmp_path / "s.png"))
    assert (sixteen == 255).all()
    floats = np.linspace(0, 1, 9, dtype="float32").reshape(3, 3)
    as_float = read_image(save(Image.fromarray(floats, mode="F"), tmp_path / "f.tiff"))
    assert as_float[0, 0, 0] == 0 and as_float[2, 2, 0] == 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (6, 3), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(image, tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert read_image(path).shape[:2] == (6, 3)


def test_gif_gives_first_frame_and_webp_bmp_work(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    first = read_image(path)
    assert first[0, 0, 0] > 200 and first[0, 0, 2] < 50
    check_rgb(read_image(save(Image.new("RGB", (4, 4)), tmp_path / "x.webp")))
    check_rgb(read_image(save(Image.new("RGB", (4, 4)), tmp_path / "x.bmp")))


@pytest.mark.parametrize(
    "content",
    [b"", b"plain text, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20],
    ids=["empty", "text", "truncated-png"],
)
def test_unreadable_files_raise_unreadable_image(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match="bad.png"):
        read_image(path)


def test_truncated_jpeg_is_unreadable(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UnreadableImage):
        read_image(path)


def test_load_image_resizes_to_a_square(tmp_path):
    path = save(Image.new("RGB", (90, 30), (1, 2, 3)), tmp_path / "wide.jpg")
    assert load_image(path, 32).shape == (32, 32, 3)


def textured(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype("uint8")
    return Image.fromarray(pixels).convert(mode)


def jpeg_cases(tmp_path):
    """(name, path, taken by the fast decoder) for the kinds of JPEG a folder may hold."""
    upright = Image.new("RGB", (1, 1)).getexif()
    upright[0x0112] = 1
    rotated = Image.new("RGB", (1, 1)).getexif()
    rotated[0x0112] = 6
    return [
        ("smaller", save(textured(20, 30), tmp_path / "smaller.jpg"), True),
        ("same size", save(textured(48, 48), tmp_path / "same.jpg"), True),
        ("large, scaled in the decoder", save(textured(400, 260), tmp_path / "large.jpg", quality=92), True),
        ("grayscale", save(textured(200, 150, "L"), tmp_path / "gray.jpg"), True),
        ("progressive 4:4:4", save(textured(150, 100), tmp_path / "prog.jpg", progressive=True, subsampling=0), True),
        ("EXIF upright", save(textured(120, 90), tmp_path / "upright.jpg", exif=upright.tobytes()), True),
        ("EXIF rotated", save(textured(120, 90), tmp_path / "rotated.jpg", exif=rotated.tobytes()), False),
        ("CMYK", save(textured(100, 100, "CMYK"), tmp_path / "cmyk.jpg"), False),
        ("MPO", save(textured(130, 90), tmp_path / "multi.jpg", format="MPO", save_all=True,
                     append_images=[textured(130, 90, seed=1)]), False),
        ("PNG", save(textured(60, 60), tmp_path / "not-a-jpeg.png"), False),
        ("XMP rotated", save(textured(120, 90), tmp_path / "xmp.jpg", xmp=XMP_ROTATED), False),
        ("4:4:1, which simplejpeg cannot read", four_four_one(tmp_path / "441.jpg"), False),
    ]


XMP_ROTATED = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'


def four_four_one(path):
    """A 4:4:4 JPEG whose luma sampling is edited to 1x4 (libjpeg reads it; simplejpeg's
    header reader raises KeyError)."""
    buffer = io.BytesIO()
    textured(64, 64).save(buffer, format="JPEG", subsampling=0)
    data = bytearray(buffer.getvalue())
    data[data.index(b"\xff\xc0") + 11] = 0x14
    path.write_bytes(bytes(data))
    return path


def test_fast_jpeg_decoding_gives_pillows_pixels(tmp_path, monkeypatch):
    """Plain JPEGs go through simplejpeg, the rest through Pillow; either way load_image
    returns what Pillow's path alone returns, pixel for pixel."""
    from transferkit.data import images as data

    cases = jpeg_cases(tmp_path)
    fast = {name: load_image(path, 48) for name, path, _ in cases}
    for name, path, plain in cases:
        assert (data._decode_plain_jpeg(path, 48) is not None) == plain, name
    monkeypatch.setattr(data, "simplejpeg", None)
    for name, path, _ in cases:
        assert data._decode_plain_jpeg(path, 48) is None
        np.testing.assert_array_equal(fast[name], load_image(path, 48), err_msg=name)
    assert fast["EXIF rotated"].shape == (48, 48, 3)


def test_an_images_bytes_decode_to_its_files_pixels(tmp_path):
    """What ``transferkit serve`` decodes from an upload is what predict decodes from the file."""
    for name, path, _ in jpeg_cases(tmp_path):
        np.testing.assert_array_equal(load_image(path.read_bytes(), 48), load_image(path, 48), err_msg=name)
        np.testing.assert_array_equal(read_image(path.read_bytes()), read_image(path), err_msg=name)
    for content in (b"", b"plain text, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20):
        with pytest.raises(UnreadableImage) as caught:
            load_image(content, 48)
        assert str(caught.value).startswith("image bytes: not a readable image") and "BytesIO" not in str(caught.value)


@pytest.mark.parametrize("side", [3, 5, 7, 9, 15, 16, 17, 33])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_fast_jpeg_decoding_of_tiny_images_at_tiny_sizes(tmp_path, monkeypatch, side, size):
    """Where libjpeg-turbo could pick another scale giving the same output size, Pillow's
    choice still holds."""
    from transferkit.data import images as data

    paths = [save(textured(side, side + extra), tmp_path / f"tiny{extra}.jpg") for extra in (0, 1)]
    fast = [load_image(path, size) for path in paths]
    monkeypatch.setattr(data, "simplejpeg", None)
    for path, image in zip(paths, fast, strict=False):
        np.testing.assert_array_equal(image, load_image(path, size), err_msg=path.name)


def test_damaged_jpeg_is_still_reported_by_load_image(tmp_path):
    from transferkit.data import images as data

    whole = save(textured(64, 64), tmp_path / "whole.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    assert data._decode_plain_jpeg(cut, 32) is None
    with pytest.raises(UnreadableImage, match="cut.jpg"):
        load_image(cut, 32)


def test_decode_images_skips_and_reports_unreadable(tmp_path):
    good = save(Image.new("RGB", (8, 8), (9, 9, 9)), tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    images, kept, skipped = decode_images([bad, good], 16)
    assert images.shape == (1, 16, 16, 3)
    assert list(kept) == [1]
    assert skipped[0][0] == bad and "not a readable image" in skipped[0][1]






















