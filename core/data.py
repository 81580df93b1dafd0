"""Datasets: uint8 images with labels, class names and stable ids, and the loaders that make them.

Three sources, one :class:`Dataset`:

- the bundled demo, a stratified subset of Fashion-MNIST in ``assets/`` (:func:`load_demo`);
- Fashion-MNIST or MNIST idx files, gzipped or not (:func:`load_idx`);
- an ImageFolder directory ``train/<class>/*`` + ``test/<class>/*`` of any images
  (:func:`load_image_folder`), decoded by ``core.images`` exactly as uploads are.

:func:`open_dataset` picks the loader from a spec string, and :func:`resolve_under_roots` confines
server-side paths chosen in the UI to configured directories.

The loaders read every file through :func:`core.files.open_regular_file`: each is resolved and must
lie inside the allowed directories (by default the dataset's own directory, or the ``roots`` a
server passes), only regular files are opened (a FIFO would block the reader forever), and reads are
bounded (idx payloads by :data:`MAX_IDX_PAYLOAD_BYTES`, image files by their byte and pixel limits).
Class names and ids are printable UTF-8 text whatever bytes the file names hold
(:func:`core.files.printable`); the files are still read under their on-disk names.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DatasetError, ImageDecodeError, OutsideRootsError, UnreadableFileError
from core.files import (
    human_bytes,
    is_inside,
    open_regular_file,
    printable,
    read_regular_file,
    resolve_roots,
)
from core.images import DEFAULT_MAX_PIXELS, GRAYSCALE_MODES, decode_uploads

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))

DEMO_FILENAME = "fashion_mnist_demo.npz"
DEMO_FORMAT_VERSION = 1
ASSETS_DIR_ENV = "INFLUENCE_ASSETS_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the full idx files."""

MAX_IMAGE_FOLDER_FILES = 200_000
# The decoded arrays of an ImageFolder must fit in memory; past this, ask for a smaller image_size.
_MAX_IMAGE_FOLDER_ARRAY_BYTES = 4 * 2**30
# Per-file byte limit for ImageFolder files: larger than the upload limit, since camera originals
# are common in user datasets. Pixels are limited as for uploads (see folder_max_pixels).
_FOLDER_MAX_FILE_BYTES = 64 * 2**20
# Files handed to the decoding worker at once: one round trip per file would cost, on a busy
# machine, more waiting than decoding a small image takes. Bounded in bytes too (memory).
_BATCH_FILES = 64
_BATCH_BYTES = 32 * 2**20
FOLDER_MAX_PIXELS_ENV = "INFLUENCE_FOLDER_MAX_PIXELS"
"""Environment variable an operator sets to let ImageFolder files be larger than the upload limit."""
# Files that operating systems drop into folders and that are never images.
_JUNK_FILENAMES = frozenset({"thumbs.db", "desktop.ini"})

_IDS_PREFIX = {"fashion": "fmnist", "mnist": "mnist"}
_IDX_IMAGES_MAGIC_NDIM = 3
_IDX_LABELS_MAGIC_NDIM = 1
_IDX_UBYTE = 0x08
MAX_IDX_PAYLOAD_BYTES = 256 * 2**20
"""Largest payload read from one idx file: 340,000 images of 28x28, over five times the full
Fashion-MNIST training set (47 MB). Larger declarations are refused from the header; a gzip stream
that decompresses to more than its header declares is refused after at most this many bytes."""
_IDX_CHUNK_BYTES = 1 << 20


class Dataset:
    """Images, labels, class names and stable ids for a train and a test split.

    Arrays are stored as read-only views (not copied), so the cached :attr:`content_hash` cannot go
    stale; do not keep writing to arrays after handing them to a Dataset. Equality is identity
    (compare :attr:`content_hash` for equal content).

    Attributes:
        name: human name, e.g. "Fashion-MNIST" or "Fashion-MNIST [T-shirt/top vs Shirt]".
        class_names: one name per label, label i is ``class_names[i]``.
        train_images: (N_train, H, W, C) uint8, C = 1 (grayscale) or 3 (RGB).
        train_labels: (N_train,) int64 in [0, n_classes).
        train_ids: (N_train,) str, unique, stable across runs, e.g. "fmnist/train/12345" or
            "train/cat/001.jpg".
        test_images: (N_test, H, W, C) uint8.
        test_labels: (N_test,) int64.
        test_ids: (N_test,) str, unique within the split.
        source: where the data came from, for display.
        light_on_dark: True if objects are light on a dark background (Fashion-MNIST, MNIST);
            uploads are converted to that convention.
    """

    def __init__(
        self,
        *,
        name: str,
        class_names: Sequence[str],
        train_images: np.ndarray,
        train_labels: np.ndarray,
        train_ids: np.ndarray | Sequence[str],
        test_images: np.ndarray,
        test_labels: np.ndarray,
        test_ids: np.ndarray | Sequence[str],
        source: str = "",
        light_on_dark: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DatasetError("A dataset needs a non-empty name (str).")
        self.name = name
        self.class_names = _check_class_names(class_names)
        self.train_images, self.train_labels, self.train_ids = _check_split(
            "train", train_images, train_labels, train_ids, len(self.class_names)
        )
        self.test_images, self.test_labels, self.test_ids = _check_split(
            "test", test_images, test_labels, test_ids, len(self.class_names)
        )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DatasetError(
                f"Train images are {self.train_images.shape[1:]} (H, W, C) but test images are "
                f"{self.test_images.shape[1:]}; both splits need the same image shape."
            )
        train_counts = np.bincount(self.train_labels, minlength=len(self.class_names))
        empty = [self.class_names[c] for c in np.flatnonzero(train_counts == 0)]
        if empty:
            raise DatasetError(
                f"Class(es) {', '.join(map(repr, empty))} have no training images; every class "
                "needs at least one. Add images or leave the class out."
            )
        self.source = str(source)
        self.light_on_dark = bool(light_on_dark)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        h, w, c = self.train_images.shape[1:]
        return int(h), int(w), int(c)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_images.shape[0])

    @cached_property
    def content_hash(self) -> str:
        """sha256 hex digest of class names, images, labels and ids of both splits.

        A cache key: equal data gives an equal hash whatever the dataset's name, source or the
        arrays' memory layout; any change of a pixel, label, id or class name changes it.
        """
        digest = hashlib.sha256(b"influence-explorer/dataset/v1\0")
        _hash_strings(digest, "class_names", self.class_names)
        for split in ("train", "test"):
            images, labels, ids = self._split_arrays(split)
            for part, array in (("images", images), ("labels", labels)):
                digest.update(f"{split}/{part}:{array.dtype.str}:{array.shape}\0".encode())
                digest.update(np.ascontiguousarray(array))
            _hash_strings(digest, f"{split}/ids", ids.tolist())
        return digest.hexdigest()

    def class_counts(self, split: str) -> np.ndarray:
        """(n_classes,) int64 number of images per class in ``split`` ("train" or "test")."""
        _, labels, _ = self._split_arrays(split)
        return np.bincount(labels, minlength=self.n_classes)

    def select_classes(self, classes: Sequence[int | str]) -> Dataset:
        """A new dataset with only the given classes, relabelled 0..k-1 in the order given.

        Args:
            classes: class indices or names (mixed is fine), at least two, no repeats.

        Returns:
            A dataset named like "<name> [T-shirt/top vs Shirt]" keeping the original ids, so a
            training image can be traced back to the full dataset.

        Raises:
            DatasetError: unknown, repeated or too few classes.
        """
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
            raise DatasetError(
                f"select_classes takes a list of class indices or names, got {classes!r}; "
                "for example ['T-shirt/top', 'Shirt'] or [0, 6]."
            )
        chosen = [self._class_index(c) for c in classes]
        if len(set(chosen)) != len(chosen):
            repeated = sorted({self.class_names[i] for i in chosen if chosen.count(i) > 1})
            raise DatasetError(f"Class(es) {', '.join(map(repr, repeated))} were given twice.")
        if len(chosen) < 2:
            raise DatasetError("Select at least two classes; a classifier needs two to tell apart.")

        new_label = np.full(self.n_classes, -1, dtype=np.int64)
        new_label[chosen] = np.arange(len(chosen))
        parts: dict[str, Any] = {}
        for split in ("train", "test"):
            images, labels, ids = self._split_arrays(split)
            keep = new_label[labels] >= 0
            parts[f"{split}_images"] = images[keep]
            parts[f"{split}_labels"] = new_label[labels[keep]]
            parts[f"{split}_ids"] = ids[keep]
        if parts["test_images"].shape[0] == 0:
            raise DatasetError(
                "The selected classes have no test images; choose classes that appear in test/."
            )
        names = tuple(self.class_names[i] for i in chosen)
        return Dataset(
            name=f"{self.name} [{' vs '.join(names)}]",
            class_names=names,
            source=self.source,
            light_on_dark=self.light_on_dark,
            **parts,
        )

    def summary(self) -> dict[str, Any]:
        """A small, JSON-friendly description for display: shape and counts per class per split."""
        return {
            "name": self.name,
            "source": self.source,
            "image_shape": list(self.image_shape),
            "n_classes": self.n_classes,
            "class_names": list(self.class_names),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "counts": {
                split: {
                    name: int(count)
                    for name, count in zip(self.class_names, self.class_counts(split), strict=True)
                }
                for split in ("train", "test")
            },
            "light_on_dark": self.light_on_dark,
            "content_hash": self.content_hash[:12],
        }

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        return (
            f"Dataset(name={self.name!r}, n_classes={self.n_classes}, n_train={self.n_train}, "
            f"n_test={self.n_test}, image_shape=({h}, {w}, {c}))"
        )

    def _split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if split == "train":
            return self.train_images, self.train_labels, self.train_ids
        if split == "test":
            return self.test_images, self.test_labels, self.test_ids
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}.")

    def _class_index(self, cls: int | str) -> int:
        if isinstance(cls, (bool, np.bool_)):
            raise DatasetError(f"Classes are given by index or name, not {cls!r}.")
        if isinstance(cls, (int, np.integer)):
            index = int(cls)
            if not 0 <= index < self.n_classes:
                raise DatasetError(
                    f"Class index {index} is out of range; this dataset has classes "
                    f"0..{self.n_classes - 1}: {', '.join(self.class_names)}."
                )
            return index
        if isinstance(cls, str):
            if cls in self.class_names:
                return self.class_names.index(cls)
            raise DatasetError(
                f"No class named {cls!r}; the classes are: {', '.join(self.class_names)}."
            )
        raise DatasetError(f"Classes are given by index or name, not {type(cls).__name__}.")


# --- validation ---------------------------------------------------------------------------------


def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str):
        raise DatasetError("class_names must be a list of names, not one string.")
    names = tuple(class_names)
    if len(names) < 2:
        raise DatasetError(f"A dataset needs at least two classes, got {len(names)}.")
    for name in names:
        if not isinstance(name, str) or not name:
            raise DatasetError(f"Class names must be non-empty strings, got {name!r}.")
        if not _is_printable_text(name):
            raise DatasetError(
                f"Class name {name!r} is not printable UTF-8 text (it holds control characters or "
                "bytes that are not UTF-8), so front ends could not show it. Pass it through "
                "core.files.printable first."
            )
    if len(set(names)) != len(names):
        raise DatasetError(f"Class names must be distinct, got {list(names)}.")
    return names


def _check_split(
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray | Sequence[str],
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise DatasetError(
            f"{split}_images must be a uint8 numpy array (N, H, W, C), got {got}. "
            "Convert pixel values to 0..255 uint8 first."
        )
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        hint = " (add a channel axis: images[..., None])" if images.ndim == 3 else ""
        raise DatasetError(
            f"{split}_images must have shape (N, H, W, C) with C = 1 or 3, got "
            f"{images.shape}{hint}."
        )
    n, h, w, _ = images.shape
    if n == 0:
        raise DatasetError(f"The {split} split has no images.")
    if h == 0 or w == 0:
        raise DatasetError(f"{split}_images have an empty image size {h}×{w}.")

    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise DatasetError(
            f"{split}_labels must be integers of shape ({n},) to match {split}_images, got "
            f"{labels.dtype} {labels.shape}."
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        raise DatasetError(
            f"{split}_labels must lie in 0..{n_classes - 1} (one per class name), got {lo}..{hi}."
        )

    ids = np.asarray(ids)
    if ids.dtype.kind == "O" and all(isinstance(i, str) for i in ids.ravel()):
        ids = ids.astype(str)
    if ids.dtype.kind != "U" or ids.shape != (n,):
        raise DatasetError(
            f"{split}_ids must be {n} strings (one stable id per image, e.g. 'fmnist/{split}/12'), "
            f"got {ids.dtype} {ids.shape}."
        )
    if np.any(np.char.str_len(ids) == 0) or any("\0" in i for i in ids.tolist()):
        raise DatasetError(f"{split}_ids must be non-empty strings without NUL characters.")
    unprintable = [i for i in ids.tolist() if not _is_printable_text(i)]
    if unprintable:
        raise DatasetError(
            f"{split}_ids must be printable UTF-8 text; {unprintable[0]!r} is not (control "
            "characters or bytes that are not UTF-8). Pass ids through core.files.printable first."
        )
    unique, counts = np.unique(ids, return_counts=True)
    if unique.shape[0] != n:
        repeated = unique[counts > 1][:3].tolist()
        raise DatasetError(
            f"{split}_ids must be unique; {', '.join(map(repr, repeated))} occur more than once."
        )
    return _read_only(images), _read_only(labels.astype(np.int64, copy=False)), _read_only(ids)


def _is_printable_text(text: str) -> bool:
    # Lone surrogates (undecodable file-name bytes) cannot be encoded; Streamlit, JSON and terminals
    # fail on them, and control characters garble what they show.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return text.isprintable()


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _hash_strings(digest: Any, label: str, strings: Sequence[str]) -> None:
    # NUL-separated UTF-8 (NUL is refused in ids and cannot occur in class names we accept as
    # text); independent of the numpy string width, unlike hashing the array's raw bytes.
    digest.update(f"{label}:{len(strings)}\0".encode())
    digest.update("\0".join(strings).encode("utf-8", "surrogatepass"))
    digest.update(b"\0")


# --- bundled demo -------------------------------------------------------------------------------


def assets_dir() -> Path:
    """The directory of bundled assets: $INFLUENCE_ASSETS_DIR if set, else the repo's ``assets/``."""
    override = os.environ.get(ASSETS_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "assets"


def load_demo(path: str | PathLike[str] | None = None) -> Dataset:
    """The bundled demo: 500 train and 100 test images per class of all ten Fashion-MNIST classes.

    Ids are those of the full dataset ("fmnist/train/<index>"), so a demo image is the image of
    the same id in :func:`load_idx` on the full files.

    Args:
        path: the demo .npz; default ``assets_dir() / DEMO_FILENAME``.

    Returns:
        Dataset with (5000, 28, 28, 1) train and (1000, 28, 28, 1) test images, light on dark.

    Raises:
        DatasetError: the file is missing or damaged.
    """
    path = Path(path) if path is not None else assets_dir() / DEMO_FILENAME
    regenerate = (
        "Regenerate it with `python scripts/make_demo_assets.py` (needs the Fashion-MNIST idx "
        f"files), or point {ASSETS_DIR_ENV} at a directory that holds {DEMO_FILENAME}."
    )
    if not path.is_file():
        raise DatasetError(f"The bundled demo data is missing: no file {path}. {regenerate}")
    keys = [
        "class_names",
        "format_version",
        *(
            f"{split}_{part}"
            for split in ("train", "test")
            for part in ("images", "labels", "indices")
        ),
    ]
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DatasetError(
                    f"The bundled demo {path} lacks {', '.join(missing)}; it is not a demo file "
                    f"of this version. {regenerate}"
                )
            arrays = {k: archive[k] for k in keys}
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"The bundled demo {path} is damaged ({exc}). {regenerate}") from exc
    stored_version = arrays["format_version"]
    version = int(stored_version.reshape(-1)[0]) if stored_version.size == 1 else -1
    if version != DEMO_FORMAT_VERSION:
        raise DatasetError(
            f"The bundled demo {path} has format version {version}, this code reads "
            f"{DEMO_FORMAT_VERSION}. {regenerate}"
        )
    prefix = _IDS_PREFIX["fashion"]
    return Dataset(
        name="Fashion-MNIST demo",
        class_names=tuple(str(c) for c in arrays["class_names"].tolist()),
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        train_ids=np.array([f"{prefix}/train/{i}" for i in arrays["train_indices"].tolist()]),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        test_ids=np.array([f"{prefix}/test/{i}" for i in arrays["test_indices"].tolist()]),
        source=f"bundled demo {path} (stratified subset of Fashion-MNIST; see assets/README.md)",
        light_on_dark=True,
    )


# --- idx files (Fashion-MNIST, MNIST) -----------------------------------------------------------


def load_idx(
    directory: str | PathLike[str],
    name: str | None = None,
    *,
    kind: str | None = None,
    roots: Sequence[str | PathLike[str]] | None = None,
    max_payload_bytes: int = MAX_IDX_PAYLOAD_BYTES,
) -> Dataset:
    """Load Fashion-MNIST or MNIST from its four idx files, gzipped or not.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` in ``directory``, each optionally ending in ``.gz`` (also the
    ``train-images.idx3-ubyte`` spelling of some mirrors). Magic numbers, dimensions, counts and
    gzip integrity are checked.

    Args:
        directory: the directory holding the files.
        name: dataset name; default "Fashion-MNIST" or "MNIST".
        kind: "fashion" (Fashion-MNIST's ten class names) or "mnist" (digits "0".."9"). Default:
            "fashion" if ``name`` or the directory path contains "fashion", else "mnist".
        roots: directories every file must lie in once symlinks are followed; default: the
            dataset directory itself (see :func:`load_image_folder`).
        max_payload_bytes: refuse an idx file whose payload is larger (default
            :data:`MAX_IDX_PAYLOAD_BYTES`); it is checked against the header before reading and
            against the data as it is decompressed.

    Returns:
        Dataset of (N, H, W, 1) images, light on dark, ids like "fmnist/train/12345" (the index in
        the original file).

    Raises:
        DatasetError: missing directory or file, damaged gzip, wrong magic number, counts that do
            not match, labels out of range, a file larger than ``max_payload_bytes``, a link
            leading outside the allowed directories, or a file that is not a regular file.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(
            f"No directory {printable(root)}. Give the directory that holds the idx files "
            "(train-images-idx3-ubyte[.gz], ...)."
        )
    allowed = _allowed_directories(root, roots)
    if kind is None:
        haystack = f"{name or ''} {root.resolve()}".lower()
        kind = "fashion" if "fashion" in haystack else "mnist"
    if kind not in _IDS_PREFIX:
        raise DatasetError(f"kind must be 'fashion' or 'mnist', got {kind!r}.")
    class_names = FASHION_MNIST_CLASSES if kind == "fashion" else MNIST_CLASSES

    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, file_prefix in (("train", "train"), ("test", "t10k")):
        images_path = _find_idx_file(root, file_prefix, "images", _IDX_IMAGES_MAGIC_NDIM)
        labels_path = _find_idx_file(root, file_prefix, "labels", _IDX_LABELS_MAGIC_NDIM)
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC_NDIM, allowed, max_payload_bytes)
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC_NDIM, allowed, max_payload_bytes)
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{images_path.name} holds {images.shape[0]} images but {labels_path.name} holds "
                f"{labels.shape[0]} labels; they must come from the same release."
            )
        if labels.size and int(labels.max()) >= len(class_names):
            raise DatasetError(
                f"{labels_path.name} has label {int(labels.max())}, but {kind} has only "
                f"{len(class_names)} classes (0..{len(class_names) - 1})."
            )
        splits[split] = (images[..., None], labels.astype(np.int64))

    prefix = _IDS_PREFIX[kind]
    return Dataset(
        name=name or ("Fashion-MNIST" if kind == "fashion" else "MNIST"),
        class_names=class_names,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        train_ids=np.array([f"{prefix}/train/{i}" for i in range(splits["train"][0].shape[0])]),
        test_images=splits["test"][0],
        test_labels=splits["test"][1],
        test_ids=np.array([f"{prefix}/test/{i}" for i in range(splits["test"][0].shape[0])]),
        source=printable(root),
        light_on_dark=True,
    )


def _idx_candidates(file_prefix: str, part: str, ndim: int) -> list[str]:
    stems = [f"{file_prefix}-{part}-idx{ndim}-ubyte", f"{file_prefix}-{part}.idx{ndim}-ubyte"]
    return [stem + suffix for stem in stems for suffix in ("", ".gz")]


def _find_idx_file(root: Path, file_prefix: str, part: str, ndim: int) -> Path:
    candidates = _idx_candidates(file_prefix, part, ndim)
    for candidate in candidates:
        # Whatever it is: opening it says so if it is not a regular file, or leads outside.
        if os.path.lexists(root / candidate):
            return root / candidate
    raise DatasetError(
        f"{printable(root)} has no {candidates[0]} (or {candidates[1]}). An idx dataset needs "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte, each optionally gzipped (.gz)."
    )


def _read_idx(path: Path, expected_ndim: int, allowed: Sequence[Path], limit: int) -> np.ndarray:
    """Read an idx file of unsigned bytes: big-endian magic 0x0000 08 <ndim>, dims, payload.

    The declared size is checked against ``limit`` before any payload is read, and the payload is
    read in chunks up to one byte past the declaration: a small gzip file that decompresses to
    gigabytes costs at most ``limit`` bytes of memory, and nothing is allocated for a size that
    was only declared.
    """
    damaged = "The file is damaged or incomplete; download or install it again."
    shown = printable(path.name)
    try:
        with open_regular_file(path, roots=allowed, shown=shown) as raw:
            is_gzip = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
            with stream:
                dims, expected = _read_idx_header(stream, shown, expected_ndim, damaged)
                if expected > limit:
                    raise DatasetError(
                        f"{shown} declares dimensions {dims} ({expected:,} bytes), far too large: "
                        f"this app reads at most {human_bytes(limit)} from one idx file (about "
                        f"{limit // 784:,} images of 28×28). {damaged}"
                    )
                # One byte more than declared tells a file with trailing data from a complete one;
                # at end of stream gzip also verifies its CRC and length.
                payload = _read_at_most(stream, expected + 1)
    except (DatasetError, UnreadableFileError) as exc:
        raise DatasetError(str(exc)) from None
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a cut-off .gz raises EOFError; bad deflate data zlib.error.
        raise DatasetError(f"{shown} could not be read ({exc}). {damaged}") from exc
    if len(payload) != expected:
        problem = "is missing data" if len(payload) < expected else "has extra data after"
        raise DatasetError(
            f"{shown} {problem} its declared dimensions {dims} ({expected} bytes). {damaged}"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _read_idx_header(
    stream: Any, shown: str, expected_ndim: int, damaged: str
) -> tuple[tuple[int, ...], int]:
    header = stream.read(4)
    if len(header) < 4:
        raise DatasetError(f"{shown} is too short to be an idx file. {damaged}")
    if header[:2] != b"\0\0" or header[2] != _IDX_UBYTE or header[3] != expected_ndim:
        magic = int.from_bytes(header, "big")
        raise DatasetError(
            f"{shown} has magic number {magic:#010x}, expected {0x800 + expected_ndim:#010x} "
            f"(unsigned bytes, {expected_ndim} dimension(s)). Is it the right file?"
        )
    dims_bytes = stream.read(4 * expected_ndim)
    if len(dims_bytes) < 4 * expected_ndim:
        raise DatasetError(f"{shown} ends inside its header. {damaged}")
    dims = struct.unpack(f">{expected_ndim}I", dims_bytes)
    # Python ints: a damaged header's dims can overflow a fixed-width product.
    return dims, math.prod(dims)


def _read_at_most(stream: Any, size: int) -> bytearray:
    """Up to ``size`` bytes, in chunks: memory grows with what the stream delivers, not a claim."""
    payload = bytearray()
    while len(payload) < size:
        chunk = stream.read(min(_IDX_CHUNK_BYTES, size - len(payload)))
        if not chunk:
            break
        payload += chunk
    return payload


# --- ImageFolder ----------------------------------------------------------------------------------


def load_image_folder(
    directory: str | PathLike[str],
    image_size: tuple[int, int] = (64, 64),
    mode: str = "auto",
    *,
    max_files: int = MAX_IMAGE_FOLDER_FILES,
    progress: Callable[[int, int], None] | None = None,
    roots: Sequence[str | PathLike[str]] | None = None,
    max_pixels: int | None = None,
) -> Dataset:
    """Load ``train/<class>/*`` and ``test/<class>/*`` image files into a Dataset.

    Classes are the sorted names of the sub-directories of ``train/``; ``test/`` may hold a subset
    of them. Files are found recursively under each class directory; hidden files and directories
    (".*") and OS junk (Thumbs.db, desktop.ini) are skipped; every other entry must be an image
    file. Each file is decoded by :func:`core.images.decode_uploads` (EXIF rotation, mode
    conversion, transparency onto white, center-crop and resize), so an upload of the same file
    gives the same pixels.

    Symbolic links are followed only where they stay inside the allowed directories: by default
    the dataset directory itself, or ``roots`` when a server confines datasets to some directories.
    A class directory, sub-directory or file that leads outside is refused with a message naming
    it by its path inside the dataset (never its target), as is anything that is not a regular
    file (a named pipe would block the reader forever).

    Args:
        directory: the dataset root, holding ``train/`` and ``test/``.
        image_size: (height, width) of the stored images.
        mode: "RGB", "L" (grayscale), or "auto": "L" if every file is grayscale, else "RGB".
        max_files: refuse trees with more files than this.
        progress: called as ``progress(done, total)`` while decoding.
        roots: directories every file must lie in once symlinks are followed; default: the dataset
            directory.
        max_pixels: refuse files declaring more pixels; default :func:`folder_max_pixels` (the
            upload limit, or ``$INFLUENCE_FOLDER_MAX_PIXELS``).

    Returns:
        Dataset with (N, H, W, C) images, class names and ids as printable text, ids = paths
        relative to ``directory`` in POSIX form (e.g. "train/cat/001.jpg"), light_on_dark False.

    Raises:
        DatasetError: wrong layout, test classes missing from train, empty classes, too many
            files, links leading outside the allowed directories, names that cannot be told apart
            once made printable, or files that cannot be read or decoded (all of them are listed).
    """
    root = Path(directory)
    shown_root = printable(root)
    height, width = _check_image_size(image_size)
    if mode not in ("auto", "RGB", "L"):
        raise DatasetError(f"mode must be 'auto', 'RGB' or 'L', got {mode!r}.")
    pixel_limit = folder_max_pixels() if max_pixels is None else int(max_pixels)
    if not root.is_dir():
        raise DatasetError(f"No directory {shown_root}. {_LAYOUTS}")
    allowed = _allowed_directories(root, roots)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DatasetError(f"{shown_root} has no {split}/ directory. {_LAYOUTS}")
        if not _stays_inside(root / split, allowed):
            raise _leads_outside([f"{split}/"], roots)

    train_classes = _class_directories(root, "train", allowed, roots)
    if len(train_classes) < 2:
        raise DatasetError(
            f"{shown_root}/train has {len(train_classes)} class director(y/ies); an ImageFolder "
            "dataset needs at least two (train/<class>/...)."
        )
    test_classes = _class_directories(root, "test", allowed, roots)
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        raise DatasetError(
            f"test/ has class(es) {', '.join(map(repr, unknown))} that train/ does not; the model "
            "cannot predict a class it was not trained on. Add them to train/ or remove them."
        )
    label_of = {name: index for index, name in enumerate(train_classes)}

    files: list[tuple[str, _Found, int]] = []  # (split, file, label)
    outside: list[str] = []
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for class_name, class_dir in classes.items():
            found = _image_files(
                class_dir,
                f"{split}/{class_name}",
                allowed,
                max_files - len(files),
                max_files,
                outside,
            )
            if split == "train" and not found and not outside:
                raise DatasetError(
                    f"{shown_root}/{split}/{class_name} holds no image files; every class needs "
                    "training images."
                )
            files.extend((split, file, label_of[class_name]) for file in found)
    if outside:
        raise _leads_outside(outside, roots)
    if not any(split == "test" for split, _, _ in files):
        raise DatasetError(f"{shown_root}/test holds no image files; add test images.")
    _check_unique_ids([file.shown for _, file, _ in files])
    channels_decoded = 1 if mode == "L" else 3
    array_bytes = len(files) * height * width * channels_decoded
    if array_bytes > _MAX_IMAGE_FOLDER_ARRAY_BYTES:
        raise DatasetError(
            f"{len(files)} images of {height}×{width}×{channels_decoded} need "
            f"{array_bytes / 2**30:.1f} GiB in memory; choose a smaller image_size or fewer images."
        )

    images = np.empty((len(files), height, width, channels_decoded), dtype=np.uint8)
    all_grayscale = True
    failures: list[str] = []
    for batch in _batches(files):
        # Read in the parent (confined, bounded), decoded together by a worker (bounded too).
        readable: list[tuple[int, _Found, bytes]] = []
        for position in batch:
            file = files[position][1]
            try:
                data = read_regular_file(
                    file.path, _FOLDER_MAX_FILE_BYTES, roots=allowed, shown=file.shown
                )
            except UnreadableFileError as exc:
                failures.append(str(exc))  # names the file already
            else:
                readable.append((position, file, data))
        decoded_batch = decode_uploads(
            [data for _, _, data in readable],
            target_shape=(height, width, channels_decoded),
            light_on_dark=False,
            max_bytes=_FOLDER_MAX_FILE_BYTES,
            max_pixels=pixel_limit,
        )
        for (position, file, _), decoded in zip(readable, decoded_batch, strict=True):
            if isinstance(decoded, ImageDecodeError):
                failures.append(f"{file.shown}: {decoded}")
            else:
                images[position] = decoded.image
                all_grayscale = all_grayscale and decoded.original_mode in GRAYSCALE_MODES
        if progress is not None:
            progress(batch[-1] + 1, len(files))
    if failures:
        shown = "\n  ".join(failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise DatasetError(
            f"{len(failures)} of {len(files)} files under {shown_root} could not be read as "
            f"images; remove or convert them:\n  {shown}{more}"
        )
    if mode == "auto" and all_grayscale:
        # Grayscale decoded to RGB has three equal channels, identical to decoding to "L".
        images = np.ascontiguousarray(images[..., :1])

    # Files were listed train first, then test: slicing gives views, where a boolean mask would
    # copy the (possibly multi-GB) image array.
    n_train = sum(split == "train" for split, _, _ in files)
    labels = np.array([label for _, _, label in files], dtype=np.int64)
    ids = np.array([file.shown for _, file, _ in files])
    return Dataset(
        name=printable(root.resolve().name) or shown_root,
        class_names=tuple(train_classes),
        train_images=images[:n_train],
        train_labels=labels[:n_train],
        train_ids=ids[:n_train],
        test_images=images[n_train:],
        test_labels=labels[n_train:],
        test_ids=ids[n_train:],
        source=shown_root,
        light_on_dark=False,
    )


def folder_max_pixels() -> int:
    """Pixel limit for ImageFolder files: the upload limit, unless ``$INFLUENCE_FOLDER_MAX_PIXELS``.

    The same 40 megapixels as uploads by default: a dataset folder may come from anyone too, and a
    decode's time and memory grow with its pixels. An operator whose datasets hold larger camera
    originals raises it (the decoding worker's CPU and memory allowance grow with it).

    Raises:
        DatasetError: the variable is set but not a positive whole number.
    """
    raw = os.environ.get(FOLDER_MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    if not raw.isdigit() or int(raw) < 1:
        raise DatasetError(
            f"${FOLDER_MAX_PIXELS_ENV} is {raw!r}; set it to a number of pixels such as 89000000, "
            "or unset it for the default of 40 megapixels."
        )
    return int(raw)


_LAYOUTS = (
    "Accepted layouts: an ImageFolder directory with train/<class>/<images> and "
    "test/<class>/<images>, or a directory with the Fashion-MNIST/MNIST idx files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz])."
)


def _batches(files: Sequence[tuple[str, _Found, int]]) -> list[list[int]]:
    """Positions of ``files`` in groups of at most _BATCH_FILES files or about _BATCH_BYTES."""
    batches: list[list[int]] = [[]]
    size = 0
    for position, (_, file, _) in enumerate(files):
        try:
            length = os.stat(file.path).st_size
        except OSError:
            length = 0  # reading it will say what is wrong
        if batches[-1] and (len(batches[-1]) >= _BATCH_FILES or size + length > _BATCH_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(position)
        size += length
    return [batch for batch in batches if batch]


@dataclass(frozen=True)
class _Found:
    """A file found under a class directory."""

    path: Path  # as found on disk (through the dataset's own directories), used to read it
    shown: (
        str  # printable POSIX path relative to the dataset root: its id, and how messages name it
    )


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise DatasetError(f"image_size must be (height, width), got {image_size!r}.") from None
    if not (1 <= height <= 4096 and 1 <= width <= 4096):
        raise DatasetError(f"image_size must be between 1 and 4096 pixels, got {image_size!r}.")
    return height, width


def _is_skipped(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_FILENAMES


def _allowed_directories(
    root: Path, roots: Sequence[str | PathLike[str]] | None
) -> tuple[Path, ...]:
    """The resolved directories a dataset's files must stay in: ``roots``, else the dataset's own."""
    if roots is None:
        return resolve_roots([root])
    allowed = resolve_roots(roots)
    if not allowed or not _stays_inside(root, allowed):
        raise OutsideRootsError(
            f"{printable(root)} is outside the allowed dataset directories; a symlink that leads "
            "out of them is refused too."
        )
    return allowed


def _stays_inside(path: Path, allowed: Sequence[Path]) -> bool:
    return is_inside(Path(os.path.realpath(path)), allowed)


def _leads_outside(
    shown: Sequence[str], roots: Sequence[str | PathLike[str]] | None
) -> OutsideRootsError:
    where = "the dataset directory" if roots is None else "the allowed dataset directories"
    listed = ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "")
    return OutsideRootsError(
        f"{listed}: symbolic link(s) leading outside {where}, so they were not read. Copy the "
        "images into the dataset instead of linking to them, or remove the links."
    )


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as listing:
            return sorted((e for e in listing if not _is_skipped(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(
            f"{printable(directory)} could not be listed: {exc.strerror or exc}."
        ) from None


def _is_directory(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows a symlink; stat only, so a FIFO does not block
    except OSError:
        return False


def _class_directories(
    root: Path, split: str, allowed: Sequence[Path], roots: Sequence[str | PathLike[str]] | None
) -> dict[str, Path]:
    """Printable class name -> its directory on disk, sorted; links leading outside refused."""
    classes: dict[str, Path] = {}
    outside: list[str] = []
    for entry in _entries(root / split):
        if not _is_directory(entry):
            continue
        name = printable(entry.name)
        if not _stays_inside(Path(entry.path), allowed):
            outside.append(f"{split}/{name}")
            continue
        if name in classes:
            raise DatasetError(
                f"Two class directories in {split}/ are both shown as {name!r}: their names differ "
                "only in bytes that are not UTF-8 text. Rename them (UTF-8 names are best)."
            )
        classes[name] = Path(entry.path)
    if outside:
        raise _leads_outside(outside, roots)
    return classes


def _image_files(
    class_dir: Path,
    shown_dir: str,
    allowed: Sequence[Path],
    remaining: int,
    max_files: int,
    outside: list[str],
) -> list[_Found]:
    """Non-hidden files under ``class_dir``, recursively, in a stable (sorted) order.

    The order is ``os.walk``'s top-down one (a directory's files, then each sub-directory in
    turn). Sub-directories reached through symlinks are walked if they stay inside ``allowed``
    (each real directory once, so a link loop ends); those leading outside are added to
    ``outside`` and not listed, as are files that are links leading outside. Other entries that
    are not directories are returned whatever they are: opening them refuses what is not a regular
    file, with a message. Stops as soon as more than
    ``remaining`` files are found, so a huge tree is refused without listing all of it.
    """
    found: list[_Found] = []
    walked: set[tuple[int, int]] = set()
    pending = [(class_dir, shown_dir)]
    while pending:
        directory, shown = pending.pop()
        # Checked again just before listing: a directory swapped for a link since its parent was
        # listed must not have its names listed (files are also checked when opened).
        if not _stays_inside(directory, allowed):
            outside.append(shown)
            continue
        try:
            info = os.stat(directory)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in walked:
            continue
        walked.add((info.st_dev, info.st_ino))
        subdirectories: list[tuple[Path, str]] = []
        for entry in _entries(directory):
            entry_shown = f"{shown}/{printable(entry.name)}"
            if entry.is_symlink() and not _stays_inside(Path(entry.path), allowed):
                # Refused together, before anything is decoded; opening re-checks (races).
                outside.append(entry_shown)
            elif not _is_directory(entry):
                found.append(_Found(Path(entry.path), entry_shown))
                if len(found) > remaining:
                    raise DatasetError(
                        f"The dataset holds more than {max_files:,} files, more than this app "
                        "loads at once; use a subset."
                    )
            else:
                subdirectories.append((Path(entry.path), entry_shown))
        pending.extend(reversed(subdirectories))
    return found


def _check_unique_ids(ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for file_id in ids:
        if file_id in seen:
            raise DatasetError(
                f"Two files are both shown as {file_id!r}: their names differ only in bytes that "
                "are not UTF-8 text. Rename them (UTF-8 names are best)."
            )
        seen.add(file_id)


# --- one entry point and path confinement ---------------------------------------------------------


def open_dataset(
    spec: str | PathLike[str],
    *,
    image_size: tuple[int, int] = (64, 64),
    roots: Sequence[str | PathLike[str]] | None = None,
) -> Dataset:
    """Open a dataset from a spec: "demo", "fashion-mnist" (the Debian files) or a directory.

    A directory holding idx files is read by :func:`load_idx`; one with ``train/`` and ``test/`` by
    :func:`load_image_folder` (with ``image_size``).

    Args:
        spec: "demo", "fashion-mnist" or a directory.
        image_size: (height, width) ImageFolder images are resized to.
        roots: for a server: the directories datasets may be read from. The directory is then
            resolved by :func:`resolve_under_roots` and every file read must lie inside them. By
            default every file must lie inside the dataset directory itself.

    Raises:
        DatasetError: the spec names neither; the message lists the accepted layouts.
    """
    text = os.fspath(spec)
    if text == "demo":
        return load_demo()
    if text == "fashion-mnist" and not Path(text).exists():
        return load_idx(DEBIAN_FASHION_MNIST_DIR, kind="fashion")
    root = resolve_under_roots(text, roots) if roots is not None else Path(text)
    if not root.is_dir():
        raise DatasetError(
            f"{printable(text)!r} is neither 'demo', 'fashion-mnist' nor an existing directory. "
            f"{_LAYOUTS}"
        )
    if any((root / c).is_file() for c in _idx_candidates("train", "images", 3)):
        return load_idx(root, roots=roots)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return load_image_folder(root, image_size=image_size, roots=roots)
    raise DatasetError(f"{printable(root)} does not look like a dataset. {_LAYOUTS}")


def resolve_under_roots(path: str | PathLike[str], roots: Sequence[str | PathLike[str]]) -> Path:
    """Resolve a server-side path chosen in the UI, refusing anything outside the allowed roots.

    A relative path is taken relative to each root in turn (the first where it exists wins).
    Symlinks are resolved before the check, so a link inside a root that points elsewhere is
    refused; ".." components are refused outright, even when they would stay inside.

    Args:
        path: the path the user gave.
        roots: directories the server allows datasets to be read from.

    Returns:
        The resolved, existing path, inside one of the resolved roots.

    Raises:
        DatasetError: no roots, ".." in the path, a path that does not exist, or one that resolves
            outside every root.
    """
    if not roots:
        raise DatasetError(
            "No dataset directories are configured on this server, so no path can be opened."
        )
    text = os.fspath(path)
    if not text or "\0" in text:
        raise DatasetError("Give a dataset path (a non-empty path without NUL characters).")
    requested = Path(text)
    if ".." in requested.parts:
        raise DatasetError(
            f"{printable(text)!r} contains '..'; give a path inside the allowed directories."
        )
    allowed = [Path(root).resolve() for root in roots]
    listing = ", ".join(printable(root) for root in allowed)
    outside = OutsideRootsError(
        f"{printable(text)!r} is outside the allowed dataset directories ({listing}); a symlink that "
        "leads out of them is refused too."
    )
    if requested.is_absolute():
        # Refuse before looking at the file system, so the message never tells a user whether
        # a path elsewhere on the server exists.
        given = [Path(os.path.abspath(root)) for root in roots] + allowed
        if not any(requested == root or requested.is_relative_to(root) for root in given):
            raise outside

    candidates = [requested] if requested.is_absolute() else [root / requested for root in allowed]
    existing = [c for c in candidates if c.exists()]
    if not existing:
        raise DatasetError(
            f"{printable(text)!r} does not exist under the allowed directories ({listing})."
        )
    resolved = existing[0].resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        raise outside
    return resolved
