"""Image folders as training data: order, kohya repeats, captions, resizing, bad files."""

import math

import numpy as np
import pytest

from lora_lab.training.dataset import load_images, open_rgb, read_caption, resize, scan_folder

Image = pytest.importorskip("PIL.Image", reason="Pillow is a test dependency (pip install -e .[test])")

RED, GREEN, BLUE, BLACK, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)


def bands(colors, band_w, h):
    """Vertical colour bands, left to right."""
    img = Image.new("RGB", (band_w * len(colors), h))
    for i, c in enumerate(colors):
        img.paste(c, (i * band_w, 0, (i + 1) * band_w, h))
    return img


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "set"
    (root / "3_style").mkdir(parents=True)
    (root / "extra").mkdir()
    (root / ".hidden").mkdir()
    Image.new("RGB", (40, 30), RED).save(root / "b.png")
    (root / "b.txt").write_text("  a red square \n", encoding="utf-8")
    Image.new("RGB", (30, 40), GREEN).save(root / "a.jpg", quality=95)
    (root / "a.txt").write_text("", encoding="utf-8")  # empty: the default caption
    Image.new("RGB", (32, 32), BLUE).save(root / "3_style" / "c.webp")
    (root / "3_style" / "c.txt").write_text("blue, style", encoding="utf-8")
    Image.new("RGB", (32, 32), WHITE).save(root / "extra" / "d.bmp")
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "e.png")
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    return root


def test_sorted_order_repeats_and_captions(folder):
    items = scan_folder(str(folder), default_caption="trigger")
    assert [(i.name, i.caption, i.repeats) for i in items] == [
        ("a.jpg", "trigger", 1),
        ("b.png", "a red square", 1),
        ("3_style/c.webp", "blue, style", 3),
        ("extra/d.bmp", "trigger", 1),
    ]
    images = load_images(items, 16, 16, "crop")
    assert [im.shape for im in images] == [(16, 16, 3)] * 4
    assert all(im.dtype == np.uint8 for im in images)
    means = [tuple(int(round(v)) for v in im.reshape(-1, 3).mean(0)) for im in images]
    for mean, colour in zip(means, [GREEN, RED, BLUE, WHITE]):
        assert max(abs(a - b) for a, b in zip(mean, colour)) <= 3, (mean, colour)


def test_no_default_caption_is_empty(folder):
    assert read_caption(str(folder / "a.jpg")) == ""
    assert read_caption(str(folder / "extra" / "d.bmp"), "x") == "x"


def test_crop_keeps_the_centre():
    wide = bands([GREEN, RED, BLUE], 40, 40)          # 120x40 -> 40x40 keeps the red band
    out = np.asarray(resize(wide, 40, 40, "crop"))
    assert out.shape == (40, 40, 3)
    assert (np.abs(out[:, 2:-2].astype(int) - RED).max()) <= 2
    tall = bands([RED], 20, 80)                        # 20x80 -> 40x40: scaled up, centre cut
    assert np.asarray(resize(tall, 40, 40, "crop")).shape == (40, 40, 3)


def test_pad_fits_inside_and_centres_on_black():
    wide = bands([RED, BLUE], 32, 32)                   # 64x32 -> 32x32: content 32x16, centred
    out = np.asarray(resize(wide, 32, 32, "pad")).astype(int)
    assert (out[:8] == BLACK).all() and (out[24:] == BLACK).all()
    assert np.abs(out[9:23, 1:14] - RED).max() <= 2 and np.abs(out[9:23, 18:31] - BLUE).max() <= 2
    odd = np.asarray(resize(Image.new("RGB", (100, 33), WHITE), 64, 48, "pad"))
    rows = np.nonzero((odd > 128).all(axis=(1, 2)))[0]  # content 64x21, 13 px black above
    assert odd.shape == (48, 64, 3) and rows.min() == 13 and rows.max() == 33


def test_stretch_ignores_aspect():
    wide = bands([RED, BLUE], 32, 16)                   # 64x16 -> 32x32: no black, halves kept
    out = np.asarray(resize(wide, 32, 32, "stretch")).astype(int)
    assert np.abs(out[:, :14] - RED).max() <= 2 and np.abs(out[:, 18:] - BLUE).max() <= 2


def test_same_size_is_unchanged():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    for mode in ("crop", "pad", "stretch"):
        assert np.array_equal(np.asarray(resize(Image.fromarray(pixels), 40, 24, mode)), pixels)


def test_exif_orientation_and_transparency(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert open_rgb(str(tmp_path / "rot.jpg")).size == (20, 40)
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    clear.save(tmp_path / "clear.png")
    assert np.asarray(open_rgb(str(tmp_path / "clear.png"))).min() == 255  # white behind


def test_unreadable_images_are_all_named(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "3_style" / "empty.jpg").write_bytes(b"")
    items = scan_folder(str(folder))
    with pytest.raises(ValueError) as error:
        load_images(items, 16, 16, "pad")
    message = str(error.value)
    assert "2 image(s)" in message and "broken.png" in message and "3_style/empty.jpg" in message


def test_empty_or_missing_folder_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        scan_folder(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        scan_folder(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="resize_mode"):
        resize(Image.new("RGB", (4, 4)), 4, 8, "zoom")


def test_image_folders_lists_only_folders_with_images(tmp_path):
    from lora_lab.training.dataset import image_folders

    root = tmp_path / "input"
    for sub in ("3d", "empty/deeper", "set/10_style", "set/extra", "people/alice/2_smile",
                "textonly", ".cache", "b_set", "B_upper"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8), RED).save(root / "top_level.png")  # an upload, not a folder
    Image.new("RGB", (8, 8), RED).save(root / "set" / "a.png")
    Image.new("RGB", (8, 8), BLUE).save(root / "set" / "10_style" / "b.webp")
    Image.new("RGB", (8, 8), GREEN).save(root / "people" / "alice" / "2_smile" / "c.JPG")
    Image.new("RGB", (8, 8), GREEN).save(root / ".cache" / "d.png")
    Image.new("RGB", (8, 8), GREEN).save(root / "b_set" / "e.jpeg")
    Image.new("RGB", (8, 8), GREEN).save(root / "B_upper" / ".hidden.png")
    (root / "textonly" / "notes.txt").write_text("no image", encoding="utf-8")
    (root / "3d" / "model.glb").write_bytes(b"glTF")

    assert image_folders(str(root)) == sorted([
        "b_set", "people", "people/alice", "people/alice/2_smile",
        "set", "set/10_style"])  # set/extra is empty; 3d, textonly and .cache hold no image
    assert image_folders(str(tmp_path / "missing")) == []
    (root / "3d" / "model.glb").unlink()
    assert image_folders(str(root / "3d")) == []


def test_bucket_sizes_keep_the_aspect_ratio_within_the_area():
    from lora_lab.training.dataset import bucket_size

    for w, h in [(1024, 1024), (1920, 1080), (1080, 1920), (800, 600), (3000, 1000), (7, 5)]:
        bw, bh = bucket_size(w, h, 512, 512)
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
        # no bucket of the list is closer in aspect ratio
        assert abs(math.log(bw / bh) - math.log(w / h)) <= 0.2
    assert bucket_size(1024, 1024, 512, 512) == (512, 512)
    assert bucket_size(1920, 1080, 512, 512) == (640, 384)  # 1.67 against 1.78
    assert bucket_size(1080, 1920, 512, 512) == (384, 640)


def test_bucket_mode_crops_only_what_the_bucket_needs():
    wide = Image.new("RGB", (1920, 1080), WHITE)
    out = resize(wide, 512, 512, "bucket")
    assert out.size == (640, 384)
    # a photo already at a bucket's aspect ratio is not cropped at all
    exact = Image.fromarray(np.arange(640 * 384 * 3, dtype=np.uint8).reshape(384, 640, 3))
    assert np.array_equal(np.asarray(resize(exact, 512, 512, "bucket")), np.asarray(exact))
