"""JPEG output goes through simplejpeg (it releases the GIL); it must match Pillow's encoder."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from processor import imaging


def psnr(encoded: bytes, reference: Image.Image) -> float:
    with Image.open(BytesIO(encoded)) as out:
        decoded = np.asarray(out.convert(reference.mode), dtype=np.float64)
    error = np.mean((decoded - np.asarray(reference, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255**2 / error))


@pytest.mark.parametrize(("mode", "layers"), [("L", 1), ("RGB", 3)])
@pytest.mark.parametrize("quality", [60, 85])
def test_jpeg_output_matches_pillows_encoder(images, mode, layers, quality):
    source = images.photo((320, 240)).convert(mode)
    ours = imaging._encode_jpeg(source, quality)
    pillows = images.encode(source, "JPEG", quality=quality, subsampling=imaging.JPEG_SUBSAMPLING)
    assert abs(psnr(ours, source) - psnr(pillows, source)) < 0.3
    assert 0.9 < len(ours) / len(pillows) < 1.1
    with Image.open(BytesIO(ours)) as out:
        assert (out.format, out.mode, out.size) == ("JPEG", mode, (320, 240))
        assert len(out.layer) == layers
        if mode == "RGB":  # 4:2:0: luma sampled 2x2, chroma 1x1
            assert [sampling[1:3] for sampling in out.layer] == [(2, 2), (1, 1), (1, 1)]
        assert not {"exif", "icc_profile", "comment", "dpi"} & set(out.info)


def test_other_modes_still_encode_through_pillow(images):
    cmyk = images.photo((64, 48)).convert("CMYK")
    job = imaging.Job(size=None, grayscale=False, format="jpeg", quality=85)
    with Image.open(BytesIO(imaging._encode(cmyk, job))) as out:
        assert out.mode == "CMYK"
