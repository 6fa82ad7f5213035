"""Image files to 8-bit RGB (real files in every PIL mode), the decompression-bomb guard, and the
IMAGE check of AAA VAE Encode."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from aaa_core.cli import main
from aaa_core.errors import InputError
from aaa_core.images import MAX_SCALED_AREA, comfy_to_vae, open_rgb, pil_to_tensor, resize_cover
from node_helpers import errors, one_line_error
from pack_import import node
from test_training import argv
from tiny_models import save_tiny_models
from training.cache import EncodingCache, file_sha256
from training.config import parse_config
from training.pairs import load_image
from training.train import train

# --------------------------------------------------------------------------------------
# High bit depths: scaled to 8 bits, not clipped
# --------------------------------------------------------------------------------------

RAMP = np.linspace(0, 1, 1024).reshape(4, 256)  # 0..1 over four rows
EXPECTED_8_BIT = np.rint(RAMP * 255).astype(int)


def _ramp_file(tmp_path, kind: str):
    """A grayscale ramp from black to white written in one of PIL's high-bit-depth layouts."""
    if kind == "16-bit PNG":  # opens as I;16
        Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)).save(path := tmp_path / "ramp.png")
    elif kind == "16-bit big-endian TIFF":  # opens as I;16B
        Image.fromarray(np.rint(RAMP * 65535).astype(">u2")).save(path := tmp_path / "ramp.tif")
    elif kind == "16-bit PGM":  # opens as I
        Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)).save(path := tmp_path / "ramp.pgm")
    elif kind == "32-bit TIFF":  # opens as I, full signed 32-bit range
        Image.fromarray(np.rint(RAMP * (2**31 - 1)).astype(np.int32)).save(path := tmp_path / "ramp.tif")
    else:  # float TIFF, 0..1: opens as F
        Image.fromarray(RAMP.astype(np.float32)).save(path := tmp_path / "ramp.tif")
    return path


@pytest.mark.parametrize(
    "kind,mode",
    [("16-bit PNG", "I;16"), ("16-bit big-endian TIFF", "I;16B"), ("16-bit PGM", "I"), ("32-bit TIFF", "I"), ("float TIFF", "F")],
)
def test_high_bit_depth_grayscale_maps_to_the_matching_8_bit_ramp(tmp_path, kind, mode):
    path = _ramp_file(tmp_path, kind)
    with Image.open(path) as raw:
        assert raw.mode == mode
        clipped = np.array(raw.convert("RGB"))[..., 0]  # what convert("RGB") alone (and Load Image) gives
    pixels = np.array(open_rgb(path))
    assert pixels.shape == (4, 256, 3) and pixels.dtype == np.uint8
    assert (pixels == pixels[..., :1]).all()  # gray stays gray
    assert np.abs(pixels[..., 0].astype(int) - EXPECTED_8_BIT).max() <= 1
    assert not np.array_equal(clipped, pixels[..., 0])  # the plain conversion really is wrong here


def test_float_image_with_nan_is_refused_naming_the_file(tmp_path):
    values = RAMP.astype(np.float32)
    values[1, 7] = np.nan
    Image.fromarray(values).save(tmp_path / "depth.tif")
    with pytest.raises(InputError, match=r"depth\.tif: image holds NaN or infinite values \(F mode\)"):
        open_rgb(tmp_path / "depth.tif")


# --------------------------------------------------------------------------------------
# 8-bit modes: the pixels ComfyUI's Load Image gives
# --------------------------------------------------------------------------------------


def _comfyui_load_image_rgb(path) -> np.ndarray:
    """Load Image's rule for 8-bit files: EXIF transpose, then convert("RGB") (alpha dropped)."""
    with Image.open(path) as image:
        return np.array(ImageOps.exif_transpose(image).convert("RGB"))


def _mode_file(tmp_path, mode: str):
    rng = np.random.default_rng(0)
    if mode == "P+transparency":
        image = Image.fromarray(rng.integers(0, 4, (6, 5), dtype=np.uint8), "P")
        image.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200])
        image.save(path := tmp_path / "p.png", transparency=0)
    elif mode == "CMYK":
        Image.fromarray(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), "CMYK").save(path := tmp_path / "c.tif")
    elif mode in ("LA", "PA", "RGBA"):
        bands = {"LA": 2, "PA": 2, "RGBA": 4}[mode]
        image = Image.fromarray(rng.integers(0, 256, (6, 5, bands), dtype=np.uint8), "RGBA" if bands == 4 else "LA")
        if mode == "PA":
            image = image.convert("PA")
        image.save(path := tmp_path / f"{mode}.png" if mode != "PA" else tmp_path / "pa.webp", lossless=True)
    else:  # L and 1
        Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8), "L").convert(mode).save(path := tmp_path / f"{mode}.png")
    return path


@pytest.mark.parametrize("mode", ["P+transparency", "LA", "PA", "RGBA", "CMYK", "L", "1"])
def test_8_bit_modes_give_the_pixels_of_comfyui_load_image(tmp_path, mode):
    path = _mode_file(tmp_path, mode)
    pixels = np.array(open_rgb(path))
    assert pixels.shape == (6, 5, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, _comfyui_load_image_rgb(path))


def test_load_image_pixels_reach_the_vae_exactly_as_the_clis():
    """Every 8-bit level, scaled as Load Image does (p / 255), enters the VAE bit for bit as the
    CLI's pixels do, in a contiguous layout (a channels-last view takes other conv kernels)."""
    levels = np.arange(256, dtype=np.uint8)
    rows, cols = np.meshgrid(levels, levels, indexing="ij")
    rgb = np.stack([rows, cols, 255 - rows], -1)
    from_load_image = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
    ours = comfy_to_vae(from_load_image)
    assert ours.is_contiguous() and ours.shape == (1, 3, 256, 256)
    assert torch.equal(ours, pil_to_tensor(Image.fromarray(rgb)))


def test_alpha_is_dropped_keeping_the_colours_under_it(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[1, 1] = (10, 20, 30, 0)  # fully transparent, colour kept as Load Image keeps it
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sprite.png")
    pixels = np.array(open_rgb(tmp_path / "sprite.png"))
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[1, 1].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (255, 0, 0))
    image.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "photo.png", exif=exif)
    pixels = np.array(open_rgb(tmp_path / "photo.png"))
    assert pixels.shape == (2, 1, 3)  # portrait now
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[1, 0].tolist() == [0, 0, 255]


def test_16_bit_exif_rotated_image_is_rotated_and_scaled(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "wide.png", exif=exif)
    assert np.array(open_rgb(tmp_path / "wide.png"))[..., 0].tolist() == [[0], [255]]


# --------------------------------------------------------------------------------------
# Decompression bombs and merely large images
# --------------------------------------------------------------------------------------


@pytest.fixture
def small_pixel_limit(monkeypatch):
    """PIL warns above 100 pixels and refuses above 200."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)


def test_decompression_bomb_is_a_one_line_error_in_the_cli(tmp_path, capsys, monkeypatch, small_pixel_limit):
    Image.new("RGB", (30, 30)).save(tmp_path / "bomb.png")  # 900 pixels, over twice the limit
    with pytest.raises(InputError, match=r"bomb\.png: too large to open safely \(.*900 pixels.*\); downscale it"):
        open_rgb(tmp_path / "bomb.png")

    monkeypatch.chdir(tmp_path)  # the model files do not exist: the image is checked first
    code = main(["generate", "--prompt", "x", "--dit", "no-dit", "--vae", "no-vae", "--text-encoder", "no-te",
                 "--image", str(tmp_path / "bomb.png"), "--output", "out.png"])
    err = capsys.readouterr().err
    assert code == 1
    assert "bomb.png: too large to open safely" in err and err.count("\n") == 1
    assert not (tmp_path / "out.png").exists()


def test_large_image_under_the_bomb_limit_loads_with_one_log_line(tmp_path, caplog, small_pixel_limit):
    Image.new("RGB", (12, 10), (1, 2, 3)).save(tmp_path / "big.png")  # 120 pixels: PIL only warns
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pixels = np.array(open_rgb(tmp_path / "big.png"))
    assert pixels.shape == (10, 12, 3) and pixels[0, 0].tolist() == [1, 2, 3]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "big.png: 12x10 is a very large image" in messages[0]


def test_training_skips_a_bomb_by_name_and_reads_16_bit_images_scaled(tmp_path, caplog, monkeypatch):
    """The trainer reads files through the same rule: a 16-bit ramp gives the latent of its 8-bit twin."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)  # 32x32 loads quietly, 48x48 is refused
    models, data = save_tiny_models(tmp_path / "models"), tmp_path / "data"
    data.mkdir()
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(data / "deep.png")
    Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(data / "flat.png")
    Image.new("RGB", (48, 48)).save(data / "huge.png")
    for name in ("deep", "flat", "huge"):
        (data / f"{name}.txt").write_text(f"a {name} picture", encoding="utf-8")

    with caplog.at_level(logging.WARNING):
        summary = train(parse_config(argv(models, data, tmp_path / "run", "--max-steps", 1, cache=tmp_path / "cache")))
    assert [(s.name, s.reason.split(" (")[0]) for s in summary.skipped] == [("huge.png", "too large to open safely")]
    assert "skipped huge.png: too large to open safely" in caplog.text
    cache = EncodingCache(tmp_path / "cache", models["vae"], models["text_encoder"], 32, torch.float32)
    deep, flat = (cache.load("latents", cache.latent_key(file_sha256(data / f"{name}.png")), name) for name in ("deep", "flat"))
    torch.testing.assert_close(deep, flat, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# AAA VAE Encode: the IMAGE it is given
# --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("model_folders")
def test_vae_encode_divides_a_uint8_image_by_255(models):
    pixels = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    (as_uint8,) = node("AAAVAEEncode")(pixels, models.vae)
    (as_float,) = node("AAAVAEEncode")(pixels.float() / 255, models.vae)
    assert torch.equal(as_uint8["samples"], as_float["samples"])


@pytest.mark.usefixtures("model_folders")
@pytest.mark.parametrize(
    "pixels,message",
    [
        (torch.full((1, 32, 32, 3), 128.0), "pixels holds values from 128 to 128; an IMAGE holds 0..1"),
        (torch.full((1, 32, 32, 3), -0.5), "pixels holds values from -0.5 to -0.5; an IMAGE holds 0..1"),
        (torch.zeros(1, 32, 32, 3).index_fill_(1, torch.tensor([3]), float("nan")), "pixels holds 96 NaN or infinite values"),
        (torch.zeros(1, 32, 32, 3, dtype=torch.int32), "pixels has dtype torch.int32; an IMAGE holds floats in 0..1"),
        (torch.rand(1, 32, 32, 1), "pixels has shape (1, 32, 32, 1); its last dimension (channels) must be 3 (RGB) or 4 (RGBA, alpha is dropped)"),
        (torch.rand(32, 32, 3), "pixels must be an IMAGE of shape (batch, height, width, channels), got (32, 32, 3)"),
        (torch.rand(0, 32, 32, 3), "pixels is an empty batch"),
    ],
)
def test_vae_encode_refuses_bad_images_with_one_line(models, pixels, message):
    with pytest.raises(errors.InputError) as excinfo:
        node("AAAVAEEncode")(pixels, models.vae)
    assert message in one_line_error(excinfo)


@pytest.mark.usefixtures("model_folders")
def test_vae_encode_clamps_rounding_noise_just_outside_0_1(models):
    pixels = torch.rand(1, 32, 32, 3)
    noisy = pixels.clone()
    noisy[0, 0, 0] = torch.tensor([1.001, -0.001, 0.5])
    clean = noisy.clamp(0, 1)
    (a,) = node("AAAVAEEncode")(noisy, models.vae)
    (b,) = node("AAAVAEEncode")(clean, models.vae)
    assert torch.equal(a["samples"], b["samples"])


# --------------------------------------------------------------------------------------
# Resizing to cover: normal images keep their pixels, thin ones take no gigabytes
# --------------------------------------------------------------------------------------


def _scaled_then_cropped(image, width, height):
    """The reference's resize_cover (section 9): the whole image scaled to cover, then centre-cropped."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = int(round((resized.width - width) / 2.0)), int(round((resized.height - height) / 2.0))
    return resized.crop((left, top, left + width, top + height))


@pytest.mark.parametrize("size", [(32, 32), (40, 48), (640, 480), (1000, 63), (30, 120), (513, 257), (4000, 3000)])
@pytest.mark.parametrize("target", [(256, 256), (64, 32), (48, 16)])
def test_normal_images_keep_the_reference_pixels_exactly(size, target):
    """Every shape up to a 16:1 mismatch with the output (panoramas included), in both directions."""
    picture = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(resize_cover(picture, *target)), np.asarray(_scaled_then_cropped(picture, *target)))


def test_very_thin_images_are_cropped_before_scaling_and_keep_their_centre():
    column = Image.fromarray(np.linspace(0, 255, 20000).astype(np.uint8).reshape(20000, 1)).convert("RGB")  # a vertical ramp
    covered = np.asarray(resize_cover(column, 64, 64)).astype(int)
    reference = np.asarray(_scaled_then_cropped(column, 64, 64)).astype(int)  # 64x1,280,000 scaled: feasible here
    assert covered.shape == (64, 64, 3) and np.abs(covered - reference).max() <= 1  # one level at most
    assert np.all(covered == covered[:, :1])  # every row one value, as the source


def test_a_tiny_png_of_1x65535_pixels_does_not_allocate_gigabytes(tmp_path):
    """Covering 256x256 by scaling the whole image would take a 256x16,776,960 image (12 GB)."""
    path = tmp_path / "thin.png"
    Image.fromarray(np.linspace(0, 255, 65535).astype(np.uint8).reshape(65535, 1)).save(path, optimize=True)
    assert path.stat().st_size < 2000
    assert 256 * 65535 * 256 > MAX_SCALED_AREA * 256 * 256  # it takes the cropped path
    child = (  # under an address-space limit of 1 GiB above what the imports take: the old way fails with MemoryError
        "import resource, sys, torch\n"
        "from training.pairs import load_image\n"
        "size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))\n"
        "pixels = load_image(sys.argv[1], 256, 256, torch.float32)\n"
        "print(tuple(pixels.shape), round(float(pixels.mean()), 2))\n"
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("the address-space limit is read from /proc")
    result = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    shape, mean = result.stdout.rsplit(" ", 1)
    assert shape == "(3, 256, 256)" and abs(float(mean)) < 0.02  # the ramp's middle: grey, 0 in [-1, 1]
    assert load_image(path, 32, 32, torch.float32).shape == (3, 32, 32)
