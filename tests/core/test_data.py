"""Tests for core.data: Dataset invariants, content hash, select_classes, loaders and path confinement."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import (
    ASSETS_DIR_ENV,
    DEBIAN_FASHION_MNIST_DIR,
    DEMO_FILENAME,
    FASHION_MNIST_CLASSES,
    FOLDER_MAX_PIXELS_ENV,
    MAX_IDX_PAYLOAD_BYTES,
    MNIST_CLASSES,
    Dataset,
    load_demo,
    load_idx,
    load_image_folder,
    open_dataset,
    resolve_under_roots,
)
from core.errors import DatasetError, OutsideRootsError
from tests.bounded import run_bounded
from tests.hostile_files import idx_gzip_bomb
from tests.upload_corpus import encode, png_declaring_size

# --- factories -----------------------------------------------------------------------------------


def _arrays(n_train: int, n_test: int, shape=(6, 5, 1), n_classes: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "name": "toy",
        "class_names": tuple(f"class{c}" for c in range(n_classes)),
        "train_images": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train_labels": np.arange(n_train) % n_classes,
        "train_ids": np.array([f"toy/train/{i}" for i in range(n_train)]),
        "test_images": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "test_labels": np.arange(n_test) % n_classes,
        "test_ids": np.array([f"toy/test/{i}" for i in range(n_test)]),
        "source": "generated",
    }


@pytest.fixture
def make_dataset() -> Callable[..., Dataset]:
    def factory(n_train: int = 12, n_test: int = 6, **overrides) -> Dataset:
        kwargs = _arrays(n_train, n_test)
        kwargs.update(overrides)
        return Dataset(**kwargs)

    return factory


def write_idx(path: Path, array: np.ndarray, *, compress: bool, magic: int | None = None) -> None:
    """Write a uint8 array as an idx file (magic 0x0000 08 <ndim>, big-endian dims, payload)."""
    magic = 0x800 + array.ndim if magic is None else magic
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


@pytest.fixture
def make_idx_dir(tmp_path) -> Callable[..., Path]:
    def factory(
        name: str = "mnist", compress: bool = False, n_train: int = 20, n_test: int = 10
    ) -> Path:
        root = tmp_path / name
        root.mkdir()
        rng = np.random.default_rng(1)
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            images = rng.integers(0, 256, (n, 7, 6), dtype=np.uint8)
            write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress=compress)
            write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress=compress)
        return root

    return factory


@pytest.fixture
def make_image_folder(tmp_path) -> Callable[..., Path]:
    """An ImageFolder tree with mixed sizes, modes and formats."""

    def factory(grayscale_only: bool = False) -> Path:
        root = tmp_path / "folder"
        files: dict[str, Image.Image] = {
            "train/cat/a.png": Image.new("L", (30, 20), 10),
            "train/cat/sub/b.png": Image.new("L", (8, 8), 200),
            "train/dog/c.png": Image.new("L", (40, 40), 90),
            "test/cat/d.png": Image.new("L", (16, 64), 50),
        }
        if not grayscale_only:
            rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
            rgba.paste((200, 0, 0, 255), (5, 5, 15, 15))
            files.update(
                {
                    "train/cat/e.jpg": Image.new("RGB", (50, 30), (200, 30, 30)),
                    "train/dog/f.png": rgba,
                    "train/bird/g.bmp": Image.new("RGB", (12, 12), (0, 0, 255)),
                    "test/dog/h.webp": Image.new("RGB", (33, 17), (0, 255, 0)),
                }
            )
        for relative, img in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}[path.suffix]
            path.write_bytes(encode(img, fmt))
        # Hidden files and directories are skipped, not decoded.
        (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00junk")
        (root / "train" / ".hidden_class").mkdir()
        (root / "train" / "dog" / ".thumbs").mkdir()
        (root / "train" / "dog" / ".thumbs" / "x.png").write_bytes(b"junk")
        return root

    return factory


# --- Dataset ---------------------------------------------------------------------------------------


class TestDataset:
    def test_properties(self, make_dataset):
        ds = make_dataset()
        assert ds.image_shape == (6, 5, 1)
        assert ds.n_classes == 3 and ds.n_train == 12 and ds.n_test == 6
        assert ds.train_labels.dtype == np.int64
        assert "toy" in repr(ds)

    def test_arrays_are_read_only(self, make_dataset):
        ds = make_dataset()
        for array in (ds.train_images, ds.train_labels, ds.train_ids, ds.test_images):
            assert not array.flags.writeable
        with pytest.raises(ValueError):
            ds.train_images[0, 0, 0, 0] = 1

    def test_summary(self, make_dataset):
        summary = make_dataset().summary()
        assert summary["image_shape"] == [6, 5, 1]
        assert summary["counts"]["train"] == {"class0": 4, "class1": 4, "class2": 4}
        assert summary["counts"]["test"] == {"class0": 2, "class1": 2, "class2": 2}
        assert len(summary["content_hash"]) == 12

    def test_list_ids_are_accepted(self, make_dataset):
        ds = make_dataset(n_train=3, n_test=3, train_ids=["a", "b", "c"])
        assert ds.train_ids.dtype.kind == "U"

    @pytest.mark.parametrize(
        ("override", "message"),
        [
            ({"train_images": np.zeros((12, 6, 5, 1), np.float32)}, "uint8"),
            ({"train_images": np.zeros((12, 6, 5), np.uint8)}, "channel axis"),
            ({"train_images": np.zeros((12, 6, 5, 2), np.uint8)}, "C = 1 or 3"),
            ({"test_images": np.zeros((6, 7, 5, 1), np.uint8)}, "same image shape"),
            ({"train_labels": np.arange(12) % 3 + 1}, "0..2"),
            ({"train_labels": -(np.arange(12) % 3)}, "0..2"),
            ({"train_labels": np.zeros(11, np.int64)}, "shape (12,)"),
            ({"train_labels": np.zeros(12, np.float64)}, "integers"),
            ({"train_ids": np.array(["x"] * 12)}, "unique"),
            ({"train_ids": np.arange(12)}, "strings"),
            ({"test_ids": np.array([""] * 6)}, "non-empty"),
            ({"class_names": ("a", "a", "b")}, "distinct"),
            ({"class_names": ("only",)}, "at least two"),
            ({"train_labels": np.zeros(12, np.int64)}, "no training images"),
            ({"train_images": np.zeros((0, 6, 5, 1), np.uint8)}, "no images"),
            ({"name": ""}, "name"),
        ],
    )
    def test_validation(self, make_dataset, override, message):
        with pytest.raises(DatasetError, match=re.escape(message)):
            make_dataset(**override)


class TestContentHash:
    def test_equal_data_equal_hash(self, make_dataset):
        a = make_dataset()
        b = make_dataset(name="another name", source="elsewhere")
        assert a.content_hash == b.content_hash
        assert len(a.content_hash) == 64 and a.content_hash == a.content_hash

    def test_independent_of_memory_layout_and_id_width(self, make_dataset):
        kwargs = _arrays(12, 6)
        a = Dataset(**kwargs)
        kwargs["train_images"] = np.asfortranarray(kwargs["train_images"])
        kwargs["train_ids"] = kwargs["train_ids"].astype("<U64")
        kwargs["train_labels"] = kwargs["train_labels"].astype(np.uint8)
        assert Dataset(**kwargs).content_hash == a.content_hash

    @pytest.mark.parametrize("change", ["pixel", "train_label", "test_label", "id", "class_name"])
    def test_any_change_changes_hash(self, change):
        kwargs = _arrays(12, 6)
        base = Dataset(**kwargs).content_hash
        kwargs = _arrays(12, 6)
        if change == "pixel":
            kwargs["test_images"][3, 2, 1, 0] ^= 1
        elif change == "train_label":
            kwargs["train_labels"] = kwargs["train_labels"].copy()
            kwargs["train_labels"][[0, 1]] = kwargs["train_labels"][[1, 0]]
        elif change == "test_label":
            kwargs["test_labels"] = kwargs["test_labels"].copy()
            kwargs["test_labels"][0] = 2
        elif change == "id":
            kwargs["train_ids"] = kwargs["train_ids"].copy()
            kwargs["train_ids"][5] = "toy/train/renamed"
        else:
            kwargs["class_names"] = ("class0", "class1", "Class2")
        assert Dataset(**kwargs).content_hash != base

    def test_swapping_splits_changes_hash(self):
        kwargs = _arrays(6, 6)
        swapped = dict(kwargs)
        for part in ("images", "labels", "ids"):
            swapped[f"train_{part}"], swapped[f"test_{part}"] = (
                kwargs[f"test_{part}"],
                kwargs[f"train_{part}"],
            )
        assert Dataset(**kwargs).content_hash != Dataset(**swapped).content_hash


class TestSelectClasses:
    def test_by_name_relabels_in_given_order(self, make_dataset):
        ds = make_dataset()
        sub = ds.select_classes(["class2", "class0"])
        assert sub.class_names == ("class2", "class0")
        assert sub.name == "toy [class2 vs class0]"
        assert sub.n_train == 8 and sub.n_test == 4
        original_label = {i: lbl for i, lbl in zip(ds.train_ids, ds.train_labels, strict=True)}
        for image_id, label, image in zip(
            sub.train_ids, sub.train_labels, sub.train_images, strict=True
        ):
            assert {0: 2, 1: 0}[int(label)] == original_label[image_id]
            index = int(np.flatnonzero(ds.train_ids == image_id)[0])
            np.testing.assert_array_equal(image, ds.train_images[index])
        assert sub.content_hash != ds.content_hash

    def test_by_index_and_mixed(self, make_dataset):
        ds = make_dataset()
        assert (
            ds.select_classes([2, "class0"]).content_hash
            == ds.select_classes(["class2", 0]).content_hash
        )
        assert ds.select_classes([np.int64(1), 2]).class_names == ("class1", "class2")

    def test_all_classes_same_order_keeps_content(self, make_dataset):
        ds = make_dataset()
        assert ds.select_classes([0, 1, 2]).content_hash == ds.content_hash

    @pytest.mark.parametrize(
        ("classes", "message"),
        [
            (["class0"], "at least two"),
            (["class0", "class0"], "twice"),
            (["nope", "class0"], "No class named 'nope'"),
            ([0, 7], "out of range"),
            ("class0", "list"),
            ([True, 0], "index or name"),
            ([1.0, 0], "index or name"),
        ],
    )
    def test_errors(self, make_dataset, classes, message):
        with pytest.raises(DatasetError, match=message):
            make_dataset().select_classes(classes)

    def test_class_without_test_images(self):
        kwargs = _arrays(12, 6)
        kwargs["test_labels"] = np.zeros(6, np.int64)
        with pytest.raises(DatasetError, match="no test images"):
            Dataset(**kwargs).select_classes([1, 2])


# --- idx -----------------------------------------------------------------------------------------


class TestLoadIdx:
    @pytest.mark.parametrize("compress", [False, True])
    def test_reads_plain_and_gzip(self, make_idx_dir, compress):
        ds = load_idx(make_idx_dir(compress=compress))
        assert ds.image_shape == (7, 6, 1)
        assert ds.n_train == 20 and ds.n_test == 10
        assert ds.class_names == MNIST_CLASSES and ds.name == "MNIST"
        assert ds.train_ids[3] == "mnist/train/3" and ds.test_ids[9] == "mnist/test/9"
        assert ds.light_on_dark
        np.testing.assert_array_equal(ds.train_labels, np.arange(20) % 10)

    def test_plain_and_gzip_give_the_same_dataset(self, tmp_path, make_idx_dir):
        plain = load_idx(make_idx_dir(name="a", compress=False))
        packed = load_idx(make_idx_dir(name="b", compress=True))
        assert plain.content_hash == packed.content_hash

    def test_fashion_detected_from_path_or_kind(self, make_idx_dir):
        ds = load_idx(make_idx_dir(name="my-fashion-mnist"))
        assert ds.class_names == FASHION_MNIST_CLASSES and ds.name == "Fashion-MNIST"
        assert ds.train_ids[0] == "fmnist/train/0"
        forced = load_idx(make_idx_dir(name="fm"), kind="fashion", name="FM")
        assert forced.class_names == FASHION_MNIST_CLASSES and forced.name == "FM"
        with pytest.raises(DatasetError, match="kind"):
            load_idx(make_idx_dir(name="x"), kind="kmnist")

    def test_missing_directory(self, tmp_path):
        with pytest.raises(DatasetError, match="No directory"):
            load_idx(tmp_path / "nowhere")

    def test_missing_file(self, make_idx_dir):
        root = make_idx_dir()
        (root / "t10k-labels-idx1-ubyte").unlink()
        with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
            load_idx(root)

    def test_damaged_gzip(self, make_idx_dir):
        root = make_idx_dir(compress=True)
        path = root / "train-images-idx3-ubyte.gz"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(DatasetError, match="damaged"):
            load_idx(root)

    def test_truncated_gzip(self, make_idx_dir):
        root = make_idx_dir(compress=True)
        path = root / "train-labels-idx1-ubyte.gz"
        path.write_bytes(path.read_bytes()[:-12])
        with pytest.raises(DatasetError, match="train-labels"):
            load_idx(root)

    def test_count_mismatch(self, make_idx_dir):
        root = make_idx_dir()
        write_idx(root / "train-labels-idx1-ubyte", np.zeros(19), compress=False)
        with pytest.raises(DatasetError, match=r"20 images but .* 19 labels"):
            load_idx(root)

    def test_wrong_magic(self, make_idx_dir):
        root = make_idx_dir()
        # A labels file where the images file should be.
        write_idx(root / "train-images-idx3-ubyte", np.zeros(20), compress=False)
        with pytest.raises(DatasetError, match="magic number 0x00000801"):
            load_idx(root)

    def test_payload_shorter_or_longer_than_declared(self, make_idx_dir):
        root = make_idx_dir()
        path = root / "t10k-images-idx3-ubyte"
        original = path.read_bytes()
        path.write_bytes(original[:-5])
        with pytest.raises(DatasetError, match="missing data"):
            load_idx(root)
        path.write_bytes(original + b"\x00")
        with pytest.raises(DatasetError, match="extra data"):
            load_idx(root)

    def test_label_out_of_range(self, make_idx_dir):
        root = make_idx_dir()
        write_idx(root / "t10k-labels-idx1-ubyte", np.full(10, 12), compress=False)
        with pytest.raises(DatasetError, match="label 12"):
            load_idx(root)

    def test_absurd_declared_size_is_refused_before_reading(self, make_idx_dir):
        root = make_idx_dir()
        header = struct.pack(">IIII", 0x803, 2**31, 2**16, 2**16)
        (root / "train-images-idx3-ubyte").write_bytes(header + b"\x00" * 16)
        with pytest.raises(DatasetError, match="far too large"):
            load_idx(root)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist not installed (no {DEBIAN_FASHION_MNIST_DIR}); "
    "`apt-get install dataset-fashion-mnist` to run this test",
)
def test_real_fashion_mnist_and_demo_agree():
    full = load_idx(DEBIAN_FASHION_MNIST_DIR)
    assert full.class_names == FASHION_MNIST_CLASSES
    assert (full.n_train, full.n_test, full.image_shape) == (60_000, 10_000, (28, 28, 1))
    assert np.all(full.class_counts("train") == 6000) and np.all(full.class_counts("test") == 1000)
    # Every demo image is the full dataset's image of the same id, with the same label.
    demo = load_demo()
    for split in ("train", "test"):
        full_images, full_labels = (
            getattr(full, f"{split}_images"),
            getattr(full, f"{split}_labels"),
        )
        indices = [int(i.rsplit("/", 1)[1]) for i in getattr(demo, f"{split}_ids")]
        np.testing.assert_array_equal(getattr(demo, f"{split}_images"), full_images[indices])
        np.testing.assert_array_equal(getattr(demo, f"{split}_labels"), full_labels[indices])


# --- demo ----------------------------------------------------------------------------------------


class TestDemo:
    def test_counts_shapes_and_names(self):
        demo = load_demo()
        assert demo.class_names == FASHION_MNIST_CLASSES
        assert demo.image_shape == (28, 28, 1)
        assert demo.n_train == 5000 and demo.n_test == 1000
        assert np.all(demo.class_counts("train") == 500)
        assert np.all(demo.class_counts("test") == 100)
        assert demo.light_on_dark
        assert demo.train_ids[0].startswith("fmnist/train/")
        assert open_dataset("demo").content_hash == demo.content_hash

    def test_asset_is_small_and_documented(self):
        assets = Path(__file__).resolve().parents[2] / "assets"
        assert (assets / DEMO_FILENAME).stat().st_size < 5 * 2**20
        assert "MIT" in (assets / "LICENSE-fashion-mnist.txt").read_text()
        assert load_demo().content_hash in (assets / "README.md").read_text()

    def test_assets_dir_env_var(self, tmp_path, monkeypatch):
        monkeypatch.setenv(ASSETS_DIR_ENV, str(tmp_path))
        with pytest.raises(DatasetError, match="missing"):
            load_demo()
        original = Path(__file__).resolve().parents[2] / "assets" / DEMO_FILENAME
        shutil.copy(original, tmp_path / DEMO_FILENAME)
        assert load_demo().n_train == 5000

    def test_damaged_demo(self, tmp_path):
        path = tmp_path / DEMO_FILENAME
        path.write_bytes(b"PK\x03\x04 not really a zip")
        with pytest.raises(DatasetError, match="damaged"):
            load_demo(path)
        np.savez(path, train_images=np.zeros((1, 28, 28, 1), np.uint8))
        with pytest.raises(DatasetError, match="lacks"):
            load_demo(path)


# --- ImageFolder ---------------------------------------------------------------------------------


class TestLoadImageFolder:
    def test_mixed_sizes_modes_and_formats(self, make_image_folder):
        root = make_image_folder()
        progress: list[tuple[int, int]] = []
        ds = load_image_folder(
            root, image_size=(16, 12), progress=lambda d, t: progress.append((d, t))
        )
        assert ds.class_names == ("bird", "cat", "dog")
        assert ds.image_shape == (16, 12, 3)
        assert not ds.light_on_dark
        assert sorted(ds.train_ids.tolist()) == [
            "train/bird/g.bmp",
            "train/cat/a.png",
            "train/cat/e.jpg",
            "train/cat/sub/b.png",
            "train/dog/c.png",
            "train/dog/f.png",
        ]
        assert ds.test_ids.tolist() == ["test/cat/d.png", "test/dog/h.webp"]
        label = dict(zip(ds.train_ids.tolist(), ds.train_labels.tolist(), strict=True))
        assert label["train/bird/g.bmp"] == 0 and label["train/dog/f.png"] == 2
        image = dict(zip(ds.train_ids.tolist(), ds.train_images, strict=True))
        # Grayscale file copied to three equal channels; transparency onto white.
        assert np.all(image["train/cat/a.png"] == 10)
        assert tuple(image["train/dog/f.png"][0, 0]) == (255, 255, 255)
        assert tuple(image["train/dog/f.png"][8, 6]) == (200, 0, 0)
        assert progress[-1] == (8, 8)

    def test_auto_mode_is_grayscale_when_every_file_is(self, make_image_folder):
        root = make_image_folder(grayscale_only=True)
        ds = load_image_folder(root, image_size=(8, 8))
        assert ds.image_shape == (8, 8, 1)
        forced = load_image_folder(root, image_size=(8, 8), mode="RGB")
        assert forced.image_shape == (8, 8, 3)
        np.testing.assert_array_equal(forced.train_images[..., :1], ds.train_images)

    def test_forced_grayscale(self, make_image_folder):
        ds = load_image_folder(make_image_folder(), image_size=(8, 8), mode="L")
        assert ds.image_shape == (8, 8, 1)

    def test_same_pixels_as_an_upload(self, make_image_folder):
        from core.images import load_image_file

        root = make_image_folder()
        ds = load_image_folder(root, image_size=(16, 12))
        for relative in ("train/cat/e.jpg", "test/dog/h.webp", "train/dog/f.png"):
            upload = load_image_file(root / relative, target_shape=(16, 12, 3), light_on_dark=False)
            split = relative.split("/", 1)[0]
            ids = getattr(ds, f"{split}_ids").tolist()
            np.testing.assert_array_equal(
                getattr(ds, f"{split}_images")[ids.index(relative)], upload.image
            )

    def test_bad_files_are_all_reported(self, make_image_folder):
        root = make_image_folder()
        (root / "train" / "cat" / "notes.txt").write_text("not an image")
        (root / "test" / "dog" / "cut.png").write_bytes(
            encode(Image.new("RGB", (40, 40)), "PNG")[:60]
        )
        with pytest.raises(DatasetError) as info:
            load_image_folder(root)
        message = str(info.value)
        assert "2 of 10 files" in message
        assert "train/cat/notes.txt" in message and "test/dog/cut.png" in message

    def test_test_class_not_in_train(self, make_image_folder):
        root = make_image_folder()
        (root / "test" / "fish").mkdir()
        (root / "test" / "fish" / "x.png").write_bytes(encode(Image.new("L", (4, 4)), "PNG"))
        with pytest.raises(DatasetError, match="'fish'"):
            load_image_folder(root)

    def test_empty_train_class(self, make_image_folder):
        root = make_image_folder()
        (root / "train" / "empty").mkdir()
        with pytest.raises(DatasetError, match="no image files"):
            load_image_folder(root)

    def test_layout_errors(self, tmp_path, make_image_folder):
        with pytest.raises(DatasetError, match="No directory"):
            load_image_folder(tmp_path / "missing")
        (tmp_path / "flat").mkdir()
        with pytest.raises(DatasetError, match="no train/"):
            load_image_folder(tmp_path / "flat")
        root = make_image_folder()
        shutil.rmtree(root / "train" / "dog")
        shutil.rmtree(root / "train" / "bird")
        with pytest.raises(DatasetError, match="at least two"):
            load_image_folder(root)

    def test_too_many_files(self, make_image_folder):
        with pytest.raises(DatasetError, match="more than 5 files"):
            load_image_folder(make_image_folder(), max_files=5)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"image_size": (0, 8)}, "image_size"),
            ({"image_size": 8}, "image_size"),
            ({"mode": "CMYK"}, "mode"),
        ],
    )
    def test_argument_errors(self, make_image_folder, kwargs, message):
        with pytest.raises(DatasetError, match=message):
            load_image_folder(make_image_folder(), **kwargs)


# --- open_dataset --------------------------------------------------------------------------------


class TestOpenDataset:
    def test_dispatch(self, make_idx_dir, make_image_folder):
        assert open_dataset(make_idx_dir()).n_train == 20
        assert open_dataset(str(make_image_folder()), image_size=(8, 8)).image_shape == (8, 8, 3)

    def test_fashion_mnist_shortcut(self, make_idx_dir, monkeypatch):
        import core.data

        monkeypatch.setattr(core.data, "DEBIAN_FASHION_MNIST_DIR", make_idx_dir(name="debian"))
        ds = open_dataset("fashion-mnist")
        assert ds.class_names == FASHION_MNIST_CLASSES and ds.n_train == 20

    def test_unknown_layout_explains_both(self, tmp_path):
        with pytest.raises(DatasetError, match="idx") as info:
            open_dataset(tmp_path)
        assert "train/<class>" in str(info.value)
        with pytest.raises(DatasetError, match="neither"):
            open_dataset(str(tmp_path / "nothing-here"))


# --- resolve_under_roots -------------------------------------------------------------------------


class TestResolveUnderRoots:
    @pytest.fixture
    def roots(self, tmp_path) -> tuple[Path, Path, Path]:
        allowed = tmp_path / "datasets"
        (allowed / "fmnist").mkdir(parents=True)
        other = tmp_path / "other"
        (other / "secret").mkdir(parents=True)
        second = tmp_path / "more"
        (second / "pets").mkdir(parents=True)
        return allowed, other, second

    def test_inside(self, roots):
        allowed, _, second = roots
        assert resolve_under_roots(allowed / "fmnist", [allowed]) == (allowed / "fmnist").resolve()
        assert resolve_under_roots("fmnist", [allowed]) == (allowed / "fmnist").resolve()
        assert resolve_under_roots("pets", [allowed, second]) == (second / "pets").resolve()
        assert resolve_under_roots(allowed, [allowed]) == allowed.resolve()

    def test_dotdot_is_refused(self, roots):
        allowed, _, _ = roots
        with pytest.raises(DatasetError, match=r"'\.\.'"):
            resolve_under_roots("../other/secret", [allowed])
        with pytest.raises(DatasetError, match=r"'\.\.'"):
            resolve_under_roots("fmnist/../fmnist", [allowed])

    def test_absolute_elsewhere_is_refused(self, roots):
        allowed, other, _ = roots
        with pytest.raises(DatasetError, match="outside"):
            resolve_under_roots(other / "secret", [allowed])
        with pytest.raises(DatasetError, match="outside"):
            resolve_under_roots("/", [allowed])

    def test_absolute_elsewhere_does_not_reveal_whether_it_exists(self, roots, tmp_path):
        allowed, other, _ = roots
        messages = []
        for path in (other / "secret", other / "no-such-thing"):
            with pytest.raises(DatasetError, match="outside") as refused:
                resolve_under_roots(path, [allowed])
            messages.append(str(refused.value).replace(str(path), "PATH"))
        assert messages[0] == messages[1]

    def test_prefix_sibling_is_not_inside(self, roots, tmp_path):
        allowed, _, _ = roots
        sibling = tmp_path / "datasets-evil"
        sibling.mkdir()
        with pytest.raises(DatasetError, match="outside"):
            resolve_under_roots(sibling, [allowed])

    @pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this platform")
    def test_escaping_symlink_is_refused(self, roots):
        allowed, other, _ = roots
        (allowed / "link").symlink_to(other / "secret")
        with pytest.raises(DatasetError, match="outside"):
            resolve_under_roots("link", [allowed])
        # A symlink that stays inside is fine and resolves to its target.
        (allowed / "alias").symlink_to(allowed / "fmnist")
        assert resolve_under_roots("alias", [allowed]) == (allowed / "fmnist").resolve()

    def test_missing_and_malformed(self, roots):
        allowed, _, _ = roots
        with pytest.raises(DatasetError, match="does not exist"):
            resolve_under_roots("nope", [allowed])
        with pytest.raises(DatasetError, match="non-empty"):
            resolve_under_roots("", [allowed])
        with pytest.raises(DatasetError, match="NUL"):
            resolve_under_roots("a\0b", [allowed])
        with pytest.raises(DatasetError, match="No dataset directories"):
            resolve_under_roots("fmnist", [])


# --- confined, bounded readers --------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path) -> Path:
    """A private directory next to the dataset: an ImageFolder class's worth of images."""
    private = tmp_path / "private"
    (private / "secret-class").mkdir(parents=True)
    for i in range(3):
        (private / "secret-class" / f"secret-{i}.png").write_bytes(
            encode(Image.new("L", (8, 8), 200), "PNG")
        )
    return private


@pytest.fixture
def watch_reads(monkeypatch) -> list[str]:
    """Every path opened or listed while the test runs, as the file system resolves it."""
    import io

    seen: list[str] = []
    real_os_open, real_io_open, real_scandir = os.open, io.open, os.scandir

    def recording_os_open(path, *args, **kwargs):
        seen.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    def recording_io_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(os.path.realpath(file))
        return real_io_open(file, *args, **kwargs)

    def recording_scandir(path="."):
        seen.append(os.path.realpath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", recording_os_open)
    monkeypatch.setattr(io, "open", recording_io_open)
    monkeypatch.setattr(os, "scandir", recording_scandir)
    return seen


def _never_touched(seen: list[str], private: Path) -> None:
    private = os.path.realpath(private)
    assert seen, "the recorder saw nothing"
    assert not [p for p in seen if p == private or p.startswith(private + os.sep)]


class TestSymlinksStayInside:
    @pytest.mark.parametrize("confined_to", ["dataset", "roots"])
    def test_class_directory_linking_out_is_refused(
        self, make_image_folder, outside, watch_reads, confined_to
    ):
        root = make_image_folder()
        roots = None
        if confined_to == "roots":  # a server's data root, holding this dataset and others
            server_root = root.parent / "datasets"
            server_root.mkdir()
            root = root.rename(server_root / "pets")
            roots = [server_root]
        (root / "train" / "escape").symlink_to(outside / "secret-class", target_is_directory=True)
        with pytest.raises(OutsideRootsError) as info:
            load_image_folder(root, image_size=(8, 8), roots=roots)
        message = str(info.value)
        assert "train/escape" in message and "symbolic link" in message
        assert "secret" not in message and "private" not in message
        _never_touched(watch_reads, outside)

    def test_file_and_subdirectory_linking_out_are_refused(
        self, make_image_folder, outside, watch_reads
    ):
        root = make_image_folder()
        (root / "train" / "cat" / "borrowed.png").symlink_to(outside / "secret-class/secret-0.png")
        (root / "train" / "dog" / "more").symlink_to(outside / "secret-class")
        with pytest.raises(OutsideRootsError) as info:
            open_dataset(root, image_size=(8, 8))
        message = str(info.value)
        assert "train/cat/borrowed.png" in message and "train/dog/more" in message
        assert "secret" not in message
        _never_touched(watch_reads, outside)

    def test_links_that_stay_inside_are_followed(self, make_image_folder, tmp_path):
        root = make_image_folder()
        (root / "train" / "kitten").symlink_to(root / "train" / "cat", target_is_directory=True)
        (root / "train" / "dog" / "alias.png").symlink_to(root / "train" / "dog" / "c.png")
        # A link back up the tree: each real directory is walked once per class, so this ends.
        (root / "train" / "cat" / "sub" / "loop").symlink_to(root / "train" / "cat")
        ds = load_image_folder(root, image_size=(8, 8))
        assert "kitten" in ds.class_names
        ids = ds.train_ids.tolist()
        assert "train/kitten/a.png" in ids and "train/dog/alias.png" in ids
        assert not any("loop" in i for i in ids)

    def test_with_roots_a_link_may_lead_elsewhere_inside_them(self, make_image_folder, tmp_path):
        root = make_image_folder()
        shared = tmp_path / "shared-photos"
        shared.mkdir()
        (shared / "x.png").write_bytes(encode(Image.new("L", (8, 8), 30), "PNG"))
        (root / "train" / "cat" / "x.png").symlink_to(shared / "x.png")
        with pytest.raises(OutsideRootsError, match=r"train/cat/x\.png"):
            load_image_folder(root, image_size=(8, 8))
        ds = open_dataset(root, image_size=(8, 8), roots=[tmp_path])
        assert "train/cat/x.png" in ds.train_ids.tolist()

    def test_roots_apply_to_idx_files_too(self, make_idx_dir, outside, watch_reads):
        root = make_idx_dir()
        target = outside / "t10k-labels-idx1-ubyte"
        (root / "t10k-labels-idx1-ubyte").rename(target)
        (root / "t10k-labels-idx1-ubyte").symlink_to(target)
        with pytest.raises(DatasetError, match="leads outside") as info:
            load_idx(root)
        assert "private" not in str(info.value)
        assert not [p for p in watch_reads if p == os.path.realpath(target)]


class TestOnlyRegularFiles:
    def test_named_pipe_in_a_class_folder_is_refused_without_blocking(self, make_image_folder):
        # It used to block the loader forever, waiting for a writer.
        root = make_image_folder()
        os.mkfifo(root / "train" / "cat" / "x.png")
        run = run_bounded(
            f"""
            from core.data import load_image_folder
            from core.errors import DatasetError
            try:
                load_image_folder({str(root)!r}, image_size=(8, 8))
                outcome = "loaded"
            except DatasetError as exc:
                outcome = str(exc)
            report(outcome=outcome)
            """,
            timeout=30,
        )
        assert not run.timed_out, "the loader blocked on the FIFO"
        assert run.result is not None, run.output
        assert "train/cat/x.png is a named pipe (FIFO), not a regular file" in run.result["outcome"]

    def test_named_pipe_as_an_idx_file_is_refused(self, make_idx_dir):
        root = make_idx_dir()
        (root / "t10k-labels-idx1-ubyte").unlink()
        os.mkfifo(root / "t10k-labels-idx1-ubyte")
        with pytest.raises(DatasetError, match="named pipe"):
            load_idx(root)


class TestIdxIsBounded:
    def test_gzip_declaring_millions_of_images_is_refused_from_its_header(self, make_idx_dir):
        # 4 MB of gzip holding 4.3 GB of zeros and declaring 5,478,000 images: the old reader
        # allocated and decompressed all of it (5.6 GB in the CLI).
        root = make_idx_dir()
        (root / "train-images-idx3-ubyte").unlink()
        bomb = idx_gzip_bomb()
        (root / "train-images-idx3-ubyte.gz").write_bytes(bomb)
        run = run_bounded(
            f"""
            from core.data import load_idx
            from core.errors import DatasetError
            try:
                load_idx({str(root)!r})
                outcome = "loaded"
            except (DatasetError, MemoryError) as exc:
                outcome = f"{{type(exc).__name__}}: {{exc}}"
            report(outcome=outcome)
            """,
            timeout=60,
        )
        assert 3 * 2**20 < len(bomb) < 5 * 2**20
        assert run.result is not None, run.output
        assert "DatasetError" in run.result["outcome"] and "far too large" in run.result["outcome"]
        assert run.result["peak_rss"] < 256 * 2**20, run.result
        assert run.result["cpu"] < 5, run.result

    def test_gzip_holding_more_than_it_declares_is_refused_after_the_limit(self, make_idx_dir):
        # Declares 20,000 images (15.7 MB, under the limit given here) but holds 4.3 GB: reading
        # stops one byte past the declaration.
        root = make_idx_dir()
        (root / "train-images-idx3-ubyte").unlink()
        bomb = idx_gzip_bomb(images=20_000, decompressed_bytes=4_294_752_000)
        (root / "train-images-idx3-ubyte.gz").write_bytes(bomb)
        run = run_bounded(
            f"""
            from core.data import load_idx
            from core.errors import DatasetError
            try:
                load_idx({str(root)!r}, max_payload_bytes=16 * 2**20)
                outcome = "loaded"
            except DatasetError as exc:
                outcome = str(exc)
            report(outcome=outcome)
            """,
            timeout=60,
        )
        assert run.result is not None, run.output
        assert "has extra data after its declared dimensions" in run.result["outcome"]
        assert run.result["peak_rss"] < 200 * 2**20, run.result
        assert run.result["cpu"] < 5, run.result

    def test_the_limit_is_stated_and_applies_to_plain_files(self, make_idx_dir):
        root = make_idx_dir()
        with pytest.raises(DatasetError, match=r"far too large: this app reads at most 100 bytes"):
            load_idx(root, max_payload_bytes=100)
        assert MAX_IDX_PAYLOAD_BYTES == 256 * 2**20


class TestPrintableNames:
    @pytest.fixture
    def latin1_folder(self, tmp_path) -> Path:
        """Class and file names in Latin-1 bytes (not UTF-8), as in old archives."""
        root = tmp_path / "latin1"
        png = encode(Image.new("L", (8, 8), 40), "PNG")
        for split in ("train", "test"):
            for name in (b"caf\xe9", b"cr\xe8me", b"plain"):
                folder = os.path.join(os.fsencode(root), split.encode(), name)
                os.makedirs(folder)
                for file_name in (b"\xff.png", b"ok.png"):
                    with open(os.path.join(folder, file_name), "wb") as handle:
                        handle.write(png)
        return root

    def test_names_are_printable_utf8_and_files_still_read(self, latin1_folder):
        ds = load_image_folder(latin1_folder, image_size=(8, 8))
        assert ds.class_names == ("caf\\xe9", "cr\\xe8me", "plain")
        assert "train/caf\\xe9/\\xff.png" in ds.train_ids.tolist()
        for text in (*ds.class_names, *ds.train_ids.tolist(), *ds.test_ids.tolist(), ds.name):
            text.encode("utf-8")  # no lone surrogates
            assert text.isprintable()
        assert np.all(ds.train_images == 40)  # read under their on-disk names
        json.dumps(ds.summary())

    def test_names_that_become_equal_are_refused(self, tmp_path):
        root = tmp_path / "clash"
        png = encode(Image.new("L", (8, 8), 40), "PNG")
        for split in ("train", "test"):
            for name in (b"a\xff", b"a\\xff", b"b"):
                folder = os.path.join(os.fsencode(root), split.encode(), name)
                os.makedirs(folder)
                with open(os.path.join(folder, b"x.png"), "wb") as handle:
                    handle.write(png)
        with pytest.raises(DatasetError, match=r"both shown as 'a\\\\xff'"):
            load_image_folder(root, image_size=(8, 8))

    def test_control_characters_are_escaped(self, make_image_folder):
        root = make_image_folder()
        (root / "train" / "dog").rename(root / "train" / "dog\nbreak")
        (root / "test" / "dog").rename(root / "test" / "dog\nbreak")
        ds = load_image_folder(root, image_size=(8, 8))
        assert "dog\\nbreak" in ds.class_names

    @pytest.mark.parametrize("bad", ["caf\udce9", "tab\there", "bell\x07"])
    def test_dataset_refuses_unprintable_class_names_and_ids(self, make_dataset, bad):
        with pytest.raises(DatasetError, match="printable UTF-8"):
            make_dataset(class_names=("ok", bad, "other"))
        ids = [f"toy/train/{i}" for i in range(12)]
        ids[3] = bad
        with pytest.raises(DatasetError, match="printable UTF-8"):
            make_dataset(train_ids=ids)


class TestFolderPixelLimit:
    def test_folders_have_the_upload_pixel_limit_by_default(self, make_image_folder, monkeypatch):
        monkeypatch.delenv(FOLDER_MAX_PIXELS_ENV, raising=False)
        root = make_image_folder()
        # 49 megapixels declared (a tiny file): over the 40 MP upload limit, under the old 89 MP.
        (root / "train" / "cat" / "big.png").write_bytes(png_declaring_size(7000, 7000))
        with pytest.raises(DatasetError, match="more than the 40 megapixel limit"):
            load_image_folder(root, image_size=(8, 8))

    def test_an_operator_can_change_it(self, make_image_folder, monkeypatch):
        root = make_image_folder()
        monkeypatch.setenv(FOLDER_MAX_PIXELS_ENV, "1_000")
        with pytest.raises(DatasetError, match="more than the 0 megapixel limit"):
            load_image_folder(root, image_size=(8, 8))
        assert load_image_folder(root, image_size=(8, 8), max_pixels=10_000).n_train == 6
        monkeypatch.setenv(FOLDER_MAX_PIXELS_ENV, "lots")
        with pytest.raises(DatasetError, match=FOLDER_MAX_PIXELS_ENV):
            load_image_folder(root, image_size=(8, 8))
