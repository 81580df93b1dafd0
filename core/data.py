"""Datasets: uint8 images with labels, class names and stable ids, and the loaders that make them.

Three sources, one :class:`Dataset`:

- the bundled demo, a stratified subset of Fashion-MNIST in ``assets/`` (:func:`load_demo`);
- Fashion-MNIST or MNIST idx files, gzipped or not (:func:`load_idx`);
- an ImageFolder directory ``train/<class>/*`` + ``test/<class>/*`` of any images
  (:func:`load_image_folder`), decoded by ``core.images`` exactly as uploads are.

:func:`open_dataset` picks the loader from a spec string, and :func:`resolve_under_roots` confines
server-side paths chosen in the UI to configured directories.
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
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DatasetError, ImageDecodeError
from core.images import GRAYSCALE_MODES, decode_upload, read_bounded

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
# Per-file limits for ImageFolder files: larger than upload limits (camera originals are common in
# user datasets) but under Pillow's own decompression-bomb warning at ~89 megapixels.
_FOLDER_MAX_FILE_BYTES = 64 * 2**20
_FOLDER_MAX_PIXELS = 89_000_000
# Files that operating systems drop into folders and that are never images.
_JUNK_FILENAMES = frozenset({"thumbs.db", "desktop.ini"})

_IDS_PREFIX = {"fashion": "fmnist", "mnist": "mnist"}
_IDX_IMAGES_MAGIC_NDIM = 3
_IDX_LABELS_MAGIC_NDIM = 1
_IDX_UBYTE = 0x08
# No genuine idx file this app reads is anywhere near this; a larger declaration is a damaged header.
_MAX_IDX_PAYLOAD_BYTES = 2**32


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
    unique, counts = np.unique(ids, return_counts=True)
    if unique.shape[0] != n:
        repeated = unique[counts > 1][:3].tolist()
        raise DatasetError(
            f"{split}_ids must be unique; {', '.join(map(repr, repeated))} occur more than once."
        )
    return _read_only(images), _read_only(labels.astype(np.int64, copy=False)), _read_only(ids)


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
    directory: str | PathLike[str], name: str | None = None, *, kind: str | None = None
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

    Returns:
        Dataset of (N, H, W, 1) images, light on dark, ids like "fmnist/train/12345" (the index in
        the original file).

    Raises:
        DatasetError: missing directory or file, damaged gzip, wrong magic number, counts that do
            not match, labels out of range.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(
            f"No directory {root}. Give the directory that holds the idx files "
            "(train-images-idx3-ubyte[.gz], ...)."
        )
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
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC_NDIM)
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC_NDIM)
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
        source=str(root),
        light_on_dark=True,
    )


def _idx_candidates(file_prefix: str, part: str, ndim: int) -> list[str]:
    stems = [f"{file_prefix}-{part}-idx{ndim}-ubyte", f"{file_prefix}-{part}.idx{ndim}-ubyte"]
    return [stem + suffix for stem in stems for suffix in ("", ".gz")]


def _find_idx_file(root: Path, file_prefix: str, part: str, ndim: int) -> Path:
    candidates = _idx_candidates(file_prefix, part, ndim)
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    raise DatasetError(
        f"{root} has no {candidates[0]} (or {candidates[1]}). An idx dataset needs "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte, each optionally gzipped (.gz)."
    )


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes: big-endian magic 0x0000 08 <ndim>, dims, payload."""
    damaged = "The file is damaged or incomplete; download or install it again."
    try:
        with path.open("rb") as raw:
            is_gzip = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if is_gzip else open
        with opener(path, "rb") as stream:
            header = stream.read(4)
            if len(header) < 4:
                raise DatasetError(f"{path} is too short to be an idx file. {damaged}")
            if header[:2] != b"\0\0" or header[2] != _IDX_UBYTE or header[3] != expected_ndim:
                magic = int.from_bytes(header, "big")
                raise DatasetError(
                    f"{path} has magic number {magic:#010x}, expected {0x800 + expected_ndim:#010x} "
                    f"(unsigned bytes, {expected_ndim} dimension(s)). Is it the right file?"
                )
            dims_bytes = stream.read(4 * expected_ndim)
            if len(dims_bytes) < 4 * expected_ndim:
                raise DatasetError(f"{path} ends inside its header. {damaged}")
            dims = struct.unpack(f">{expected_ndim}I", dims_bytes)
            # Python ints: a damaged header's dims can overflow a fixed-width product.
            expected = math.prod(dims)
            if expected > _MAX_IDX_PAYLOAD_BYTES:
                raise DatasetError(f"{path} declares dimensions {dims}, far too large. {damaged}")
            # One byte more than declared tells a file with trailing data from a complete one; at
            # end of stream gzip also verifies its CRC and length.
            payload = stream.read(expected + 1)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"No file {path}.") from None
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a cut-off .gz raises EOFError; bad deflate data zlib.error.
        raise DatasetError(f"{path} could not be read ({exc}). {damaged}") from exc
    if len(payload) != expected:
        problem = "is missing data" if len(payload) < expected else "has extra data after"
        raise DatasetError(
            f"{path} {problem} its declared dimensions {dims} ({expected} bytes). {damaged}"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


# --- ImageFolder ----------------------------------------------------------------------------------


def load_image_folder(
    directory: str | PathLike[str],
    image_size: tuple[int, int] = (64, 64),
    mode: str = "auto",
    *,
    max_files: int = MAX_IMAGE_FOLDER_FILES,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Load ``train/<class>/*`` and ``test/<class>/*`` image files into a Dataset.

    Classes are the sorted names of the sub-directories of ``train/``; ``test/`` may hold a subset
    of them. Files are found recursively under each class directory; hidden files and directories
    (".*") and OS junk (Thumbs.db, desktop.ini) are skipped; every other file must be an image.
    Each file is decoded by :func:`core.images.decode_upload` (EXIF rotation, mode conversion,
    transparency onto white, center-crop and resize), so an upload of the same file gives the same
    pixels.

    Args:
        directory: the dataset root, holding ``train/`` and ``test/``.
        image_size: (height, width) of the stored images.
        mode: "RGB", "L" (grayscale), or "auto": "L" if every file is grayscale, else "RGB".
        max_files: refuse trees with more files than this.
        progress: called as ``progress(done, total)`` while decoding.

    Returns:
        Dataset with (N, H, W, C) images, ids = paths relative to ``directory`` in POSIX form
        (e.g. "train/cat/001.jpg"), light_on_dark False.

    Raises:
        DatasetError: wrong layout, test classes missing from train, empty classes, too many
            files, or files that cannot be decoded (all of them are listed).
    """
    root = Path(directory)
    height, width = _check_image_size(image_size)
    if mode not in ("auto", "RGB", "L"):
        raise DatasetError(f"mode must be 'auto', 'RGB' or 'L', got {mode!r}.")
    if not root.is_dir():
        raise DatasetError(f"No directory {root}. {_LAYOUTS}")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DatasetError(f"{root} has no {split}/ directory. {_LAYOUTS}")

    train_classes = _class_directories(root / "train")
    if len(train_classes) < 2:
        raise DatasetError(
            f"{root / 'train'} has {len(train_classes)} class director(y/ies); an ImageFolder "
            "dataset needs at least two (train/<class>/...)."
        )
    test_classes = _class_directories(root / "test")
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        raise DatasetError(
            f"test/ has class(es) {', '.join(map(repr, unknown))} that train/ does not; the model "
            "cannot predict a class it was not trained on. Add them to train/ or remove them."
        )
    label_of = {name: index for index, name in enumerate(train_classes)}

    files: list[tuple[str, Path, int]] = []  # (split, path, label)
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for class_name in classes:
            found = _image_files(root / split / class_name, max_files - len(files), max_files)
            if split == "train" and not found:
                raise DatasetError(
                    f"{root / split / class_name} holds no image files; every class needs "
                    "training images."
                )
            files.extend((split, path, label_of[class_name]) for path in found)
    if not any(split == "test" for split, _, _ in files):
        raise DatasetError(f"{root / 'test'} holds no image files; add test images.")
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
    for position, (_, path, _) in enumerate(files):
        relative = path.relative_to(root).as_posix()
        try:
            data = read_bounded(path, _FOLDER_MAX_FILE_BYTES)
            decoded = decode_upload(
                data,
                target_shape=(height, width, channels_decoded),
                light_on_dark=False,
                max_bytes=_FOLDER_MAX_FILE_BYTES,
                max_pixels=_FOLDER_MAX_PIXELS,
            )
        except ImageDecodeError as exc:
            failures.append(f"{relative}: {exc}")
        else:
            images[position] = decoded.image
            all_grayscale = all_grayscale and decoded.original_mode in GRAYSCALE_MODES
        if progress is not None and (position % 64 == 0 or position == len(files) - 1):
            progress(position + 1, len(files))
    if failures:
        shown = "\n  ".join(failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise DatasetError(
            f"{len(failures)} of {len(files)} files under {root} could not be read as images; "
            f"remove or convert them:\n  {shown}{more}"
        )
    if mode == "auto" and all_grayscale:
        # Grayscale decoded to RGB has three equal channels, identical to decoding to "L".
        images = np.ascontiguousarray(images[..., :1])

    # Files were listed train first, then test: slicing gives views, where a boolean mask would
    # copy the (possibly multi-GB) image array.
    n_train = sum(split == "train" for split, _, _ in files)
    labels = np.array([label for _, _, label in files], dtype=np.int64)
    ids = np.array([path.relative_to(root).as_posix() for _, path, _ in files])
    return Dataset(
        name=root.resolve().name or str(root),
        class_names=train_classes,
        train_images=images[:n_train],
        train_labels=labels[:n_train],
        train_ids=ids[:n_train],
        test_images=images[n_train:],
        test_labels=labels[n_train:],
        test_ids=ids[n_train:],
        source=str(root),
        light_on_dark=False,
    )


_LAYOUTS = (
    "Accepted layouts: an ImageFolder directory with train/<class>/<images> and "
    "test/<class>/<images>, or a directory with the Fashion-MNIST/MNIST idx files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz])."
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


def _class_directories(split_dir: Path) -> tuple[str, ...]:
    return tuple(
        sorted(
            entry.name
            for entry in split_dir.iterdir()
            if entry.is_dir() and not _is_skipped(entry.name)
        )
    )


def _image_files(class_dir: Path, remaining: int, max_files: int) -> list[Path]:
    """Non-hidden files under ``class_dir``, recursively, in a stable (sorted) order.

    Stops walking as soon as more than ``remaining`` files are found, so a huge tree is refused
    without listing all of it.
    """
    found: list[Path] = []
    for current, dirnames, filenames in os.walk(class_dir):
        # Pruning in place stops os.walk from descending into hidden directories.
        dirnames[:] = sorted(d for d in dirnames if not _is_skipped(d))
        for filename in sorted(filenames):
            if _is_skipped(filename):
                continue
            found.append(Path(current) / filename)
            if len(found) > remaining:
                raise DatasetError(
                    f"The dataset holds more than {max_files:,} files, more than this app loads "
                    "at once; use a subset."
                )
    return found


# --- one entry point and path confinement ---------------------------------------------------------


def open_dataset(spec: str | PathLike[str], *, image_size: tuple[int, int] = (64, 64)) -> Dataset:
    """Open a dataset from a spec: "demo", "fashion-mnist" (the Debian files) or a directory.

    A directory holding idx files is read by :func:`load_idx`; one with ``train/`` and ``test/`` by
    :func:`load_image_folder` (with ``image_size``).

    Raises:
        DatasetError: the spec names neither; the message lists the accepted layouts.
    """
    text = os.fspath(spec)
    if text == "demo":
        return load_demo()
    if text == "fashion-mnist" and not Path(text).exists():
        return load_idx(DEBIAN_FASHION_MNIST_DIR, kind="fashion")
    root = Path(text)
    if not root.is_dir():
        raise DatasetError(
            f"{text!r} is neither 'demo', 'fashion-mnist' nor an existing directory. {_LAYOUTS}"
        )
    if any((root / c).is_file() for c in _idx_candidates("train", "images", 3)):
        return load_idx(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return load_image_folder(root, image_size=image_size)
    raise DatasetError(f"{root} does not look like a dataset. {_LAYOUTS}")


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
        raise DatasetError(f"{text!r} contains '..'; give a path inside the allowed directories.")
    allowed = [Path(root).resolve() for root in roots]
    listing = ", ".join(str(root) for root in allowed)
    outside = DatasetError(
        f"{text!r} is outside the allowed dataset directories ({listing}); a symlink that "
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
        raise DatasetError(f"{text!r} does not exist under the allowed directories ({listing}).")
    resolved = existing[0].resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        raise outside
    return resolved
