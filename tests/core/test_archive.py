"""Uploaded zip datasets: what is accepted, everything hostile refused, nothing half-written."""

from __future__ import annotations

import io
import os
import stat
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import archive as archive_module
from core.archive import DatasetUploads, UploadLimits
from core.errors import UploadError
from core.store import ArtifactStore


def png(seed: int, size: int = 12) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def dataset_entries(prefix: str = "pets/") -> dict[str, bytes]:
    """Two classes, three training and one test image each."""
    entries = {}
    seed = 0
    for split, count in (("train", 3), ("test", 1)):
        for name in ("cat", "dog"):
            for i in range(count):
                seed += 1
                entries[f"{prefix}{split}/{name}/{i}.png"] = png(seed)
    return entries


def make_zip(
    entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED, order=None
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as out:
        for name in order or entries:
            out.writestr(name, entries[name])
    return buffer.getvalue()


def with_entry(info: zipfile.ZipInfo, data: bytes, base: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for name, content in (base if base is not None else dataset_entries()).items():
            out.writestr(name, content)
        out.writestr(info, data)
    return buffer.getvalue()


@pytest.fixture
def uploads(tmp_path):
    return DatasetUploads(ArtifactStore(tmp_path / "store"))


def assert_store_empty(uploads: DatasetUploads) -> None:
    """Nothing from a refused upload: no dataset, no temporary directory left behind."""
    assert uploads.list() == []
    if uploads.root.exists():
        leftovers = [p for p in uploads.root.iterdir() if p.name != ".incoming"]
        assert leftovers == []
        assert list((uploads.root / ".incoming").iterdir()) == []


# ------------------------------------------------------------------------------ accepted
def test_a_zip_becomes_a_dataset_keyed_by_its_content(uploads, tmp_path):
    stages = []
    stored = uploads.add_zip(
        io.BytesIO(make_zip(dataset_entries())), progress=lambda s, d, t: stages.append((s, d, t))
    )
    assert stored.name == "pets" and stored.class_names == ("cat", "dog")
    assert stored.counts == {"train": {"cat": 3, "dog": 3}, "test": {"cat": 1, "dog": 1}}
    assert stored.n_files == 8 and len(stored.content_hash) == 64
    assert stored.path == uploads.root / stored.content_hash
    assert (stored.path / "train" / "cat" / "0.png").read_bytes() == png(1)
    assert {s for s, _, _ in stages} == {"Checking the archive", "Unpacking"}
    assert stages[-1][1] == stages[-1][2] == stored.n_bytes
    dataset = stored.open(image_size=(8, 8))
    assert dataset.class_names == ("cat", "dog") and dataset.n_train == 6 and dataset.n_test == 2
    # The same images in another order, compression and top folder: the same dataset, once.
    entries = {k.replace("pets/", "other/"): v for k, v in dataset_entries().items()}
    path = tmp_path / "again.zip"
    path.write_bytes(make_zip(entries, zipfile.ZIP_STORED, order=sorted(entries, reverse=True)))
    again = uploads.add_zip(path)
    assert again.content_hash == stored.content_hash
    assert [d.content_hash for d in uploads.list()] == [stored.content_hash]
    assert list((uploads.root / ".incoming").iterdir()) == []
    assert uploads.delete(stored.content_hash) and not uploads.delete(stored.content_hash)
    assert_store_empty(uploads)
    with pytest.raises(UploadError, match="No uploaded dataset"):
        uploads.get(stored.content_hash)


def test_no_top_folder_and_os_junk_are_fine(uploads):
    entries = dataset_entries(prefix="")
    entries["__MACOSX/train/cat/._0.png"] = b"\0\5\26\7"
    entries["train/cat/.DS_Store"] = b"junk"
    entries["train/dog/Thumbs.db"] = b"junk"
    stored = uploads.add_zip(io.BytesIO(make_zip(entries)))
    assert stored.n_files == 8 and stored.name == "upload"
    assert not (stored.path / "__MACOSX").exists()


def test_the_limits_are_stated_up_front():
    text = UploadLimits().describe()
    for part in ("500 MB", "2 GB", "100,000", "64 MB", "200 MB", "train/<class>"):
        assert part in text
    with pytest.raises(UploadError, match="max_files"):
        UploadLimits(max_files=0)


# ------------------------------------------------------------------------------ refused
def symlink(name: str, target: str = "../../../etc/passwd") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def special(name: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info, b""


def encrypted(name: str) -> bytes:
    """A dataset plus one entry flagged as encrypted (zipfile clears the flag when writing, so
    it is set in the bytes: general-purpose bit 0 of the local and central headers)."""
    data = bytearray(make_zip({**dataset_entries(), name: png(99)}, zipfile.ZIP_STORED))
    encoded = name.encode()
    for signature, flags, name_offset in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        at = data.find(signature)
        while at != -1:
            if data[at + name_offset : at + name_offset + len(encoded)] == encoded:
                data[at + flags] |= 0x1
            at = data.find(signature, at + 4)
    return bytes(data)


def lying_sizes() -> bytes:
    """A deflated entry whose headers declare fewer bytes than it holds."""
    data = bytearray(make_zip({**dataset_entries(), "pets/train/cat/9.png": png(50, size=64)}))
    name = b"pets/train/cat/9.png"
    real = len(png(50, size=64))
    # Uncompressed size: offset 22 in a local header, 24 in a central directory record.
    for signature, offset, name_offset in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        at = data.find(signature)
        while at != -1:
            if data[at + name_offset : at + name_offset + len(name)] == name:
                (size,) = struct.unpack_from("<I", data, at + offset)
                assert size == real
                struct.pack_into("<I", data, at + offset, real // 2)
            at = data.find(signature, at + 4)
    return bytes(data)


def nested_zip() -> bytes:
    return make_zip({"a.png": png(1)})


CASES = {
    # name: (zip bytes, limits, message)
    "zip bomb entry": (
        lambda: make_zip({**dataset_entries(), "pets/train/cat/bomb.bmp": b"\0" * (8 * 2**20)}),
        None,
        "zip bomb",
    ),
    "zip bomb overall": (
        lambda: make_zip(
            {
                **dataset_entries(),
                **{f"pets/train/cat/z{i}.bmp": b"\0" * (900 * 2**10) for i in range(4)},
            }
        ),
        None,
        "zip bomb",
    ),
    "sizes that lie": (lying_sizes, None, "could not be unpacked"),
    "file over the limit": (
        lambda: make_zip(dataset_entries(), zipfile.ZIP_STORED),
        UploadLimits(max_file_bytes=100),
        "limit per image",
    ),
    "unpacked over the limit": (
        lambda: make_zip(dataset_entries()),
        UploadLimits(max_unpacked_bytes=1000),
        "unpacks to",
    ),
    "too many files": (
        lambda: make_zip(dataset_entries()),
        UploadLimits(max_files=5),
        "images, more",
    ),
    "zip over the limit": (
        lambda: make_zip(dataset_entries()),
        UploadLimits(max_zip_bytes=100),
        "limit",
    ),
    "dot-dot": (lambda: make_zip({**dataset_entries(), "pets/../x.png": png(1)}), None, "'..'"),
    "absolute": (lambda: make_zip({**dataset_entries(), "/tmp/x.png": png(1)}), None, "absolute"),
    "drive letter": (lambda: make_zip({**dataset_entries(), "C:/x.png": png(1)}), None, "absolute"),
    "backslashes": (
        lambda: make_zip({**dataset_entries(), "pets\\train\\cat\\x.png": png(1)}),
        None,
        "backslashes",
    ),
    "dot component": (
        lambda: make_zip({**dataset_entries(), "pets/./train/cat/x.png": png(1)}),
        None,
        "component",
    ),
    "control character": (
        lambda: make_zip({**dataset_entries(), "pets/train/cat/x\n.png": png(1)}),
        None,
        "control characters",
    ),
    "duplicate": (
        lambda: with_entry(zipfile.ZipInfo("pets/train/cat/0.png"), png(7)),
        None,
        "twice",
    ),
    "symlink": (lambda: with_entry(*symlink("pets/train/cat/link.png")), None, "symbolic link"),
    "symlinked folder": (lambda: with_entry(*symlink("pets/train/cat2", "/etc")), None, "symbolic"),
    "fifo": (lambda: with_entry(*special("pets/train/cat/pipe.png")), None, "special file"),
    "encrypted": (lambda: encrypted("pets/train/cat/e.png"), None, "encrypted"),
    "nested zip": (
        lambda: make_zip({**dataset_entries(), "pets/train/cat/more.zip": nested_zip()}),
        None,
        "nested archives",
    ),
    "zip named png": (
        lambda: make_zip({**dataset_entries(), "pets/train/cat/x.png": nested_zip()}),
        None,
        "archive named like an image",
    ),
    "text file": (
        lambda: make_zip({**dataset_entries(), "pets/train/cat/notes.txt": b"hi"}),
        None,
        "not an image file",
    ),
    "script named png": (
        lambda: make_zip({**dataset_entries(), "pets/train/cat/x.png": b"#!/bin/sh\nrm -rf /\n"}),
        None,
        "its contents are not PNG",
    ),
    "truncated image": (
        lambda: make_zip({**dataset_entries(), "pets/train/cat/x.png": png(3)[:60]}),
        None,
        "cannot be used",
    ),
    "class missing from test": (
        lambda: make_zip(
            {k: v for k, v in dataset_entries().items() if not k.startswith("pets/test/dog")}
        ),
        None,
        "'dog' have no test images",
    ),
    "class only in test": (
        lambda: make_zip({**dataset_entries(), "pets/test/bird/0.png": png(1)}),
        None,
        "that train/ does not",
    ),
    "single training image": (
        lambda: make_zip(
            {**dataset_entries(), "pets/train/bird/0.png": png(1), "pets/test/bird/0.png": png(2)}
        ),
        None,
        "single training image",
    ),
    "one class": (
        lambda: make_zip({k: v for k, v in dataset_entries().items() if "/dog/" not in k}),
        None,
        "at least two",
    ),
    "image outside a class": (
        lambda: make_zip({**dataset_entries(), "pets/train/x.png": png(1)}),
        None,
        "class folders",
    ),
    "image outside the splits": (
        lambda: make_zip({**dataset_entries(), "pets/valid/cat/x.png": png(1)}),
        None,
        "outside train/ and test/",
    ),
    "not a zip": (lambda: b"PK\x03\x04 but not really a zip" * 10, None, "not a readable zip"),
    "empty": (lambda: b"", None, "empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_archives_are_refused_and_leave_nothing(uploads, case):
    build, limits, message = CASES[case]
    if limits is not None:
        uploads = DatasetUploads(uploads.store, limits)
    with pytest.raises(UploadError, match=message) as error:
        uploads.add_zip(io.BytesIO(build()))
    assert "\n" not in str(error.value)
    assert_store_empty(uploads)
    # Nothing was written outside the store either (the ".." and absolute entries).
    assert not (uploads.store.root.parent / "x.png").exists()


def test_a_failure_while_unpacking_leaves_nothing(uploads, monkeypatch):
    """The last image is broken: everything before it was unpacked, then all of it removed."""
    entries = dataset_entries()
    entries["pets/train/dog/zz.png"] = png(9)[:80]
    with pytest.raises(UploadError, match=r"zz\.png"):
        uploads.add_zip(io.BytesIO(make_zip(entries)))
    assert_store_empty(uploads)

    def crash(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(archive_module.os, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        uploads.add_zip(io.BytesIO(make_zip(dataset_entries())))
    assert_store_empty(uploads)


def test_sources_that_are_not_regular_files(uploads, tmp_path):
    fifo = tmp_path / "pipe.zip"
    os.mkfifo(fifo)
    with pytest.raises(UploadError, match="not a regular file"):
        uploads.add_zip(fifo)
    with pytest.raises(UploadError, match="could not be read"):
        uploads.add_zip(tmp_path / "missing.zip")


def test_stale_temporary_directories_are_cleaned_up(uploads):
    stale = uploads.root / ".incoming" / "upload-dead"
    stale.mkdir(parents=True)
    (stale / "half.png").write_bytes(b"x")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    uploads.add_zip(io.BytesIO(make_zip(dataset_entries())))
    assert not stale.exists()


@pytest.mark.parametrize("bad", ["../../etc", "abc", "A" * 64, ""])
def test_content_hashes_are_checked(uploads, bad):
    with pytest.raises(UploadError, match="content hash"):
        uploads.delete(bad)
    with pytest.raises(UploadError, match="content hash"):
        uploads.get(bad)


def test_declared_and_actual_sizes_are_both_bounded(uploads, tmp_path):
    """The central directory declares small sizes, the data is larger: zipfile stops at the
    declared size and its CRC check refuses the rest."""
    data = lying_sizes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo("pets/train/cat/9.png")
        assert info.file_size == len(png(50, size=64)) // 2
    path = Path(tmp_path / "lying.zip")
    path.write_bytes(data)
    with pytest.raises(UploadError, match="damaged"):
        uploads.add_zip(path)
    assert_store_empty(uploads)
