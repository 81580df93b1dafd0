"""Small generators of files built to make a reader work or allocate without bound.

Each one reproduces a problem found on a shared server; all are built in a fraction of a second
without holding the decoded size in memory, so no large binary file lives in git.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Iterable

import numpy as np
from PIL import Image


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _entropy_bits(bits: str) -> bytes:
    """Bits packed into bytes, padded with 1s, with JPEG's 0xFF 0x00 byte stuffing."""
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for i in range(0, len(bits), 8):
        out.append(int(bits[i : i + 8], 2))
        if out[-1] == 0xFF:
            out.append(0)
    return bytes(out)


def jpeg_scan_bomb(width: int = 6000, height: int = 6000, scans: int = 170_000) -> bytes:
    """A valid grayscale progressive JPEG with ``scans`` scans: a "scan bomb".

    One DC scan, then the same AC scan over and over; each AC scan codes every block as part of
    end-of-band runs of 32,767 blocks, so it takes ~45 bytes however large the image, while libjpeg
    still visits every block of the image for it. The defaults give the 9.5 MB file that took
    11 minutes of CPU; 2,000 scans give a 186 KB one that took 11 s.
    """
    blocks = -(-width // 8) * -(-height // 8)
    one_code = b"\x01" + b"\x00" * 15  # a Huffman table with one code of length 1
    header = (
        b"\xff\xd8"
        + _segment(0xDB, b"\x00" + b"\x01" * 64)
        + _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        # DC table 0: symbol 0 (no difference); AC table 0: symbol 0xE0 (end-of-band run, 14 bits)
        + _segment(0xC4, b"\x00" + one_code + b"\x00" + b"\x10" + one_code + b"\xe0")
    )
    dc_scan = _segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + _entropy_bits("0" * blocks)
    runs = -(-blocks // 32767)
    ac_scan = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + _entropy_bits(("0" + "1" * 14) * runs)
    return header + dc_scan + ac_scan * scans + b"\xff\xd9"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png16_gradient(width: int = 6324, height: int = 6324) -> bytes:
    """A real 16-bit grayscale PNG (40 megapixels by default) of ~80 KB: a gradient on black.

    Streamed row by row through zlib, so building it never holds the 80 MB of samples. The old
    decoder made several full-size int64/float64 copies of it: 1.36 GB for 87 KB.
    """
    first_row = b"\x00" + np.linspace(0, 65535, width).astype(">u2").tobytes()
    row_bytes = 1 + 2 * width  # filter byte 0, then black samples
    full, rest = divmod(height - 1, 256)
    # Raw deflate with a full flush after each part, so one compressed block of 256 black rows can
    # be repeated; the zlib header and Adler-32 trailer are added by hand.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(row_bytes * 256)
    start = compressor.compress(first_row) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.compress(bytes(row_bytes * rest)) + compressor.flush(zlib.Z_FINISH)
    checksum = zlib.adler32(first_row)
    for _ in range(full):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(bytes(row_bytes * rest), checksum)
    stream = b"\x78\xda" + start + repeated * full + end + struct.pack(">I", checksum)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", stream)
        + _png_chunk(b"IEND", b"")
    )


def tiff_gradient(width: int = 6324, height: int = 6324, sample: str = "float32") -> bytes:
    """A deflate-compressed grayscale TIFF of 32-bit float, 32-bit int or 16-bit samples.

    A gradient in the first row, zeros below: 40 megapixels in ~200 KB. Written strip by strip
    (64 rows each; every all-zero strip is the same compressed bytes), so building it never holds
    the samples. The old decoder needed 1.4 GB for these.
    """
    dtype = {"float32": "<f4", "int32": "<i4", "uint16": "<u2"}[sample]
    sample_format = {"float32": 3, "int32": 2, "uint16": 1}[sample]
    bits = np.dtype(dtype).itemsize * 8
    rows_per_strip = 64
    strips = -(-height // rows_per_strip)
    top = np.zeros((rows_per_strip, width), dtype=dtype)
    top[0] = np.linspace(0, 1000 if sample == "float32" else 60000, width)
    first = zlib.compress(top.tobytes(), 9)
    zero = zlib.compress(bytes(rows_per_strip * width * (bits // 8)), 9)
    last_rows = height - rows_per_strip * (strips - 1)
    last = zlib.compress(bytes(last_rows * width * (bits // 8)), 9)
    blobs = [first] + [zero] * (strips - 2) + [last]
    entries = 11
    ifd_size = 2 + 12 * entries + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 4 * strips
    offsets, position = [], data_at
    for blob in blobs:
        offsets.append(position)
        position += len(blob)

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)

    ifd = struct.pack("<H", entries) + b"".join(
        [
            entry(256, 4, 1, width),
            entry(257, 4, 1, height),
            entry(258, 3, 1, bits),
            entry(259, 3, 1, 8),  # deflate
            entry(262, 3, 1, 1),  # black is zero
            entry(273, 4, strips, offsets_at),
            entry(277, 3, 1, 1),
            entry(278, 4, 1, rows_per_strip),
            entry(279, 4, strips, counts_at),
            entry(284, 3, 1, 1),  # one plane
            entry(339, 3, 1, sample_format),
        ]
    )
    ifd += struct.pack("<I", 0)
    return (
        b"II*\x00"
        + struct.pack("<I", 8)
        + ifd
        + struct.pack(f"<{strips}I", *offsets)
        + struct.pack(f"<{strips}I", *(len(blob) for blob in blobs))
        + b"".join(blobs)
    )


def png_chunk_flood(chunks: int = 830_000) -> bytes:
    """A 64×64 PNG preceded by ``chunks`` empty unknown ancillary chunks (~10 MB, 4.7 s in Pillow)."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 100).save(buffer, "PNG")
    data = buffer.getvalue()
    after_ihdr = 8 + 25
    return data[:after_ihdr] + _png_chunk(b"abCd", b"") * chunks + data[after_ihdr:]


def jpeg_segment_flood(segments: int = 2_500_000) -> bytes:
    """A 64×64 JPEG after ``segments`` empty COM segments (~10 MB; 4 s and 230 MB in Pillow)."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 100).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[:2] + b"\xff\xfe\x00\x02" * segments + data[2:]


def tiff_page_chain(pages: int = 95_000) -> bytes:
    """A TIFF of ``pages`` chained 1×1 pages (~9.5 MB); counting them took Pillow 100 s of CPU."""
    entries = [
        (256, 3, 1, 1),  # width
        (257, 3, 1, 1),  # height
        (258, 3, 1, 8),  # bits per sample
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 1),  # black is zero
        (273, 4, 1, 4),  # strip offset (a byte of the header)
        (278, 3, 1, 1),  # rows per strip
        (279, 4, 1, 1),  # strip byte count
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    body = b"".join(struct.pack("<HHII", *entry) for entry in entries)
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for page in range(pages):
        following = 8 + (page + 1) * ifd_size if page < pages - 1 else 0
        out += struct.pack("<H", len(entries)) + body + struct.pack("<I", following)
    return bytes(out)


def float_tiff(values: np.ndarray) -> bytes:
    """A 32-bit float grayscale TIFF of ``values``."""
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.float32)).save(buffer, "TIFF")
    return buffer.getvalue()


def jpeg_with_patched_size(width: int = 4000, height: int = 4000) -> bytes:
    """A 64×64 JPEG whose frame header was edited to declare ``width``×``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def jpeg_cut_short(fraction: float = 0.5) -> bytes:
    """A 256×256 photo-like JPEG cut after ``fraction`` of its bytes and closed with an EOI marker."""
    pixels = np.random.default_rng(7).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def idx_gzip_bomb(images: int = 5_478_000, decompressed_bytes: int | None = None) -> bytes:
    """A gzipped idx3 file of 28×28 images declaring ``images`` images, of ~4 MB.

    Its payload really is there, as zeros: ``decompressed_bytes`` of them (default: as many as
    declared, 4.3 GB for the default count, just under the old reader's 4 GiB allowance). Built
    from one compressed megabyte repeated (a full flush makes each copy independent), so it costs
    milliseconds. The CRC in the trailer is not computed (readers that stop early never see it).
    """
    payload = images * 28 * 28 if decompressed_bytes is None else decompressed_bytes
    header = struct.pack(">IIII", 0x803, images, 28, 28)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    megabyte = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    rest = compressor.compress(bytes(payload % 2**20)) + compressor.flush(zlib.Z_FINISH)
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    size = (len(header) + payload) & 0xFFFFFFFF
    trailer = struct.pack("<II", 0, size)
    body: Iterable[bytes] = [start, megabyte * (payload // 2**20), rest]
    return gzip_header + b"".join(body) + trailer


def idx_labels(count: int) -> bytes:
    """A gzipped idx1 labels file of ``count`` zeros."""
    return gzip.compress(struct.pack(">II", 0x801, count) + bytes(count), mtime=0)
