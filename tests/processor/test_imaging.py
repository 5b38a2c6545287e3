"""processor.imaging: geometry, orientation, formats, colour, metadata, speed paths, refusals."""

from __future__ import annotations

import re
from io import BytesIO

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageCms, ImageFile, JpegImagePlugin

from processor import imaging
from processor.errors import InvalidInput, Overloaded, TooLarge
from processor.headers import Header, open_image
from processor.imaging import Job, Limits, decode_size, fit_size, plan, process

LIMITS = Limits()
SHAPES = {"landscape": (300, 200), "portrait": (200, 300), "square": (250, 250)}
FIT_120x90 = {"landscape": (120, 80), "portrait": (60, 90), "square": (90, 90)}


def run(data: bytes, **job: object) -> imaging.Result:
    return process(data, Job(**job), LIMITS)  # type: ignore[arg-type]


# --- geometry -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", imaging.FIT_MODES)
def test_output_size_for_every_mode_and_shape(images, shape, mode):
    data = images.encode(images.photo(SHAPES[shape]), "JPEG")
    result = run(data, size=(120, 90), mode=mode)
    expected = FIT_120x90[shape] if mode == "fit" else (120, 90)
    out = images.decode(result.data)
    assert out.size == expected
    assert (result.geometry.output_width, result.geometry.output_height) == expected
    assert result.scaled and result.mode == mode


def test_fit_keeps_aspect_and_at_least_one_pixel():
    assert fit_size((4000, 10), (100, 100)) == (100, 1)
    assert fit_size((10, 4000), (100, 100)) == (1, 100)
    assert fit_size((50, 40), (1000, 1000)) == (1000, 800)  # fit also enlarges


def test_plan_pad_centres_the_content():
    geometry = plan((400, 200), Job(size=(100, 100), mode="pad"))
    assert geometry.content_size == (100, 50)
    assert (geometry.pad_x, geometry.pad_y) == (0, 25)
    assert geometry.crop_box == (0, 0, 400, 200)
    assert geometry.scale_x == geometry.scale_y == 0.25


def test_plan_fill_crops_the_centre():
    geometry = plan((400, 200), Job(size=(100, 100), mode="fill"))
    assert geometry.crop_box == (100, 0, 300, 200)
    assert (geometry.pad_x, geometry.pad_y) == (0, 0)
    assert geometry.scale_x == geometry.scale_y == 0.5
    assert geometry.to_output(100, 0) == (0, 0)
    assert geometry.to_output(300, 200) == (100, 100)


def test_plan_stretch_and_no_scaling():
    stretch = plan((400, 200), Job(size=(100, 100), mode="stretch"))
    assert (stretch.scale_x, stretch.scale_y) == (0.25, 0.5)
    same = plan((400, 200), Job(size=None), orientation=6)
    assert (same.output_width, same.output_height, same.scale_x, same.orientation) == (
        400,
        200,
        1.0,
        6,
    )


@pytest.mark.parametrize("mode", ["pad", "fill", "fit", "stretch"])
def test_a_mapped_point_lands_where_the_geometry_says(images, mode):
    """A dark dot at a known spot of the original is found at to_output() in the output."""
    original = Image.new("L", (400, 240), 255)
    dot = (250, 90)
    original.paste(0, (dot[0] - 6, dot[1] - 6, dot[0] + 6, dot[1] + 6))
    result = run(
        images.encode(original, "PNG"),
        size=(150, 150),
        mode=mode,
        format="png",
        pad_color=(255, 255, 255),
    )
    out = images.decode(result.data)
    found = _centroid_of_dark(out)
    expected = result.geometry.to_output(*dot)
    assert abs(found[0] - expected[0]) < 0.75 and abs(found[1] - expected[1]) < 0.75
    back = result.geometry.to_original(*found)
    assert abs(back[0] - dot[0]) < 2 and abs(back[1] - dot[1]) < 2


def test_mapped_point_through_orientation_dct_scaling_and_crop(images):
    """Orientation 6, a DCT-scaled decode (5/8) and a fill crop: the dot still maps exactly."""
    upright = Image.new("L", (240, 160), 255)
    dot = (150, 50)
    upright.paste(0, (dot[0] - 5, dot[1] - 5, dot[0] + 5, dot[1] + 5))
    stored = images.stored_for_orientation(upright, 6)
    data = images.encode(stored, "JPEG", quality=95, exif=images.exif(orientation=6))
    job = Job(size=(60, 60), mode="fill", format="png")
    image, header = _opened(data)
    _, factor = imaging._decode(data, image, header, job, plan(header.oriented_size, job))
    assert factor == 5 / 8
    result = process(data, job, LIMITS)
    assert result.geometry.crop_box == (40, 0, 200, 160)
    found = _centroid_of_dark(images.decode(result.data))
    expected = result.geometry.to_output(*dot)
    assert abs(found[0] - expected[0]) < 0.75 and abs(found[1] - expected[1]) < 0.75


def _centroid_of_dark(image: Image.Image) -> tuple[float, float]:
    weight = total_x = total_y = 0.0
    for y in range(image.height):
        for x in range(image.width):
            darkness = 255 - image.getpixel((x, y))
            if darkness > 40:
                weight += darkness
                total_x += darkness * (x + 0.5)
                total_y += darkness * (y + 0.5)
    return total_x / weight, total_y / weight


def test_pad_colour_fills_the_borders(images):
    data = images.encode(Image.new("RGB", (200, 100), (0, 0, 255)), "PNG")
    color = run(data, size=(100, 100), pad_color=(255, 0, 0), grayscale=False, format="png")
    out = images.decode(color.data)
    assert out.getpixel((50, 5)) == (255, 0, 0) and out.getpixel((50, 50)) == (0, 0, 255)
    gray = images.decode(run(data, size=(100, 100), pad_color=(255, 0, 0), format="png").data)
    assert gray.getpixel((50, 5)) == 76  # luma of pure red


# --- orientation ----------------------------------------------------------------------


def _assert_upright(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.size == size
    gray = image.convert("L")
    width, height = size
    samples = {
        "top-left": gray.getpixel((width // 6, height // 6)),
        "top-right": gray.getpixel((width - width // 6, height // 6)),
        "bottom-left": gray.getpixel((width // 6, height - height // 6)),
        "bottom-right": gray.getpixel((width - width // 6, height - height // 6)),
    }
    assert samples["top-left"] < 40, samples
    assert 90 < samples["top-right"] < 170, samples
    assert samples["bottom-left"] > 215 and samples["bottom-right"] > 215, samples


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [None, (48, 32)], ids=["unscaled", "scaled"])
def test_exif_orientations_come_out_upright(images, orientation, size):
    upright = images.upright_marker((96, 64))
    stored = images.stored_for_orientation(upright, orientation)
    data = images.encode(stored, "JPEG", quality=95, exif=images.exif(orientation=orientation))
    result = run(data, size=size, mode="stretch")
    _assert_upright(images.decode(result.data), size or (96, 64))
    assert result.geometry.orientation == orientation
    assert (result.geometry.original_width, result.geometry.original_height) == (96, 64)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_orientation_from_png_and_webp(images, fmt):
    stored = images.stored_for_orientation(images.upright_marker((96, 64)), 6)
    data = images.encode(stored.convert("RGB"), fmt, exif=images.exif(orientation=6))
    _assert_upright(images.decode(run(data, size=(48, 32)).data), (48, 32))


def test_decode_size_is_in_stored_coordinates_and_keeps_fill_resolution():
    rotated = Header("jpeg", 4000, 3000, orientation=6)  # shown as 3000x4000
    geometry = plan(rotated.oriented_size, Job(size=(300, 400), mode="pad"))
    assert decode_size(rotated, geometry) == (560, 420)  # 1.4 x (400, 300), stored axes
    wide = Header("jpeg", 4000, 1000)
    fill = plan(wide.oriented_size, Job(size=(100, 100), mode="fill"))
    width, height = decode_size(wide, fill)
    assert height >= 100 * imaging.DCT_MARGIN
    assert fill.crop_width * width / wide.width >= 100  # the kept region is still >= 100 px


# --- fast paths and quality -----------------------------------------------------------


def _opened(data: bytes) -> tuple[ImageFile.ImageFile, Header]:
    return open_image(data, LIMITS.max_bytes, LIMITS.max_pixels)


def test_dct_scaling_decodes_small_and_luma_only(seed_sample):
    image, header = _opened(seed_sample)
    geometry = plan(header.oriented_size, Job(size=(350, 329)))
    decoded, factor = imaging._decode(seed_sample, image, header, Job(size=(350, 329)), geometry)
    assert decoded.mode == "L"
    assert factor == 3 / 8  # 1400 * 3/8 = 525 >= 1.4 * 350
    assert decoded.size == (525, 494)


def test_pillow_draft_path_for_cmyk(images):
    cmyk = images.encode(images.photo((400, 300)).convert("CMYK"), "JPEG")
    image, header = _opened(cmyk)
    job = Job(size=(100, 75))
    decoded, factor = imaging._decode(cmyk, image, header, job, plan((400, 300), job))
    assert (decoded.mode, decoded.size, factor) == ("CMYK", (200, 150), 0.5)


@pytest.mark.parametrize("size", [(700, 658), (400, 376), (175, 165)])
def test_fast_path_psnr_against_full_resolution_lanczos(images, seed_sample, size):
    """Shrinking >= 2x in grayscale through DCT scaling stays close to the naive path.

    Reference: full decode, convert("L"), LANCZOS at full resolution. Both paths are JPEG
    encoded at q85. Floors: 35 dB absolute (q85 alone costs ~38-45 dB on this photo), and
    within 1.5 dB of the naive path (the performance issue's bar; measured <= 0.5 dB here).
    """
    reference = images.decode(seed_sample).convert("L").resize(size, Image.Resampling.LANCZOS)
    naive = images.decode(images.encode(reference, "JPEG", quality=85))
    fast = images.decode(run(seed_sample, size=size, mode="stretch", quality=85).data)
    assert fast.mode == "L" and fast.size == size
    fast_psnr, naive_psnr = images.psnr(fast, reference), images.psnr(naive, reference)
    assert fast_psnr >= 35
    assert fast_psnr >= naive_psnr - 1.5, (fast_psnr, naive_psnr)


def test_colour_fast_path_psnr(images, seed_sample):
    size = (400, 376)
    reference = images.decode(seed_sample).resize(size, Image.Resampling.LANCZOS)
    naive = images.decode(images.encode(reference, "JPEG", quality=85, subsampling="4:2:0"))
    fast = images.decode(run(seed_sample, size=size, mode="stretch", grayscale=False).data)
    assert fast.mode == "RGB"
    assert images.psnr(fast, reference) >= images.psnr(naive, reference) - 1.5


def test_progressive_jpeg_matches_baseline(images):
    photo = images.photo((320, 240))
    baseline = run(images.encode(photo, "JPEG", quality=95), size=(100, 75))
    progressive = run(images.encode(photo, "JPEG", quality=95, progressive=True), size=(100, 75))
    assert images.psnr(images.decode(baseline.data), images.decode(progressive.data)) > 40


# --- formats and modes ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
@pytest.mark.parametrize("out", ["jpeg", "png"])
def test_grayscale_gives_mode_l(images, fmt, out):
    data = images.encode(images.photo((120, 90)), fmt)
    result = run(data, size=(60, 45), format=out)
    decoded = images.decode(result.data)
    assert decoded.mode == "L" and decoded.format == out.upper()
    assert result.grayscale and result.color == imaging.COLOR_GRAY
    assert result.input_format == fmt.lower()


@pytest.mark.parametrize("out", ["jpeg", "png", "webp"])
def test_colour_output_formats(images, out):
    result = run(
        images.encode(images.photo((120, 90)), "PNG"), size=(60, 45), grayscale=False, format=out
    )
    decoded = images.decode(result.data)
    assert decoded.format == out.upper() and decoded.mode == "RGB"
    assert not result.grayscale and result.format == out


def test_webp_grayscale_is_gray_rgb(images):
    """WebP has no single-channel mode: gray comes out as equal R, G and B."""
    decoded = images.decode(run(images.encode(images.photo((80, 60)), "PNG"), format="webp").data)
    red, green, blue = decoded.split()
    assert ImageChops.difference(red, green).getextrema()[1] <= 4
    assert ImageChops.difference(red, blue).getextrema()[1] <= 4


def test_jpeg_encoding_quality_and_subsampling(images):
    data = images.encode(images.photo((200, 150)), "PNG")
    high = run(data, grayscale=False, quality=95)
    low = run(data, grayscale=False, quality=30)
    assert len(low.data) < len(high.data)
    decoded = images.decode(high.data)
    assert JpegImagePlugin.get_sampling(decoded) == 2  # 4:2:0
    assert "progressive" not in decoded.info


def test_sixteen_bit_png_mid_grey_stays_mid_grey(images):
    data = images.encode(Image.new("I;16", (64, 48), 32768), "PNG")
    assert images.decode(data).mode.startswith("I")
    gray = images.decode(run(data, format="png").data)
    assert gray.mode == "L" and 127 <= gray.getpixel((10, 10)) <= 128
    colour = images.decode(run(data, size=(32, 24), grayscale=False, format="png").data)
    assert all(127 <= value <= 128 for value in colour.getpixel((10, 10)))


@pytest.mark.parametrize("size", [None, (100, 75)], ids=["unscaled", "draft"])
def test_cmyk_jpeg_comes_out_right(images, size):
    """Pillow writes Adobe-inverted CMYK; pure C=0,M=255,Y=255 is red on screen."""
    cmyk = Image.new("CMYK", (400, 300), (0, 255, 255, 0))
    data = images.encode(cmyk, "JPEG", quality=95)
    assert images.decode(data).info.get("adobe")
    colour = images.decode(run(data, size=size, grayscale=False, format="png").data)
    red, green, blue = colour.getpixel((50, 50))
    assert red > 240 and green < 15 and blue < 15
    gray = images.decode(run(data, size=size, format="png").data)
    assert abs(gray.getpixel((50, 50)) - 76) <= 3


def test_mpo_gives_the_first_picture(images):
    first, second = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    data = images.encode(first, "MPO", save_all=True, append_images=[second])
    assert images.decode(data).format == "MPO"
    for job in ({"size": (32, 24), "grayscale": False}, {"grayscale": False}):
        decoded = images.decode(run(data, **job).data)
        assert decoded.format == "JPEG" and not getattr(decoded, "is_animated", False)
        red, _, blue = decoded.getpixel((10, 10))
        assert red > 200 and blue < 50


def test_animated_gif_gives_the_first_frame(images):
    first, second = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    data = images.encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    assert Image.open(BytesIO(data)).n_frames == 2
    decoded = images.decode(run(data, size=(32, 24), grayscale=False, format="png").data)
    assert decoded.getpixel((10, 10)) == (255, 0, 0)


def _half_transparent_palette_png(images) -> bytes:
    image = Image.new("P", (64, 48), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 32, 48))
    return images.encode(image, "PNG", transparency=0)


def test_palette_png_with_transparency_flattens_onto_white_for_jpeg(images):
    data = _half_transparent_palette_png(images)
    decoded = images.decode(run(data, grayscale=False).data)
    assert decoded.mode == "RGB"
    assert all(value > 245 for value in decoded.getpixel((8, 24)))
    red, green, _ = decoded.getpixel((56, 24))
    assert red > 180 and green < 60
    gray = images.decode(run(data, format="png").data)
    assert gray.mode == "L" and gray.getpixel((8, 24)) == 255


@pytest.mark.parametrize("mode", ["I;16", "1"])
def test_colour_key_transparency_of_16_and_1_bit_gray_flattens_onto_white(images, mode):
    """Columns: the key (transparent), a value near the key (opaque), a mid or white value."""
    if mode == "1":
        image = Image.new("1", (66, 48), 0)
        image.paste(1, (44, 0, 66, 48))
    else:
        pixels = np.zeros((48, 66), np.uint16)
        pixels[:, 22:44], pixels[:, 44:] = 200, 0x8080  # 200 and 0 are both 0 at 8 bits
        image = Image.fromarray(pixels)
    data = images.encode(image, "PNG", transparency=0)
    decoded = images.decode(run(data, size=(66, 48), format="jpeg").data)
    assert decoded.mode == "L"
    assert decoded.getpixel((8, 24)) > 245
    assert decoded.getpixel((56, 24)) > (245 if mode == "1" else 100)
    if mode != "1":
        assert decoded.getpixel((32, 24)) < 10
    for fmt in ("png", "webp"):  # colour output: flattened too, at the right size
        colour = images.decode(run(data, size=(33, 24), grayscale=False, format=fmt).data)
        assert colour.size == (33, 24) and min(colour.convert("L").getpixel((2, 12)), 250) == 250


def test_png_and_webp_output_keep_alpha(images):
    data = _half_transparent_palette_png(images)
    for fmt in ("png", "webp"):
        decoded = images.decode(run(data, size=(32, 24), grayscale=False, format=fmt).data)
        assert decoded.mode == "RGBA"
        assert decoded.getpixel((4, 12))[3] == 0 and decoded.getpixel((28, 12))[3] == 255


def test_rgba_and_la_png_flatten_onto_white(images):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (20, 0, 40, 40))
    for source in (rgba, rgba.convert("LA")):
        decoded = images.decode(run(images.encode(source, "PNG"), format="png").data)
        assert decoded.getpixel((5, 20)) == 255 and decoded.getpixel((35, 20)) == 0


def test_webp_and_one_bit_inputs(images):
    webp = images.encode(images.photo((80, 60)), "WEBP", quality=90)
    assert images.decode(run(webp, size=(40, 30)).data).size == (40, 30)
    bilevel = images.encode(images.photo((80, 60)).convert("1"), "PNG")
    assert images.decode(run(bilevel, size=(40, 30)).data).mode == "L"


# --- colour management and metadata -----------------------------------------------------


def test_non_srgb_profile_is_converted(images):
    data = images.encode(
        Image.new("RGB", (64, 48), (128, 128, 128)), "PNG", icc_profile=images.linear_rgb_profile()
    )
    result = run(data, size=(32, 24), grayscale=False, format="png")
    assert result.color == imaging.COLOR_CONVERTED
    assert all(abs(value - 188) <= 2 for value in images.decode(result.data).getpixel((5, 5)))


def test_srgb_profile_and_no_profile_are_kept_as_is(images):
    photo = Image.new("RGB", (64, 48), (128, 128, 128))
    for params in ({}, {"icc_profile": images.srgb_profile()}):
        result = run(
            images.encode(photo, "PNG", **params), size=(32, 24), grayscale=False, format="png"
        )
        assert result.color == imaging.COLOR_SRGB
        assert images.decode(result.data).getpixel((5, 5)) == (128, 128, 128)


def test_grayscale_drops_the_profile_knowingly(images):
    data = images.encode(
        Image.new("RGB", (64, 48), (128, 128, 128)), "PNG", icc_profile=images.linear_rgb_profile()
    )
    result = run(data, format="png")
    assert result.color == imaging.COLOR_GRAY
    assert images.decode(result.data).getpixel((5, 5)) == 128  # luma of the encoded values


def _tagged_jpeg(images, photo: Image.Image) -> bytes:
    return images.encode(
        photo,
        "JPEG",
        quality=90,
        exif=images.exif(make="SecretCam", model="GPS-42"),
        icc_profile=images.srgb_profile(),
        comment=b"secret comment",
        xmp=b"<x:xmpmeta xmlns:x='adobe:ns:meta/'>secret-xmp</x:xmpmeta>",
    )


@pytest.mark.parametrize(
    "job",
    [
        {"size": (64, 48)},
        {"size": (64, 48), "grayscale": False, "format": "png"},
        {},  # Pillow decode: the image still holds its info dict
        {"grayscale": False, "format": "png"},
        {"grayscale": False, "format": "webp"},
        {"grayscale": False},  # passthrough
    ],
    ids=["jpeg-dct", "png-dct", "jpeg", "png", "webp", "passthrough"],
)
def test_output_carries_no_metadata(images, job):
    data = _tagged_jpeg(images, images.photo((128, 96)))
    source = images.decode(data)
    assert {"exif", "icc_profile", "comment", "xmp"} <= set(source.info)
    result = run(data, **job)
    decoded = images.decode(result.data)
    assert not {"exif", "icc_profile", "comment", "xmp"} & set(decoded.info)
    assert not decoded.getexif()
    for secret in (b"SecretCam", b"GPS-42", b"secret comment", b"secret-xmp", b"Exif\x00"):
        assert secret not in result.data


def test_passthrough_keeps_entropy_data_bit_for_bit(images):
    data = _tagged_jpeg(images, images.photo((128, 96)))
    result = run(data, grayscale=False)
    assert result.passthrough and result.color == imaging.COLOR_SRGB and not result.scaled
    assert images.jpeg_scan_data(result.data) == images.jpeg_scan_data(data)
    assert len(result.data) < len(data)
    assert images.decode(result.data).tobytes() == images.decode(data).tobytes()
    assert b"Adobe" not in data or b"Adobe" in result.data


def test_passthrough_of_a_grayscale_jpeg(images):
    data = images.encode(images.photo((64, 48), "L"), "JPEG", exif=images.exif(make="Cam"))
    result = run(data)
    assert result.passthrough and result.grayscale and result.color == imaging.COLOR_GRAY
    assert images.jpeg_scan_data(result.data) == images.jpeg_scan_data(data)


@pytest.mark.parametrize(
    ("source", "job"),
    [
        ("rgb", {"grayscale": True}),  # needs luma conversion
        ("rgb", {"grayscale": False, "size": (128, 96)}),  # scaling asked
        ("rgb", {"grayscale": False, "format": "png"}),
        ("rgb-rotated", {"grayscale": False}),
        ("cmyk", {"grayscale": False}),
        ("linear-profile", {"grayscale": False}),
        ("gray", {"grayscale": False}),  # colour asked: always three channels out
    ],
)
def test_no_passthrough_when_pixels_must_change(images, source, job):
    photo = images.photo((128, 96))
    data = {
        "rgb": lambda: images.encode(photo, "JPEG"),
        "rgb-rotated": lambda: images.encode(photo, "JPEG", exif=images.exif(orientation=3)),
        "cmyk": lambda: images.encode(photo.convert("CMYK"), "JPEG"),
        "linear-profile": lambda: images.encode(
            photo, "JPEG", icc_profile=images.linear_rgb_profile()
        ),
        "gray": lambda: images.encode(photo.convert("L"), "JPEG"),
    }[source]()
    assert not run(data, **job).passthrough


def test_strip_jpeg_metadata_refuses_malformed_streams(images):
    data = images.encode(images.photo((64, 48)), "JPEG")
    assert imaging.strip_jpeg_metadata(data[: len(data) // 2]) is None
    assert imaging.strip_jpeg_metadata(b"\x89PNG") is None
    assert imaging.strip_jpeg_metadata(data[:2] + b"\xff\xe1\xff\xff") is None
    progressive = images.encode(images.photo((64, 48)), "JPEG", progressive=True)
    stripped = imaging.strip_jpeg_metadata(progressive)
    assert stripped is not None and stripped.count(b"\xff\xda") == progressive.count(b"\xff\xda")


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [None, (100, 75)], ids=["full", "dct"])
@pytest.mark.parametrize("grayscale", [True, False])
def test_truncated_jpeg_is_invalid(images, size, grayscale):
    data = images.encode(images.photo((400, 300)), "JPEG")
    with pytest.raises(InvalidInput, match=r"^corrupt or truncated image data$"):
        run(data[: len(data) * 2 // 3], size=size, grayscale=grayscale)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_truncated_other_formats_are_invalid(images, fmt):
    data = images.encode(images.photo((200, 150)), fmt)
    with pytest.raises(InvalidInput, match=r"^corrupt"):
        run(data[: len(data) * 2 // 3], size=(50, 40))


def test_corrupt_png_data_is_invalid(images):
    data = bytearray(images.encode(images.photo((100, 80)), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 40] = b"\x00" * 40
    with pytest.raises(InvalidInput, match=r"^corrupt or truncated image data$"):
        run(bytes(data))


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidInput, "empty image"),
        (b"\x00\x01garbage", InvalidInput, "unsupported or unrecognised image format"),
        (b"II*\x00\x08\x00\x00\x00", InvalidInput, "unsupported or unrecognised image format"),
    ],
)
def test_refusals_reach_process(data, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        run(data)


def test_bomb_is_refused_before_decoding(images):
    with pytest.raises(TooLarge, match=r"^image is 30000x30000 \(900 MP\)"):
        run(images.png_header_only(30000, 30000), size=(10, 10))


def test_byte_limit_reaches_process(images):
    data = images.encode(images.photo((64, 48)), "PNG")
    with pytest.raises(TooLarge, match=r"bytes; the limit is 1000$"):
        process(data, Job(), Limits(max_bytes=1000))


def test_output_size_is_bounded(images):
    data = images.encode(images.photo((64, 48)), "PNG")
    with pytest.raises(TooLarge, match=r"^output would be 20000x20000"):
        run(data, size=(20000, 20000))
    with pytest.raises(InvalidInput, match=r"^WEBP output is limited to 16383"):
        run(data, size=(20000, 10), mode="stretch", format="webp")


@pytest.mark.parametrize(
    "job",
    [
        {"mode": "crop"},
        {"format": "gif"},
        {"quality": 0},
        {"quality": 101},
        {"size": (0, 10)},
        {"pad_color": (0, 0, 256)},
    ],
)
def test_invalid_jobs_are_refused(job):
    with pytest.raises(InvalidInput):
        Job(**job)  # type: ignore[arg-type]


def test_limits_refuse_values_pillow_would_override():
    with pytest.raises(ValueError, match="Pillow"):
        Limits(max_pixels=Image.MAX_IMAGE_PIXELS + 1)
    with pytest.raises(ValueError):
        Limits(max_bytes=0)


def test_unexpected_errors_in_a_stage_become_invalid_input():
    with (
        pytest.raises(InvalidInput, match=r"transform failed: KeyError"),
        imaging._stage("transform"),
    ):
        raise KeyError("boom")
    with pytest.raises(Overloaded, match="out of memory during encode"), imaging._stage("encode"):
        raise MemoryError


def test_timings_are_reported(seed_sample):
    timings = run(seed_sample, size=(1024, 768)).timings
    assert timings.decode_ms > 0 and timings.transform_ms > 0 and timings.encode_ms > 0


def test_icc_profile_helpers_tolerate_garbage():
    assert imaging._profile(b"not a profile") is None
    assert imaging._to_srgb(Image.new("RGB", (2, 2)), b"garbage") is None
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    assert imaging._to_srgb(Image.new("RGB", (2, 2)), lab) is None  # wrong kind of profile
