"""Messy real-world folders: every command completes or stops with one clear line."""

import shutil
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.data.images import UnreadableImage, load_image, read_image

runner = CliRunner()
# conftest.TINY as flags (float32 on every CPU, as TINY).
TINY_FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--set", "precision=\"float32\"", "--image-size", "32",
              "--batch-size", "8", "--head-epochs", "1",
              "--fine-epochs", "0", "--set", "head.units=[8]", "--quiet"]


# The same 200 inputs every run (derandomize) and a deadline far above their 25-35 ms: a new
# input that failed would show up as a one-off failure of an unrelated change, and a tight
# deadline as the machine's load; a decode that hangs still fails. After a change to
# decoding, search wider once by hand (derandomize=False, more examples).
@settings(max_examples=200, deadline=10_000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=2048), suffix=st.sampled_from([".jpg", ".png", ".gif", ".bmp", ".webp", ".tiff"]),
       header=st.sampled_from([b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF", b"II*\x00"]))
def test_random_bytes_give_rgb_or_a_skip_never_a_crash(tmp_path_factory, content, suffix, header):
    path = tmp_path_factory.mktemp("fuzz") / f"random{suffix}"
    path.write_bytes(header + content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = read_image(path)
        except UnreadableImage:
            return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_decompression_bomb_is_refused_with_a_clear_reason(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)
    with pytest.raises(UnreadableImage, match="decompression-bomb guard"):
        read_image(path)
    # JPEGs too (with EXIF, which the fast decoder has Pillow look at): load_image's fast
    # decoder leaves them to Pillow's guard, and no warning escapes on the way.
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 1
    for name, options in (("huge.jpg", {}), ("huge-exif.jpg", {"exif": exif.tobytes()})):
        Image.new("RGB", (300, 300)).save(tmp_path / name, **options)
        for limit in (300 * 300 // 4, 300 * 300 - 1):  # above twice the limit (an error), above it (a warning)
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # Bytes (an upload to serve) stop at the limit; a file on disk (the user's own:
                # a 100-megapixel photo) only at twice it, where Pillow itself refuses.
                with pytest.raises(UnreadableImage, match=f"decompression-bomb guard, over {limit} pixels"):
                    load_image((tmp_path / name).read_bytes(), 32)
                if limit * 2 < 300 * 300:
                    with pytest.raises(UnreadableImage, match=f"decompression-bomb guard, over {2 * limit} pixels"):
                        load_image(tmp_path / name, 32)
                else:
                    assert load_image(tmp_path / name, 32).shape == (32, 32, 3)
            assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)], name


def test_images_above_the_limit_decoded_in_threads_warn_nothing(tmp_path, monkeypatch):
    """Pillow warns above MAX_IMAGE_PIXELS; a file on disk is read up to twice it with no
    warning, even while other threads open images under the same check (``catch_warnings``
    in two threads at once used to put back each other's filters and let Pillow's warning out)."""
    from transferkit.data.images import decode_images

    Image.new("L", (120, 100), 128).save(tmp_path / "large.png")  # above the limit set below
    Image.new("L", (300, 300), 128).save(tmp_path / "bomb.png")  # above twice it: refused
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    paths = [tmp_path / ("bomb.png" if index % 2 else "large.png") for index in range(400)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, kept, skipped = decode_images(paths, 16, workers=8)
    assert [w.message for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert list(kept) == list(range(0, 400, 2)) and len(skipped) == 200
    assert all("decompression-bomb guard" in reason for _, reason in skipped)


def test_odd_but_valid_images_are_read(tmp_path):
    Image.new("RGB", (1, 1), (5, 6, 7)).save(tmp_path / "tiny.png")
    assert read_image(tmp_path / "tiny.png").shape == (1, 1, 3)
    Image.fromarray(np.full((4, 4), 65535, dtype="uint16")).save(tmp_path / "deep.tif")
    assert (read_image(tmp_path / "deep.tif") == 255).all()
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "clear.png", transparency=0)
    assert (read_image(tmp_path / "clear.png") == 255).all()


def make_messy(root, source):
    shutil.copytree(source, root)
    circle = root / "circle"
    (circle / "zero.jpg").write_bytes(b"")
    good = (circle / "circle_000.jpg").read_bytes()
    (circle / "cut.jpg").write_bytes(good[: len(good) // 3])
    (circle / "text.png").write_text("I am not a picture")
    Image.new("RGB", (1, 1)).save(circle / "one pixel ü.png")
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "square" / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("CMYK", (20, 20), (0, 100, 0, 0)).save(root / "square" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype="uint16")).save(root / "triangle" / "deep.tif")
    (root / "triangle" / ".DS_Store").write_bytes(b"litter")
    (root / "triangle" / "Thumbs.db").write_bytes(b"litter")
    (root / "__MACOSX").mkdir()
    (root / "triangle" / "deeper" / "still").mkdir(parents=True)
    shutil.copy(root / "triangle" / "triangle_000.jpg", root / "triangle" / "deeper" / "still" / "nested.jpg")
    (root / "triangle" / "loop").symlink_to(root / "triangle", target_is_directory=True)
    (root / "square" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    return root


@pytest.fixture(scope="module")
def messy(shapes_dir, tmp_path_factory):
    return make_messy(tmp_path_factory.mktemp("messy") / "data", shapes_dir)


def one_line_or_success(result):
    assert "Traceback" not in result.output
    if result.exit_code not in (0, 1):
        raise AssertionError(result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_every_command_copes_with_a_messy_folder(messy, tmp_path):
    earlier = tmp_path / "earlier"
    first = runner.invoke(app, ["finetune", str(messy), *TINY_FLAGS, "-o", str(earlier)])
    assert first.exit_code == 0, first.output
    assert "skipped" in first.output  # the summary warning
    skipped = (earlier / "skipped.txt").read_text(encoding="utf-8")
    for name in ("zero.jpg", "cut.jpg", "text.png", "dangling.jpg"):
        assert name in skipped, name
    assert "one pixel" not in skipped and "anim.gif" not in skipped and "cmyk.jpg" not in skipped
    # The suggested doctor command checks what this run checked (its image size and split),
    # and comes after the warnings it refers to.
    lines = first.output.splitlines()
    suggestion = next(index for index, line in enumerate(lines) if "for the details run:" in line)
    assert suggestion > max(index for index, line in enumerate(lines) if line.startswith("warning: skipping"))
    import shlex

    command = shlex.split(lines[suggestion].split("for the details run: ")[1])
    assert command[:3] == ["transferkit", "doctor", str(messy)] and command[3:5] == ["--image-size", "32"]
    suggested = runner.invoke(app, command[1:])
    assert suggested.exit_code == 1 and "unreadable" in suggested.output
    snapshot = {path.name: path.read_bytes() for path in earlier.iterdir()}

    again = runner.invoke(app, ["finetune", str(messy), *TINY_FLAGS, "-o", str(earlier)])
    assert again.exit_code == 1 and "exists already" in again.output
    assert {path.name: path.read_bytes() for path in earlier.iterdir()} == snapshot

    predicted = runner.invoke(app, ["predict", str(earlier), str(messy), "--quiet", "-o", str(tmp_path / "p.json")])
    one_line_or_success(predicted)
    assert predicted.exit_code == 0 and "skipped" in predicted.output

    doctor = runner.invoke(app, ["doctor", str(messy), "--image-size", "32"])
    one_line_or_success(doctor)
    assert doctor.exit_code == 1 and "unreadable" in doctor.output

    preview = runner.invoke(app, ["augment-preview", str(messy), "-o", str(tmp_path / "grid.png"), "--count", "12"])
    one_line_or_success(preview)
    assert preview.exit_code == 0


def test_a_class_too_small_to_split_is_named(tmp_path, tiny):
    root = tmp_path / "data"
    for name, count in (("big", 5), ("lonely", 1)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (32, 32), (index * 40, 0, 0)).save(root / name / f"{index}.png")
    result = runner.invoke(app, ["finetune", str(root), *TINY_FLAGS, "-o", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "class lonely has 1 readable image" in result.output
    assert "single readable image" not in result.output  # once: the split's line, not the data check's too
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
