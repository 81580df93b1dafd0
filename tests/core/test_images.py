"""Tests for core.images: the upload corpus, the shared resize, bounds, and a fuzz of hostile bytes."""

from __future__ import annotations

import contextlib
import io
import os
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

from core.errors import ImageDecodeError
from core.images import (
    SUPPORTED_FORMATS,
    DecodedImage,
    center_crop_resize,
    decode_upload,
    load_image_file,
)
from tests.bounded import run_bounded
from tests.hostile_files import float_tiff, jpeg_cut_short, jpeg_with_patched_size
from tests.upload_corpus import UploadCase, build_upload_corpus, encode, png_declaring_size

CORPUS = build_upload_corpus()


@pytest.fixture(scope="module")
def corpus() -> dict[str, UploadCase]:
    return {case.name: case for case in CORPUS}


def test_corpus_is_large_and_covers_both_outcomes():
    names = [case.name for case in CORPUS]
    assert len(names) == len(set(names))
    assert len(CORPUS) >= 18
    assert {case.expect for case in CORPUS} == {"ok", "error"}


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_upload_corpus(case: UploadCase):
    if case.expect == "error":
        with pytest.raises(ImageDecodeError) as info:
            decode_upload(case.data, **case.decode_kwargs)
        message = str(info.value)
        # A message a user can act on: a sentence, not a bare exception name.
        assert len(message) > 30 and message[0].isupper(), message
        if case.message_contains:
            assert case.message_contains in message.lower(), message
        return
    decoded = decode_upload(case.data, **case.decode_kwargs)
    assert isinstance(decoded, DecodedImage)
    assert decoded.image.shape == case.target_shape
    assert decoded.image.dtype == np.uint8
    assert not decoded.image.flags.writeable
    assert decoded.format in SUPPORTED_FORMATS
    if case.check is not None:
        case.check(decoded)


@pytest.mark.parametrize("name", ["png_bomb_100000x100000", "png_declares_8000x8000"])
def test_declared_huge_images_are_refused_without_allocating(corpus, name):
    # 100000² or 8000² pixels would be gigabytes / 64 MB; refusal must come from the header alone.
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError):
            decode_upload(corpus[name].data, **corpus[name].decode_kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, f"peak {peak} bytes"


def test_pixel_limit_is_the_callers():
    data = png_declaring_size(300, 300)
    with pytest.raises(ImageDecodeError, match="megapixel"):
        decode_upload(data, target_shape=(28, 28, 1), light_on_dark=True, max_pixels=50_000)


def test_byte_limit_is_checked_before_decoding():
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(ImageDecodeError, match="limit"):
        decode_upload(data, target_shape=(8, 8, 3), light_on_dark=False, max_bytes=len(data) - 1)
    assert decode_upload(data, target_shape=(8, 8, 3), light_on_dark=False, max_bytes=len(data))


def test_non_bytes_input_is_a_decode_error():
    with pytest.raises(ImageDecodeError):
        decode_upload("not bytes", target_shape=(8, 8, 1), light_on_dark=True)  # type: ignore[arg-type]


def test_bytearray_and_memoryview_are_accepted():
    data = encode(Image.new("L", (10, 10), 7), "PNG")
    for wrapped in (bytearray(data), memoryview(data)):
        decoded = decode_upload(wrapped, target_shape=(10, 10, 1), light_on_dark=False)
        assert int(decoded.image.max()) == 7


@pytest.mark.parametrize("bad_shape", [(28, 28), (28, 28, 2), (0, 28, 1), "28x28"])
def test_invalid_target_shape_is_a_programming_error(bad_shape):
    data = encode(Image.new("L", (4, 4)), "PNG")
    with pytest.raises(ValueError, match="target_shape"):
        decode_upload(data, target_shape=bad_shape, light_on_dark=False)  # type: ignore[arg-type]


def test_exact_size_image_is_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    decoded = decode_upload(
        encode(Image.fromarray(pixels), "PNG"), target_shape=(28, 28, 1), light_on_dark=False
    )
    np.testing.assert_array_equal(decoded.image[..., 0], pixels)
    assert decoded.notes == ()
    assert decoded.original_size == (28, 28) and decoded.original_mode == "L"


def test_grayscale_to_rgb_and_rgb_to_grayscale():
    gray = encode(Image.new("L", (16, 16), 90), "PNG")
    rgb = decode_upload(gray, target_shape=(16, 16, 3), light_on_dark=False)
    assert rgb.image.shape == (16, 16, 3) and np.all(rgb.image == 90)
    colour = encode(Image.new("RGB", (16, 16), (255, 0, 0)), "PNG")
    luma = decode_upload(colour, target_shape=(16, 16, 1), light_on_dark=False)
    assert np.all(luma.image == 76)  # ITU-R 601 luma of pure red: 0.299 * 255


def test_transparency_is_white_for_photo_datasets():
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[5:15, 5:15] = (0, 0, 0, 255)
    decoded = decode_upload(
        encode(Image.fromarray(rgba, "RGBA"), "PNG"), target_shape=(20, 20, 3), light_on_dark=False
    )
    assert np.all(decoded.image[0, 0] == 255) and np.all(decoded.image[10, 10] == 0)


def test_light_cutout_goes_onto_black_and_is_not_inverted():
    # A white shirt on transparency, light-on-dark target: it must stay visible (light on black).
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[5:15, 5:15] = (250, 250, 250, 255)
    decoded = decode_upload(
        encode(Image.fromarray(rgba, "RGBA"), "PNG"), target_shape=(20, 20, 1), light_on_dark=True
    )
    assert decoded.image[0, 0, 0] == 0 and decoded.image[10, 10, 0] == 250
    assert not any("inverted" in note for note in decoded.notes)


class TestCenterCropResize:
    def test_wide_image_keeps_its_centre(self):
        # 90×30 with left third black, middle white, right black: a square crop is the white middle.
        pixels = np.zeros((30, 90), dtype=np.uint8)
        pixels[:, 30:60] = 255
        out = np.asarray(center_crop_resize(Image.fromarray(pixels), 10, 10))
        # The filter's support reaches a little past the crop box (as in ImageOps.fit), so the
        # outermost columns are slightly darker; the black thirds are nonetheless cropped away.
        assert out.shape == (10, 10) and out.min() > 230 and out[:, 1:-1].min() > 250

    def test_tall_image_keeps_its_centre(self):
        pixels = np.zeros((90, 30), dtype=np.uint8)
        pixels[30:60] = 255
        out = np.asarray(center_crop_resize(Image.fromarray(pixels), 10, 10))
        assert out.min() > 230 and out[1:-1].min() > 250

    def test_non_square_target(self):
        img = Image.new("RGB", (100, 100), (10, 20, 30))
        out = center_crop_resize(img, 20, 40)
        assert out.size == (40, 20) and out.getpixel((0, 0)) == (10, 20, 30)

    def test_downscale_is_antialiased(self):
        # A one-pixel checkerboard must average to grey, not alias to black or white stripes.
        pixels = (np.indices((280, 280)).sum(axis=0) % 2 * 255).astype(np.uint8)
        out = np.asarray(center_crop_resize(Image.fromarray(pixels), 28, 28)).astype(int)
        assert np.all(np.abs(out - 127.5) < 10), out

    def test_upscale(self):
        out = center_crop_resize(Image.new("L", (3, 3), 200), 28, 28)
        assert out.size == (28, 28) and np.all(np.asarray(out) == 200)


def test_load_image_file(tmp_path):
    path = tmp_path / "shirt.png"
    path.write_bytes(encode(Image.new("L", (30, 30), 20), "PNG"))
    decoded = load_image_file(path, target_shape=(28, 28, 1), light_on_dark=True)
    assert decoded.image.shape == (28, 28, 1)


def test_load_image_file_errors_name_the_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="No file"):
        load_image_file(tmp_path / "missing.png", target_shape=(8, 8, 1), light_on_dark=True)
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image_file(tmp_path, target_shape=(8, 8, 1), light_on_dark=True)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageDecodeError, match=r"bad\.png"):
        load_image_file(bad, target_shape=(8, 8, 1), light_on_dark=True)
    big = tmp_path / "big.png"
    big.write_bytes(bytes(2000))
    with pytest.raises(ImageDecodeError, match="limit"):
        load_image_file(big, target_shape=(8, 8, 1), light_on_dark=True, max_bytes=1000)


# --- fuzz ----------------------------------------------------------------------------------------


def _mutations(seed_data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    """Bit flips, byte overwrites, truncations, insertions, deletions and splices of valid files."""
    out = []
    for _ in range(count):
        data = bytearray(seed_data)
        kind = rng.integers(0, 6)
        if kind == 0:  # flip a few bits, mostly in the header where parsers decide things
            for _ in range(rng.integers(1, 8)):
                pos = int(rng.integers(0, min(len(data), 64 if rng.random() < 0.7 else len(data))))
                data[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # overwrite a run with random bytes
            pos = int(rng.integers(0, len(data)))
            run = rng.bytes(int(rng.integers(1, 32)))
            data[pos : pos + len(run)] = run
        elif kind == 2:  # truncate
            data = data[: int(rng.integers(1, len(data)))]
        elif kind == 3:  # insert random bytes
            pos = int(rng.integers(0, len(data)))
            data[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
        elif kind == 4:  # delete a run
            pos = int(rng.integers(0, len(data)))
            del data[pos : pos + int(rng.integers(1, 64))]
        else:  # keep the header, replace the rest
            keep = int(rng.integers(8, max(9, min(len(data), 200))))
            data = data[:keep] + rng.bytes(int(rng.integers(0, 512)))
        out.append(bytes(data))
    return out


def _fuzz_inputs() -> list[bytes]:
    rng = np.random.default_rng(20240229)
    small = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    seeds = [
        encode(small, "PNG"),
        encode(small.convert("L"), "PNG"),
        encode(small.convert("RGBA"), "PNG"),
        encode(small, "JPEG", quality=80),
        encode(small, "JPEG", quality=80, progressive=True),
        encode(small, "WEBP"),
        encode(small, "WEBP", lossless=True),
        encode(small, "BMP"),
        encode(small.convert("P"), "GIF"),
        encode(small, "TIFF"),
        encode(small, "TIFF", compression="tiff_deflate"),
        encode(small.convert("CMYK"), "JPEG"),
    ]
    seeds += [case.data for case in CORPUS if case.expect == "ok" and len(case.data) < 50_000]
    inputs = [rng.bytes(int(n)) for n in rng.integers(1, 2048, size=40)]
    # Valid magic numbers followed by noise reach deeper into each parser than pure noise.
    magics = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*"]
    inputs += [m + rng.bytes(int(rng.integers(0, 300))) for m in magics for _ in range(5)]
    inputs += [b"RIFF" + rng.bytes(4) + b"WEBPVP8 " + rng.bytes(200) for _ in range(5)]
    for seed_data in seeds:
        inputs += _mutations(seed_data, rng, 18)
    return inputs


@pytest.mark.parametrize("warnings_mode", ["ignore", "error"])
def test_fuzz_only_decode_errors_escape(warnings_mode):
    # Pillow warns (UserWarning) about some corrupt metadata; under "error" (python -W error, or a
    # strict pytest config) those warnings become exceptions, and must still surface only as
    # ImageDecodeError.
    inputs = _fuzz_inputs()
    assert len(inputs) > 500
    outcomes = {"ok": 0, "error": 0}
    with warnings.catch_warnings():
        warnings.simplefilter(warnings_mode)
        _decode_all(inputs, outcomes)
    # Both branches are exercised: some mutations still decode (e.g. flipped pixel data).
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes


def _decode_all(inputs: list[bytes], outcomes: dict[str, int]) -> None:
    for data in inputs:
        for light_on_dark, shape in ((True, (28, 28, 1)), (False, (16, 16, 3))):
            try:
                decoded = decode_upload(
                    data, target_shape=shape, light_on_dark=light_on_dark, max_pixels=2_000_000
                )
            except ImageDecodeError as exc:
                assert str(exc)
                outcomes["error"] += 1
            else:
                assert decoded.image.shape == shape and decoded.image.dtype == np.uint8
                outcomes["ok"] += 1


def test_decoding_does_not_change_pillow_globals():
    from PIL import ImageFile

    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    for case in CORPUS:
        with contextlib.suppress(ImageDecodeError):
            decode_upload(case.data, **case.decode_kwargs)
    assert before == (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    assert before[0] is False


def test_mpo_multi_picture_jpeg_reads_as_jpeg():
    first = Image.new("RGB", (20, 20), (200, 200, 200))
    second = Image.new("RGB", (20, 20), (0, 0, 0))
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    decoded = decode_upload(buffer.getvalue(), target_shape=(20, 20, 3), light_on_dark=False)
    assert decoded.format == "JPEG"
    assert decoded.image.mean() > 150


def test_large_jpeg_fast_path_matches_full_decode():
    # A 1600×1200 photo with EXIF orientation 6, to a 28×28 target: decoded at reduced JPEG scale,
    # it must still be rotated correctly and be visually the same as a full-size decode.
    from PIL import ImageOps

    pixels = np.zeros((1200, 1600, 3), dtype=np.uint8)
    pixels[100:500, 500:700] = 255  # left of centre, top: after rotating 90° clockwise, top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", quality=90, exif=exif)
    decoded = decode_upload(data, target_shape=(28, 28, 1), light_on_dark=False)
    assert any("reduced scale" in note for note in decoded.notes), decoded.notes

    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("L"))
    reference = np.asarray(center_crop_resize(full, 28, 28), dtype=int)
    difference = np.abs(reference - decoded.image[..., 0].astype(int))
    assert difference.mean() < 2 and difference.max() < 40, (difference.mean(), difference.max())
    assert decoded.image[:14, 14:].mean() > 3 * decoded.image[:14, :14].mean()


# --- files built to make the decoder work or allocate without bound ------------------------------
# Each runs in a separate, limited process (tests/bounded.py): before these fixes they hung the
# decoder for minutes or took gigabytes, which must fail a test, not the machine.


def test_jpeg_scan_bomb_is_refused_in_a_fraction_of_a_second():
    # 9.5 MB, 170,000 progressive scans over a 36-megapixel image: 11 minutes of CPU before.
    run = run_bounded(
        """
        from core.errors import ImageDecodeError
        from core.images import decode_upload
        from tests.hostile_files import jpeg_scan_bomb
        data = jpeg_scan_bomb()
        try:
            decode_upload(data, target_shape=(28, 28, 1), light_on_dark=True)
            outcome = "decoded"
        except ImageDecodeError as exc:
            outcome = str(exc)
        report(outcome=outcome, size=len(data))
        """,
        timeout=30,
    )
    assert not run.timed_out, "the scan bomb was still being decoded after 30 s"
    assert run.result is not None, run.output
    assert run.result["size"] > 9 * 2**20
    assert "more than 100 scans" in run.result["outcome"]
    # Python, numpy, Pillow and the worker's start-up included; the refusal itself takes ~0.1 s.
    assert run.result["cpu"] < 5, run.result


@pytest.mark.parametrize("kind", ["png16", "tiff_float32", "tiff_int32", "tiff_uint16"])
def test_high_bit_depth_40_megapixels_decode_in_bounded_memory(kind):
    # A 90-200 KB file of 40 megapixels: 1.34-1.41 GB of peak memory before, ~0.25 GB now.
    run = run_bounded(
        f"""
        warm_up()
        from core.images import decode_upload
        from tests.hostile_files import png16_gradient, tiff_gradient
        kind = {kind!r}
        data = png16_gradient() if kind == "png16" else tiff_gradient(sample=kind[5:])
        decoded = decode_upload(data, target_shape=(28, 28, 1), light_on_dark=False)
        report(size=len(data), notes=list(decoded.notes), shape=list(decoded.image.shape))
        """,
        timeout=60,
    )
    assert run.result is not None, run.output
    assert run.result["size"] < 250_000 and run.result["shape"] == [28, 28, 1]
    assert "resized from 6324×6324 to 28×28" in run.result["notes"]
    assert run.result["peak_rss"] < 512 * 2**20, f"peak {run.result['peak_rss'] / 2**20:.0f} MB"


def test_high_bit_depth_scaling_is_unchanged_by_working_in_bands():
    # Band-by-band conversion must give exactly the pixels of the whole-image arithmetic.
    rng = np.random.default_rng(5)
    values = rng.integers(-70_000, 70_000, (1100, 1000), dtype=np.int32)
    decoded = decode_upload(
        encode(Image.fromarray(values), "TIFF"), target_shape=(1100, 1000, 1), light_on_dark=False
    )
    lo, hi = int(values.min()), int(values.max())
    expected = np.clip(np.rint((values.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255)
    np.testing.assert_array_equal(decoded.image[..., 0], expected.astype(np.uint8))


@pytest.mark.parametrize(
    ("values", "count"),
    [
        (np.full((64, 64), np.nan), "4,096"),
        (np.where(np.eye(64) > 0, np.inf, 0.5), "64"),
        (np.where(np.eye(64) > 0, -np.inf, 300.0), "64"),
    ],
    ids=["all_nan", "some_inf", "some_minus_inf"],
)
def test_nan_and_infinite_pixels_are_refused(values, count):
    # They used to become 0: an all-NaN file was explained as a blank image.
    with pytest.raises(ImageDecodeError, match=f"{count} NaN or infinite pixel values"):
        decode_upload(float_tiff(values), target_shape=(28, 28, 1), light_on_dark=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (jpeg_with_patched_size(4000, 4000), "declares 4000×4000 pixels but holds too little"),
        (jpeg_with_patched_size(64, 80), "ends before the image does"),
        (jpeg_cut_short(0.5), "ends before the image does"),
        (jpeg_cut_short(0.9), "ends before the image does"),
    ],
    ids=["size_patched_far", "size_patched_near", "cut_at_half", "cut_at_90_percent"],
)
def test_jpeg_whose_data_ends_early_is_refused_not_shown_grey(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_upload(data, target_shape=(28, 28, 3), light_on_dark=False)


@pytest.mark.parametrize(
    "options", [{}, {"progressive": True}, {"optimize": True}, {"quality": 100}]
)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_flat_mid_grey_jpeg_is_not_mistaken_for_a_cut_short_one(mode, options):
    # Exactly 128 everywhere is what missing data decodes to; a genuine grey image must pass.
    data = encode(Image.new(mode, (600, 400), (128,) * len(mode)), "JPEG", **options)
    decoded = decode_upload(data, target_shape=(28, 28, 3), light_on_dark=False)
    assert decoded.image.shape == (28, 28, 3)


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        ("jpeg_segment_flood", "more than 2,000 marker segments"),
        ("png_chunk_flood", "more than 100,000 chunks"),
        ("tiff_page_chain", "decoded: first page of a multi-page TIFF"),
    ],
)
def test_files_that_made_pillow_parse_for_seconds_cost_a_fraction(builder, expected):
    # ~10 MB each: 4 s (COM segments), 4.7 s (PNG chunks) and 100 s (95,000 TIFF pages) before.
    run = run_bounded(
        f"""
        from core.errors import ImageDecodeError
        from core.images import decode_upload
        from tests import hostile_files
        data = hostile_files.{builder}()
        try:
            decoded = decode_upload(data, target_shape=(28, 28, 1), light_on_dark=True)
            outcome = "decoded: " + "; ".join(decoded.notes)
        except ImageDecodeError as exc:
            outcome = str(exc)
        report(outcome=outcome, size=len(data))
        """,
        timeout=30,
    )
    assert not run.timed_out and run.result is not None, run.output
    assert run.result["size"] > 9 * 2**20
    assert expected in run.result["outcome"]
    assert run.result["cpu"] < 5, run.result


def test_a_decode_past_its_cpu_budget_is_stopped_with_a_message():
    # A slow file no structure check catches: 100 scans (the limit) of 169 megapixels. The worker's
    # CPU budget is lowered to 1 s for the test; the kernel stops it there.
    run = run_bounded(
        """
        from core import decode_worker
        from core.errors import ImageDecodeError
        from core.images import decode_upload
        from tests.hostile_files import jpeg_scan_bomb
        decode_worker.DecodeBudget.for_pixels = classmethod(lambda cls, pixels: cls(cpu_seconds=1))
        data = jpeg_scan_bomb(13000, 13000, 99)  # and one DC scan: 100
        try:
            decode_upload(data, target_shape=(28, 28, 1), light_on_dark=True,
                          max_pixels=200_000_000)
            outcome = "decoded"
        except ImageDecodeError as exc:
            outcome = str(exc)
        # The next file gets a fresh worker.
        warm_up()
        report(outcome=outcome)
        """,
        timeout=60,
    )
    assert run.result is not None, run.output
    assert "needed more than 1 s of processor time" in run.result["outcome"]
    assert run.result["cpu"] < 10, run.result


def test_in_a_batch_a_file_that_kills_its_worker_costs_only_itself():
    # Dataset folders are decoded in batches; each file keeps its own budget.
    run = run_bounded(
        """
        import io
        from PIL import Image
        from core import decode_worker
        from core.errors import ImageDecodeError
        from core.images import decode_uploads
        from tests.hostile_files import jpeg_scan_bomb
        decode_worker.DecodeBudget.for_pixels = classmethod(lambda cls, pixels: cls(cpu_seconds=1))
        def png(value):
            buffer = io.BytesIO()
            Image.new("L", (8, 8), value).save(buffer, "PNG")
            return buffer.getvalue()
        files = [png(10), jpeg_scan_bomb(13000, 13000, 99), b"", png(20), png(30)]
        results = decode_uploads(files, target_shape=(8, 8, 1), light_on_dark=False,
                                 max_pixels=200_000_000)
        report(outcomes=[str(r) if isinstance(r, ImageDecodeError) else int(r.image.max())
                         for r in results])
        """,
        timeout=60,
    )
    assert run.result is not None, run.output
    first, bomb, empty, *rest = run.result["outcomes"]
    assert first == 10 and rest == [20, 30]
    assert "processor time" in bomb and "empty" in empty


def test_a_decode_past_its_memory_budget_is_refused_with_a_message():
    run = run_bounded(
        """
        from core import decode_worker
        from core.errors import ImageDecodeError
        from core.images import decode_upload
        from tests.hostile_files import png16_gradient
        decode_worker.DecodeBudget.for_pixels = classmethod(
            lambda cls, pixels: cls(memory_bytes=32 * 2**20)
        )
        try:
            decode_upload(png16_gradient(), target_shape=(28, 28, 1), light_on_dark=True)
            outcome = "decoded"
        except ImageDecodeError as exc:
            outcome = str(exc)
        report(outcome=outcome)
        """,
        timeout=60,
    )
    assert run.result is not None, run.output
    assert "more memory" in run.result["outcome"] or "decoder stopped" in run.result["outcome"]


def test_load_image_file_refuses_a_named_pipe_without_blocking(tmp_path):
    # `influence explain --image x.png` on a FIFO used to wait forever for a writer.
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    run = run_bounded(
        f"""
        from core.errors import ImageDecodeError
        from core.images import load_image_file
        try:
            load_image_file({str(fifo)!r}, target_shape=(28, 28, 1), light_on_dark=True)
            outcome = "read"
        except ImageDecodeError as exc:
            outcome = str(exc)
        report(outcome=outcome)
        """,
        timeout=20,
    )
    assert not run.timed_out, "reading the FIFO blocked"
    assert run.result is not None, run.output
    assert "is a named pipe (FIFO), not a regular file" in run.result["outcome"]
