"""Uploaded datasets: a zip in ImageFolder layout, unpacked safely into the artifact store.

The dashboard's "Your data" area (and any other front end) hands an uploaded zip to
:meth:`DatasetUploads.add_zip`, which checks it, unpacks it and stores it under its content hash;
:func:`core.data.load_image_folder` then reads it like any ImageFolder directory. The limits are
stated up front (:class:`UploadLimits`, :meth:`UploadLimits.describe`) and each refusal says
what was wrong:

- **size**: the zip, the unpacked total, the number of files and each file are bounded; sizes are
  checked as declared in the archive *before* anything is unpacked and counted again while
  streaming (a zip bomb that lies about its sizes is stopped at the limit, and zipfile's CRC check
  refuses data that does not match its header); an entry (or the whole archive) expanding more
  than ``max_ratio`` times is refused outright;
- **paths**: absolute paths, drive letters, ``..``, ``.`` or empty components, backslashes,
  control characters and overlong names are refused; nothing is written outside a fresh
  temporary directory, and files are created exclusively (no overwriting, no following links);
- **entry types**: symbolic links, devices, FIFOs and sockets (from the Unix mode bits), encrypted
  entries and unknown compression methods are refused;
- **content**: nested archives (by name or signature) and anything that is not a PNG, JPEG, WebP,
  BMP, GIF or TIFF image (by name, signature, and a full decode by :func:`core.images.decode_upload`)
  are refused; hidden files, ``__MACOSX/`` and OS junk (Thumbs.db, desktop.ini) are skipped;
- **layout**: ``train/<class>/...`` and ``test/<class>/...`` (optionally inside one top folder),
  at least two classes, every class with at least two training images and at least one test
  image, the same classes in both splits.

Nothing is left half-written in the store: the archive is unpacked into a temporary directory
next to the store's datasets and moved into place with one atomic rename once everything passed;
on any refusal or error the temporary directory is removed. The same content uploaded twice (or
concurrently) is stored once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from core.data import Dataset, load_image_folder
from core.errors import ImageDecodeError, UploadError
from core.images import SUPPORTED_EXTENSIONS, decode_upload
from core.store import ArtifactStore

#: progress(stage, done, total), as the explainer reports it.
StageProgress = Callable[[str, int, int], None]

MANIFEST = "manifest.json"
_INCOMING = ".incoming"
_HASH = re.compile(r"^[0-9a-f]{64}$")
# Temporary directories older than this are from a process that died mid-upload.
_STALE_SECONDS = 24 * 3600
_CHUNK = 1 << 20
_JUNK = frozenset({"thumbs.db", "desktop.ini"})
_ARCHIVE_SUFFIXES = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".zst", ".jar"}
)
_ARCHIVE_SIGNATURES = (
    b"PK\x03\x04",  # zip
    b"PK\x05\x06",  # empty zip
    b"\x1f\x8b",  # gzip
    b"BZh",  # bzip2
    b"\xfd7zXZ\x00",  # xz
    b"7z\xbc\xaf\x27\x1c",  # 7-zip
    b"Rar!\x1a\x07",  # rar
    b"\x28\xb5\x2f\xfd",  # zstandard
)
_IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little endian
    b"MM\x00*",  # TIFF, big endian
)
# Decoded only to check that the file is an image; the dataset is decoded at its own size later.
_CHECK_SHAPE = (8, 8, 3)
_CHECK_MAX_PIXELS = 89_000_000


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be. Frozen; the defaults are what the dashboard offers.

    Attributes:
        max_zip_bytes: the zip file itself.
        max_unpacked_bytes: the sum of the files' sizes once unpacked.
        max_files: image files in the archive.
        max_file_bytes: one unpacked file (the ImageFolder loader's per-file limit).
        max_ratio: unpacked size over compressed size, per entry above 1 MiB and for the whole
            archive; images barely compress, so a larger ratio means a zip bomb.
        max_weights_bytes: a network's weights or ``.pt2`` file.
    """

    max_zip_bytes: int = 500 * 2**20
    max_unpacked_bytes: int = 2 * 2**30
    max_files: int = 100_000
    max_file_bytes: int = 64 * 2**20
    max_ratio: float = 100.0
    max_weights_bytes: int = 200 * 2**20

    def __post_init__(self) -> None:
        for name in (
            "max_zip_bytes",
            "max_unpacked_bytes",
            "max_files",
            "max_file_bytes",
            "max_weights_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UploadError(f"{name} must be a positive integer; got {value!r}.")
        if not self.max_ratio >= 1:
            raise UploadError(f"max_ratio must be at least 1; got {self.max_ratio!r}.")

    def describe(self) -> str:
        """The limits in one sentence, for the upload widget."""
        return (
            f"A zip of at most {_human(self.max_zip_bytes)} in ImageFolder layout "
            f"(train/<class>/..., test/<class>/...), unpacking to at most "
            f"{_human(self.max_unpacked_bytes)} in at most {self.max_files:,} images of at most "
            f"{_human(self.max_file_bytes)} each (PNG, JPEG, WebP, BMP, GIF or TIFF); weights "
            f"files of at most {_human(self.max_weights_bytes)}."
        )


@dataclass(frozen=True)
class StoredDataset:
    """An uploaded dataset in the store.

    Attributes:
        content_hash: sha256 over the unpacked files' paths and contents (the store's key).
        path: its ImageFolder directory (``train/``, ``test/``).
        name: the upload's name (the zip's top folder or file name).
        class_names: sorted class folder names (the order torchvision's ImageFolder uses).
        counts: split -> class -> number of images.
        n_files, n_bytes: images and their unpacked size.
        created: Unix time it was stored.
    """

    content_hash: str
    path: Path
    name: str
    class_names: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    n_files: int
    n_bytes: int
    created: float

    def open(self, image_size: tuple[int, int] = (64, 64)) -> Dataset:
        """Decode it (:func:`core.data.load_image_folder`) at ``image_size``."""
        return load_image_folder(self.path, image_size=image_size)


@dataclass
class _Member:
    info: zipfile.ZipInfo
    path: PurePosixPath  # relative to the dataset root: train/<class>/...
    size: int = 0
    sha256: str = ""
    image: bool = field(default=True)


class DatasetUploads:
    """Uploaded ImageFolder datasets under ``<store root>/datasets/<content hash>/``.

    Args:
        store: the artifact store whose directory holds them (default: the user cache).
        limits: what an upload may be.
    """

    def __init__(self, store: ArtifactStore | None = None, limits: UploadLimits | None = None):
        self.store = store if store is not None else ArtifactStore()
        self.limits = limits if limits is not None else UploadLimits()
        self.root = self.store.root / "datasets"

    # -- the public API ---------------------------------------------------------------------------
    def add_zip(
        self,
        source: str | PathLike[str] | BinaryIO,
        *,
        name: str | None = None,
        progress: StageProgress | None = None,
    ) -> StoredDataset:
        """Check, unpack and store an uploaded zip; the same content is stored once.

        Args:
            source: the zip, as a path or a seekable binary file (e.g. an uploaded file object).
            name: what to call it (default: its top folder, else the file name, else "upload").
            progress: ``progress(stage, done, total)`` while checking ("Checking the archive"),
                unpacking and checking the images ("Unpacking", in bytes).

        Returns:
            The stored dataset.

        Raises:
            UploadError: the archive was refused; the message says why and what to do. The store
                then holds nothing from it.
        """
        report = progress or (lambda stage, done, total: None)
        limits = self.limits
        with _open_zip(source, limits) as (archive, zip_size, source_name):
            report("Checking the archive", 0, 1)
            members, wrapper = _plan(archive, limits, zip_size)
            counts, class_names = _check_layout(members)
            report("Checking the archive", 1, 1)
            total = sum(m.info.file_size for m in members)
            self._make_room(total)
            incoming = self.root / _INCOMING
            incoming.mkdir(parents=True, exist_ok=True)
            self._remove_stale(incoming)
            temporary = Path(tempfile.mkdtemp(prefix="upload-", dir=incoming))
            try:
                _unpack(archive, members, temporary, limits, report)
                content_hash = _content_hash(members)
                manifest = {
                    "content_hash": content_hash,
                    "name": name or wrapper or _stem(source_name) or "upload",
                    "class_names": list(class_names),
                    "counts": counts,
                    "n_files": len(members),
                    "n_bytes": sum(m.size for m in members),
                    "created": time.time(),
                    "files": {str(m.path): m.sha256 for m in members},
                }
                (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
                final = self.root / content_hash
                if not final.exists():
                    try:
                        os.rename(temporary, final)  # atomic: the dataset appears complete
                    except OSError:
                        if not final.exists():
                            raise
                return self.get(content_hash)
            finally:
                shutil.rmtree(temporary, ignore_errors=True)

    def get(self, content_hash: str) -> StoredDataset:
        """A stored dataset by its content hash.

        Raises:
            UploadError: no such dataset (or a malformed hash).
        """
        directory = self._directory(content_hash)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            raise UploadError(f"No uploaded dataset {content_hash[:12]} in the store.") from None
        return StoredDataset(
            content_hash=content_hash,
            path=directory,
            name=str(manifest["name"]),
            class_names=tuple(manifest["class_names"]),
            counts={s: dict(c) for s, c in manifest["counts"].items()},
            n_files=int(manifest["n_files"]),
            n_bytes=int(manifest["n_bytes"]),
            created=float(manifest["created"]),
        )

    def list(self) -> list[StoredDataset]:
        """Every stored dataset, newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if _HASH.match(entry.name):
                with contextlib.suppress(UploadError):
                    found.append(self.get(entry.name))
        return sorted(found, key=lambda d: d.created, reverse=True)

    def delete(self, content_hash: str) -> bool:
        """Remove a stored dataset. Returns whether it existed.

        It disappears at once (renamed away atomically), then its files are removed.
        """
        directory = self._directory(content_hash)
        if not directory.exists():
            return False
        incoming = self.root / _INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        doomed = Path(tempfile.mkdtemp(prefix="delete-", dir=incoming))
        try:
            os.rename(directory, doomed / "dataset")
        except FileNotFoundError:
            return False  # deleted concurrently
        finally:
            shutil.rmtree(doomed, ignore_errors=True)
        return True

    # -- internals --------------------------------------------------------------------------------
    def _directory(self, content_hash: str) -> Path:
        if not isinstance(content_hash, str) or not _HASH.match(content_hash):
            raise UploadError(f"{content_hash!r} is not a dataset's content hash (64 hex digits).")
        return self.root / content_hash

    def _make_room(self, needed: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < needed + 64 * 2**20:
            raise UploadError(
                f"The archive unpacks to {_human(needed)} but only {_human(free)} is free on the "
                "server's disk; try a smaller dataset or ask the administrator."
            )

    @staticmethod
    def _remove_stale(incoming: Path) -> None:
        now = time.time()
        for entry in incoming.iterdir():
            with contextlib.suppress(OSError):
                if now - entry.lstat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------------------ the checks
@contextlib.contextmanager
def _open_zip(source: Any, limits: UploadLimits) -> Any:
    if isinstance(source, (str, PathLike)):
        path = os.fspath(source)
        try:
            info = os.stat(path)
        except OSError as error:
            raise UploadError(f"{path} could not be read: {error.strerror}.") from None
        if not stat.S_ISREG(info.st_mode):
            raise UploadError(f"{path} is not a regular file.")
        size, name = info.st_size, Path(path).name
        opened: Any = open(path, "rb")  # noqa: SIM115 - closed below
    else:
        if not (hasattr(source, "seek") and hasattr(source, "read")):
            raise UploadError("The upload must be a file path or a seekable binary file.")
        source.seek(0, os.SEEK_END)
        size = source.tell()
        source.seek(0)
        name, opened = str(getattr(source, "name", "") or ""), None
    try:
        if size > limits.max_zip_bytes:
            raise UploadError(
                f"The zip is {_human(size)}, more than the {_human(limits.max_zip_bytes)} limit. "
                "Upload fewer or smaller images."
            )
        if size == 0:
            raise UploadError("The upload is empty (0 bytes).")
        try:
            archive = zipfile.ZipFile(opened if opened is not None else source)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as error:
            raise UploadError(
                f"The upload is not a readable zip archive ({error}). Make a .zip of a folder "
                "holding train/<class>/ and test/<class>/."
            ) from None
        with archive:
            yield archive, size, name
    finally:
        if opened is not None:
            opened.close()


def _member_path(name: str) -> tuple[PurePosixPath, bool]:
    """The entry's path, refused unless plainly relative; and whether to skip it (junk)."""
    shown = name.encode("unicode_escape").decode("ascii")[:120]
    if "\x00" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UploadError(
            f"The archive has an entry with control characters in its name ({shown})."
        )
    if "\\" in name:
        raise UploadError(
            f"The archive's entry {shown!r} uses backslashes; re-create the zip with a standard "
            "tool (entries must use '/')."
        )
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UploadError(f"The archive's entry {shown!r} has an absolute path; refused.")
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UploadError(
            f"The archive's entry {shown!r} has a '..', '.' or empty path component; refused "
            "(it could write outside the dataset)."
        )
    if len(name) > 1024 or len(parts) > 32 or any(len(p.encode()) > 255 for p in parts):
        raise UploadError(f"The archive's entry {shown!r} has an overlong name or path; refused.")
    junk = parts[0] == "__MACOSX" or any(p.startswith(".") or p.lower() in _JUNK for p in parts)
    return PurePosixPath(*parts), junk


def _entry_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    # Unix archivers put st_mode in the high 16 bits; many leave its file-type bits at zero.
    if info.create_system == 3 and stat.S_IFMT(mode):
        if stat.S_ISLNK(mode):
            return "a symbolic link"
        if stat.S_ISDIR(mode):
            return "directory"
        if not stat.S_ISREG(mode):
            return "a special file (device, FIFO or socket)"
    return "directory" if info.is_dir() else "file"


def _plan(
    archive: zipfile.ZipFile, limits: UploadLimits, zip_size: int
) -> tuple[list[_Member], str | None]:
    """Every entry checked from the central directory, before anything is unpacked."""
    infos = archive.infolist()
    if len(infos) > 2 * limits.max_files + 1000:
        raise UploadError(
            f"The archive has {len(infos):,} entries, more than the {limits.max_files:,} images "
            "allowed."
        )
    seen: set[str] = set()
    files: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for info in infos:
        path, junk = _member_path(info.filename)
        key = str(path)
        if key in seen:
            raise UploadError(f"The archive lists {key!r} twice; refused.")
        seen.add(key)
        kind = _entry_kind(info)
        if kind not in ("file", "directory"):
            raise UploadError(
                f"The archive's entry {key!r} is {kind}; only ordinary files and folders are "
                "accepted."
            )
        if info.flag_bits & 0x1:
            raise UploadError(
                f"The archive's entry {key!r} is encrypted; upload an unencrypted zip."
            )
        if info.compress_type not in (
            zipfile.ZIP_STORED,
            zipfile.ZIP_DEFLATED,
            zipfile.ZIP_BZIP2,
            zipfile.ZIP_LZMA,
        ):
            raise UploadError(
                f"The archive's entry {key!r} uses an unsupported compression method "
                f"({info.compress_type}); use a standard zip (deflate)."
            )
        if kind == "directory" or junk:
            continue
        suffix = path.suffix.lower()
        if suffix in _ARCHIVE_SUFFIXES:
            raise UploadError(
                f"The archive holds another archive, {key!r}; nested archives are refused. Unpack "
                "it and zip the images themselves."
            )
        if suffix not in SUPPORTED_EXTENSIONS:
            raise UploadError(
                f"{key!r} is not an image file (accepted: PNG, JPEG, WebP, BMP, GIF, TIFF); remove "
                "it from the archive."
            )
        if info.file_size > limits.max_file_bytes:
            raise UploadError(
                f"{key!r} unpacks to {_human(info.file_size)}, more than the "
                f"{_human(limits.max_file_bytes)} limit per image."
            )
        if info.file_size > 2**20 and info.file_size > limits.max_ratio * max(
            info.compress_size, 1
        ):
            raise UploadError(
                f"{key!r} expands {info.file_size / max(info.compress_size, 1):,.0f} times "
                f"(more than {limits.max_ratio:g}); images barely compress, so this looks like a "
                "zip bomb. Refused."
            )
        files.append((info, path))
    if len(files) > limits.max_files:
        raise UploadError(
            f"The archive has {len(files):,} images, more than the {limits.max_files:,} allowed."
        )
    total = sum(info.file_size for info, _ in files)
    if total > limits.max_unpacked_bytes:
        raise UploadError(
            f"The archive unpacks to {_human(total)}, more than the "
            f"{_human(limits.max_unpacked_bytes)} limit."
        )
    if total > 2**20 and total > limits.max_ratio * zip_size:
        raise UploadError(
            f"The archive expands {total / zip_size:,.0f} times (more than {limits.max_ratio:g}); "
            "images barely compress, so this looks like a zip bomb. Refused."
        )
    # One top folder around train/ and test/ (zipping the dataset's folder) is taken off.
    wrapper = None
    tops = {path.parts[0] for _, path in files}
    if len(tops) == 1 and next(iter(tops)) not in ("train", "test"):
        wrapper = next(iter(tops))
        if all(len(path.parts) > 1 for _, path in files):
            files = [(info, PurePosixPath(*path.parts[1:])) for info, path in files]
    return [_Member(info, path) for info, path in files], wrapper


def _check_layout(members: list[_Member]) -> tuple[dict[str, dict[str, int]], tuple[str, ...]]:
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for member in members:
        parts = member.path.parts
        if parts[0] not in counts:
            raise UploadError(
                f"{str(member.path)!r} is outside train/ and test/. The archive must hold "
                "train/<class>/<images> and test/<class>/<images> (optionally in one folder)."
            )
        if len(parts) < 3:
            raise UploadError(
                f"{str(member.path)!r} is directly in {parts[0]}/; images go in class folders, "
                f"{parts[0]}/<class>/<image>."
            )
        split_counts = counts[parts[0]]
        split_counts[parts[1]] = split_counts.get(parts[1], 0) + 1
    train, test = counts["train"], counts["test"]
    if len(train) < 2:
        raise UploadError(
            f"train/ has {len(train)} class folder(s); a classifier needs at least two "
            "(train/<class>/<images>)."
        )
    missing = sorted(set(train) - set(test))
    if missing:
        raise UploadError(
            f"Class(es) {', '.join(map(repr, missing))} have no test images; add test/<class>/ "
            "images for every class."
        )
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise UploadError(
            f"test/ has class(es) {', '.join(map(repr, unknown))} that train/ does not; the model "
            "cannot predict a class it was not trained on."
        )
    single = sorted(c for c, n in train.items() if n < 2)
    if single:
        raise UploadError(
            f"Class(es) {', '.join(map(repr, single))} have a single training image; every class "
            "needs at least two (influence is about removing one)."
        )
    return counts, tuple(sorted(train))


def _unpack(
    archive: zipfile.ZipFile,
    members: list[_Member],
    root: Path,
    limits: UploadLimits,
    report: StageProgress,
) -> None:
    total = sum(m.info.file_size for m in members)
    written = 0
    report("Unpacking", 0, total)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for member in members:
        shown = str(member.path)
        target = root.joinpath(*member.path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        data = bytearray()
        try:
            with archive.open(member.info) as stream:
                while chunk := stream.read(_CHUNK):
                    data += chunk
                    if len(data) > member.info.file_size or len(data) > limits.max_file_bytes:
                        raise UploadError(
                            f"{shown!r} holds more data than its header declares; refused "
                            "(a zip bomb, or a damaged archive)."
                        )
                    if written + len(data) > limits.max_unpacked_bytes:
                        raise UploadError(
                            f"The archive unpacks to more than "
                            f"{_human(limits.max_unpacked_bytes)}; refused."
                        )
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as error:
            raise UploadError(
                f"{shown!r} could not be unpacked ({error}); the archive is damaged or uses an "
                "unsupported feature."
            ) from None
        head = bytes(data[:16])
        if any(head.startswith(s) for s in _ARCHIVE_SIGNATURES):
            raise UploadError(
                f"{shown!r} is an archive named like an image; nested archives are refused."
            )
        if not (
            any(head.startswith(s) for s in _IMAGE_SIGNATURES)
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        ):
            raise UploadError(
                f"{shown!r} is not an image (its contents are not PNG, JPEG, WebP, BMP, GIF or "
                "TIFF, whatever its name says); remove it from the archive."
            )
        try:
            decode_upload(
                bytes(data),
                target_shape=_CHECK_SHAPE,
                light_on_dark=False,
                max_bytes=limits.max_file_bytes,
                max_pixels=_CHECK_MAX_PIXELS,
            )
        except ImageDecodeError as error:
            raise UploadError(f"{shown!r} cannot be used: {error}") from None
        descriptor = os.open(target, flags, 0o644)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        digest.update(data)
        member.size, member.sha256 = len(data), digest.hexdigest()
        written += len(data)
        report("Unpacking", written, total)


def _content_hash(members: list[_Member]) -> str:
    digest = hashlib.sha256(b"influence-explorer/uploaded-dataset/v1\0")
    for member in sorted(members, key=lambda m: str(m.path)):
        digest.update(f"{member.path}\0{member.size}\0{member.sha256}\n".encode())
    return digest.hexdigest()


def _stem(name: str) -> str:
    return Path(name).stem if name else ""


def _human(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{int(n)} bytes"
