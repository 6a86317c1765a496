"""The direct tiled-JPEG decoder must give exactly OpenSlide's pixels, and step aside when it cannot; tiles
made standalone (JPEGTables spliced in, RGB-coded tiles marked) decode to the same pixels elsewhere."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
import torch

from pipeline.slide import SlideError, open_slide
from pipeline.synthetic import make_slide
from pipeline.tiles import ADOBE_RGB, jpeg_segments, open_tiled_jpeg, standalone_jpeg

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    return [make_slide(d / "a.svs", width=2000, height=1500, mpp=0.25, seed=3, positive=True)["path"],
            make_slide(d / "b.tif", width=1800, height=1300, mpp=0.5, seed=4)["path"]]


def test_pixels_identical_to_openslide(slides):
    rng = np.random.default_rng(0)
    for path in slides:
        with open_slide(path, reader="openslide") as s:
            assert all(s.decoder(lvl) == "tiled-jpeg-direct" for lvl in range(s.level_count))
            for lvl in range(s.level_count):
                W, H = s.level_dimensions[lvl]
                ds = s.level_downsamples[lvl]
                # The whole level read from the origin is exact in OpenSlide; pad it with white (glass).
                whole = np.full((H + 1200, W + 1200, 3), 255, np.uint8)
                whole[400:400 + H, 400:400 + W] = s.read_region(0, 0, lvl, W, H)
                for _ in range(15):  # random regions, including ones hanging over every edge
                    w, h = (int(v) for v in rng.integers(1, 600, 2))
                    x, y = int(rng.integers(-200, W + 50)), int(rng.integers(-200, H + 50))
                    fast = s.read_level_region(lvl, x, y, w, h)
                    assert fast.shape == (h, w, 3) and fast.dtype == np.uint8
                    np.testing.assert_array_equal(fast, whole[400 + y:400 + y + h, 400 + x:400 + x + w])
                    if ds == int(ds):  # integral downsample: OpenSlide's own region read agrees too
                        ref = s.read_region(round(x * ds), round(y * ds), lvl, w, h)
                        np.testing.assert_array_equal(fast, ref)


def test_non_jpeg_tiff_falls_back(tmp_path):
    p = tmp_path / "lzw.tif"
    img = np.random.default_rng(1).integers(0, 255, (512, 640, 3), dtype=np.uint8)
    tifffile.imwrite(p, img, tile=(256, 256), compression="zlib", photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    assert open_tiled_jpeg(p, [(640, 512)]) is None
    with open_slide(p) as s:
        assert s.decoder(0) == s.reader
        np.testing.assert_array_equal(s.read_level_region(0, 10, 20, 100, 50), img[20:70, 10:110])


def test_truncated_file_is_a_slide_error(tmp_path, slides):
    src = slides[0].read_bytes() if hasattr(slides[0], "read_bytes") else open(slides[0], "rb").read()
    p = tmp_path / "cut.svs"
    p.write_bytes(src)
    with open_slide(p) as s:
        W, H = s.level_dimensions[0]
        with open(p, "r+b") as fh:  # cut the file after the slide was opened: tile data is gone
            fh.truncate(len(src) // 3)
        with pytest.raises(SlideError) as exc:
            s.read_level_region(0, W // 2, H - 300, 256, 256)
        assert str(p) in str(exc.value)


def test_jpeg_segments_and_splicing():
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    import imagecodecs

    full = imagecodecs.jpeg8_encode(img, level=90)
    head, scan = jpeg_segments(full)
    assert [m for m, _ in head][:1] == [0xE0] and scan[:2] == b"\xff\xda" and scan[-2:] == b"\xff\xd9"
    tables = b"\xff\xd8" + b"".join(s for m, s in head if m in (0xDB, 0xC4)) + b"\xff\xd9"
    abbrev = b"\xff\xd8" + b"".join(s for m, s in head if m not in (0xDB, 0xC4)) + scan
    with pytest.raises(Exception):
        imagecodecs.jpeg8_decode(abbrev)  # no tables: not decodable on its own
    np.testing.assert_array_equal(imagecodecs.jpeg8_decode(standalone_jpeg(abbrev, tables)),
                                  imagecodecs.jpeg8_decode(full))
    rgb = standalone_jpeg(abbrev, tables, rgb=True)
    assert rgb.startswith(b"\xff\xd8" + ADOBE_RGB) and b"JFIF" not in rgb
    with pytest.raises(ValueError, match="SOI"):
        jpeg_segments(b"not a jpeg")


@pytest.mark.parametrize("kind", ["rgb", "ycbcr"])
def test_standalone_tiles_decode_like_openslide(abbreviated, image, kind):
    """Aperio layout: the direct reader equals OpenSlide, and the spliced standalone tile decodes to the
    same pixels with PIL and torchvision; an RGB-coded tile without the Adobe marker would not."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    with open_slide(abbreviated[kind], reader="openslide") as s:
        tiles = s.tiled_jpeg()
        assert tiles.levels[0].colorspace == ("RGB" if kind == "rgb" else "YCBCR")
        assert tiles.levels[0].tables
        np.testing.assert_array_equal(s.read_level_region(0, 0, 0, 900, 700), s.read_region(0, 0, 0, 900, 700))
        assert np.abs(s.read_level_region(0, 0, 0, 900, 700).astype(int) - image).mean() < 5  # right colours
        for tx, ty in ((0, 0), (1, 1), (3, 2)):
            ref = tiles._tile(0, tx, ty)
            data = tiles.standalone_tile(0, tx, ty)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), ref)
            t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), ref)
        if kind == "rgb":
            raw = standalone_jpeg(tiles.raw_tile(0, 1, 1), tiles.levels[0].tables, rgb=False)
            wrong = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(int)
            assert np.abs(wrong - tiles._tile(0, 1, 1)).mean() > 10  # read as YCbCr: wrong colours
