"""Images against HF's PerceptionLMImageProcessor: pixels, RGB conversion, decoding, limits."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plm_core.media.errors import MediaError, describe_error
from plm_core.media.hashing import bytes_content_hash, pil_content_hash
from plm_core.media.image import decode_image
from plm_core.media.preprocess import preprocess_image
from plm_core.media.rgb import array_to_rgb_tensor, pil_to_rgb_tensor
from plm_core.media.settings import ImageSettings
from plm_core.media.tiling import num_image_tiles

SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")
SHARED_IMAGES = (
    sorted(p.name for p in SHARED_MEDIA.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if SHARED_MEDIA.is_dir()
    else []
)
NO_SHARED = f"shared test media not found at {SHARED_MEDIA} (only present in the project workspace)"
TOL = 1e-5


def shared_image_params():
    if not SHARED_IMAGES:
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_SHARED))]
    return SHARED_IMAGES


@functools.cache
def hf_processor(max_num_tiles: int = 36, vision_input_type: str = "thumb+tile"):
    from transformers import PerceptionLMImageProcessor

    # HF reads the tile budget from the instance (a per-call value is ignored): one per budget
    return PerceptionLMImageProcessor(
        max_num_tiles=max_num_tiles, vision_input_type=vision_input_type
    )


def hf_pixels(
    image, max_num_tiles: int = 36, vision_input_type: str = "thumb+tile"
) -> torch.Tensor:
    out = hf_processor(max_num_tiles, vision_input_type)(images=[image], return_tensors="pt")
    return out["pixel_values"][0]  # [N, 3, 448, 448]


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape, (ours.shape, ref.shape)
    assert (ours - ref).abs().max().item() <= TOL


def ours_from_pil(
    img: Image.Image, max_num_tiles: int = 36, vision_input_type: str = "thumb+tile", **kw
) -> torch.Tensor:
    settings = ImageSettings(448, max_num_tiles, vision_input_type)
    return preprocess_image(pil_to_rgb_tensor(img), settings, **kw)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    # smooth + noise so resampling has structure to get wrong
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], -1
    )
    noise = rng.integers(-40, 40, base.shape)
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# -- real files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", shared_image_params())
def test_shared_image_pixels_equal_hf(name):
    path = SHARED_MEDIA / name
    img = decode_image(path.read_bytes())
    ours = ours_from_pil(img)
    ref = hf_pixels(Image.open(path))
    assert_close(ours, ref)
    assert ours.shape[0] == num_image_tiles(*img.size, tile_size=448, max_num_tiles=36)


@pytest.mark.parametrize(
    "name", ["astronaut.png", "no_time_for_that_tiny.gif", "logo.png", "camera.png"]
)
@pytest.mark.parametrize("budget", [1, 4, 9])
def test_shared_image_tile_budgets_equal_hf(name, budget):
    if not SHARED_IMAGES:
        pytest.skip(NO_SHARED)
    path = SHARED_MEDIA / name
    img = decode_image(path.read_bytes())
    ours = ours_from_pil(img, budget)
    assert_close(ours, hf_pixels(Image.open(path), budget))
    assert ours.shape[0] == num_image_tiles(*img.size, tile_size=448, max_num_tiles=budget)


def test_shared_gif_is_first_frame_and_palette_converted():
    if not SHARED_IMAGES:
        pytest.skip(NO_SHARED)
    data = (SHARED_MEDIA / "no_time_for_that_tiny.gif").read_bytes()
    img = decode_image(data)
    assert img.size == (14, 25) and img.mode == "P" and getattr(img, "n_frames", 1) > 1
    first = Image.open(io.BytesIO(data))
    assert torch.equal(pil_to_rgb_tensor(img), pil_to_rgb_tensor(first))


# -- synthetic images: sizes, budgets, modes, arrays -----------------------------------------------

SIZES = [
    (1, 1),
    (14, 25),
    (25, 14),
    (4000, 50),
    (50, 4000),
    (448, 448),
    (896, 448),
    (448, 1344),
    (1344, 896),
    (449, 447),
    (3, 1000),
    (640, 480),
    (1920, 1080),
]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("budget", [1, 4, 9, 36])
def test_synthetic_pixels_equal_hf(size, budget):
    img = random_image(*size)
    ours = ours_from_pil(img, budget)
    assert_close(ours, hf_pixels(img, budget))
    assert ours.shape[0] == num_image_tiles(*size, tile_size=448, max_num_tiles=budget)


def test_large_exact_multiple_equals_hf():
    img = random_image(2688, 1344)  # exactly 6x3 tiles: the canvas resize is the identity
    assert_close(ours_from_pil(img), hf_pixels(img))


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "I;16", "F"]
)
def test_modes_equal_hf(mode):
    img = random_image(61, 37, mode=mode)
    if mode in ("LA", "RGBA", "PA"):  # give the alpha channel some real transparency
        bands = list(img.split())
        bands[-1] = Image.fromarray(np.tile(np.arange(61, dtype=np.uint8) * 4, (37, 1)))
        img = Image.merge(mode, bands)
    assert_close(ours_from_pil(img, 4), hf_pixels(img, 4))


def test_palette_with_transparency_is_composited_on_white():
    img = random_image(40, 30).convert("P")
    img.info["transparency"] = int(np.asarray(img)[0, 0])
    rgb = pil_to_rgb_tensor(img)
    assert rgb[:, 0, 0].tolist() == [255, 255, 255]
    assert_close(preprocess_image(rgb, ImageSettings(max_num_tiles=4)), hf_pixels(img, 4))


def test_unconvertible_mode_is_media_error():
    img = random_image(8, 8, mode="RGBA").convert("La")
    with pytest.raises(MediaError):
        pil_to_rgb_tensor(img)


@pytest.mark.parametrize(
    "layout", ["hwc3", "hwc4", "hw", "chw1", "hwc1", "chw3", "chw4", "ambiguous", "torch_chw"]
)
def test_arrays_equal_hf(layout):
    rng = np.random.default_rng(1)
    h, w = 37, 53
    arr = {
        "hwc3": lambda: rng.integers(0, 256, (h, w, 3)),
        "hwc4": lambda: rng.integers(0, 256, (h, w, 4)),
        "hw": lambda: rng.integers(0, 256, (h, w)),
        "chw1": lambda: rng.integers(0, 256, (1, h, w)),
        "hwc1": lambda: rng.integers(0, 256, (h, w, 1)),
        "chw3": lambda: rng.integers(0, 256, (3, h, w)),
        "chw4": lambda: rng.integers(0, 256, (4, h, w)),
        "ambiguous": lambda: rng.integers(0, 256, (3, 20, 4)),  # read as CHW, like HF
        "torch_chw": lambda: rng.integers(0, 256, (3, h, w)),
    }[layout]().astype(np.uint8)
    src = torch.from_numpy(arr) if layout == "torch_chw" else arr
    rgb = array_to_rgb_tensor(src)
    assert rgb.dtype == torch.uint8 and rgb.shape == (
        3,
        h if layout != "ambiguous" else 20,
        w if layout != "ambiguous" else 4,
    )
    # HF's batching rejects a bare 2-D array; its per-image code reads one as [1, H, W]
    hf_src = src[None] if layout == "hw" else src
    assert_close(preprocess_image(rgb, ImageSettings(max_num_tiles=4)), hf_pixels(hf_src, 4))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((5, 5, 2), np.uint8),
        np.zeros((5, 5, 3), np.float32),
        np.zeros((2, 5, 5, 3), np.uint8),
        np.zeros((5, 5, 7), np.uint8),
    ],
)
def test_bad_arrays_are_media_errors(bad):
    with pytest.raises(MediaError):
        array_to_rgb_tensor(bad)


def test_single_tile_input_type_equals_hf():
    img = random_image(500, 300)
    ours = ours_from_pil(img, 36, vision_input_type="vanilla")
    assert ours.shape == (1, 3, 448, 448)
    assert_close(ours, hf_pixels(img, 36, "vanilla"))
    assert (
        num_image_tiles(500, 300, tile_size=448, max_num_tiles=36, vision_input_type="vanilla") == 1
    )


def test_custom_mean_std_equals_hf():
    from transformers import PerceptionLMImageProcessor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    img = random_image(300, 200)
    hf = PerceptionLMImageProcessor(max_num_tiles=4, image_mean=list(mean), image_std=list(std))
    ref = hf(images=[img], return_tensors="pt")["pixel_values"][0]
    assert_close(ours_from_pil(img, 4, mean=mean, std=std), ref)


def test_one_thread_gives_the_same_pixels():
    img = random_image(700, 500)
    ref = ours_from_pil(img)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(ours_from_pil(img), ref)
    finally:
        torch.set_num_threads(threads)


def test_memory_layout_does_not_change_pixels():
    img = random_image(517, 389)
    rgb = pil_to_rgb_tensor(img)  # a channels-last view
    assert torch.equal(preprocess_image(rgb), preprocess_image(rgb.contiguous()))


def test_outputs_do_not_share_memory_while_alive():
    a_img, b_img = random_image(900, 700, seed=1), random_image(900, 700, seed=2)
    a = ours_from_pil(a_img)
    a_copy = a.clone()
    b = ours_from_pil(b_img)
    view = b[3:5]
    del b
    c = ours_from_pil(a_img)
    assert torch.equal(a, a_copy) and torch.equal(c, a_copy)
    assert not torch.equal(view, c[3:5])
    del a, c
    d = ours_from_pil(b_img)  # may reuse freed buffers; must still be right
    assert torch.equal(d[3:5], view)


def test_output_memory_is_recycled_once_released():
    img = random_image(900, 700)
    a = ours_from_pil(img)
    ptr, ref = a.data_ptr(), a.clone()
    del a
    b = ours_from_pil(img)
    assert b.data_ptr() == ptr and torch.equal(b, ref)
    c = ours_from_pil(img)  # b is alive: c must get other memory
    assert c.data_ptr() != b.data_ptr() and torch.equal(c, ref)


def test_preprocess_rejects_bad_input():
    with pytest.raises(MediaError):
        preprocess_image(torch.zeros((4, 8, 8), dtype=torch.uint8))
    with pytest.raises(MediaError):
        preprocess_image(torch.zeros((3, 8, 8), dtype=torch.float32))


# -- decoding and limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_decode_allowed_formats(fmt):
    img = random_image(33, 21)
    data = png_bytes(img, fmt)
    out = decode_image(data)
    assert out.size == (33, 21)
    assert torch.equal(pil_to_rgb_tensor(out), pil_to_rgb_tensor(Image.open(io.BytesIO(data))))


def test_decode_animated_gif_takes_first_frame():
    frames = [random_image(20, 10, seed=s).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    img = decode_image(buf.getvalue())
    ref = Image.open(io.BytesIO(buf.getvalue()))
    ref.seek(0)
    assert torch.equal(pil_to_rgb_tensor(img), pil_to_rgb_tensor(ref.convert("RGB")))


def test_decode_applies_exif_orientation():
    img = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = png_bytes(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (20, 40)
    assert decode_image(data, exif_transpose=False).size == (40, 20)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01\x02garbage" * 10,
        b"hello world",
        b"P6\n4 4\n255\n" + bytes(48),
        b"GIF89a" + b"\x00" * 5,
    ],
)
def test_decode_rejects_garbage(data):
    with pytest.raises(MediaError) as exc:
        decode_image(data)
    assert "\\x" not in str(exc.value) and "garbage" not in str(exc.value)


def test_decode_rejects_truncated_png():
    data = png_bytes(random_image(200, 200))
    with pytest.raises(MediaError, match="could not decode image"):
        decode_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # nowhere near enough data: decoding would have to fail
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_from_header():
    bomb = _png_header_only(100_000, 100_000)
    with pytest.raises(MediaError, match="too large"):
        decode_image(bomb)  # Pillow's own limit
    with pytest.raises(MediaError, match="over the limit"):
        decode_image(_png_header_only(5000, 5000), max_pixels=10_000_000)


def test_max_pixels_checked_before_decoding():
    data = png_bytes(random_image(300, 200))
    with pytest.raises(MediaError, match="300x200 = 60000 pixels, over the limit of 50000"):
        decode_image(data, max_pixels=50_000)
    assert decode_image(data, max_pixels=60_000).size == (300, 200)


# -- hashes ----------------------------------------------------------------------------------------


def test_content_hashes():
    data = png_bytes(random_image(10, 10))
    assert bytes_content_hash(data) == bytes_content_hash(bytes(data))
    assert len(bytes_content_hash(data)) == 64
    a = random_image(10, 10).convert("P")
    b = a.copy()
    assert pil_content_hash(a) == pil_content_hash(b)
    palette = b.getpalette()
    b.putpalette(palette[3:] + palette[:3])  # same indices, different colours
    assert pil_content_hash(a) != pil_content_hash(b)
    assert pil_content_hash(a.convert("RGB")) != pil_content_hash(a.convert("L"))


# -- limits: longest side, tile budget; plain error messages ---------------------------------------


def test_longest_side_checked_before_decoding():
    with pytest.raises(
        MediaError, match="image size 1x40000 has a side longer than the limit of 32768 pixels"
    ):
        # the default; decoding this would fail differently
        decode_image(_png_header_only(1, 40_000))
    with pytest.raises(
        MediaError, match="image size 40000x1 has a side longer than the limit of 32768"
    ):
        decode_image(_png_header_only(40_000, 1))
    with pytest.raises(
        MediaError, match="image size 300x20 has a side longer than the limit of 299"
    ):
        decode_image(png_bytes(random_image(300, 20)), max_side=299)
    assert decode_image(png_bytes(random_image(300, 20)), max_side=300).size == (300, 20)
    assert decode_image(png_bytes(Image.new("L", (1, 32768)))).size == (1, 32768)  # at the limit
    assert decode_image(png_bytes(Image.new("L", (1, 40_000))), max_side=None).size == (1, 40_000)


def test_elongated_image_at_the_side_limit_is_cheap_and_equals_hf():
    img = random_image(3, 5000)
    assert_close(ours_from_pil(img), hf_pixels(img))


@pytest.mark.parametrize(
    "data", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff" + bytes(10), b"GIF89a" + bytes(3)]
)
def test_unidentified_image_message_is_plain(data):
    with pytest.raises(MediaError) as exc:
        decode_image(data)
    text = str(exc.value)
    assert "0x" not in text and "BytesIO" not in text and "<" not in text, text
    assert text.startswith("could not decode image: not a valid ")


def test_describe_drops_errno_and_object_reprs():
    assert (
        describe_error(OSError("cannot identify image file <_io.BytesIO object at 0x7f406048e840>"))
        == "cannot identify image file"
    )
    err = OSError(1094995529, "Invalid data found when processing input", "<none>")
    assert describe_error(err) == "Invalid data found when processing input"
    assert describe_error(ValueError("[Errno 5] broken: '<none>'")) == "broken"
