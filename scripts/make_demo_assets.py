"""Regenerate assets/fashion_mnist_demo.npz: a stratified, seeded subset of Fashion-MNIST.

All ten classes, 500 training and 100 test images per class (5000 + 1000), drawn without
replacement with numpy's default_rng(SEED), class by class (train classes 0..9, then test classes
0..9), then sorted by original index. The original indices are stored, so the ids of the demo
("fmnist/train/<index>") are those of the full dataset.

The .npz is written byte for byte deterministically (fixed zip timestamps and member order), so
re-running the script on the same files leaves git with nothing to commit.

Usage:
    python scripts/make_demo_assets.py [IDX_DIR] [--out assets/fashion_mnist_demo.npz]
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = REPO_ROOT / "assets" / "fashion_mnist_demo.npz"
SEED = 0
TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100
# The file goes into git; anything much bigger means something went wrong.
MAX_OUTPUT_BYTES = 5 * 2**20
# Zip entries carry a modification time; a fixed one keeps the bytes identical across runs.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def stratified_indices(
    labels: np.ndarray, per_class: int, rng: np.random.Generator, n_classes: int
) -> np.ndarray:
    """Indices of ``per_class`` images of each class, sampled without replacement, sorted.

    Args:
        labels: (N,) int labels.
        per_class: images to keep per class.
        rng: the generator; its state advances class by class, in class order.
        n_classes: number of classes; each must have at least ``per_class`` images.

    Returns:
        (per_class * n_classes,) int64 indices into ``labels``, ascending.
    """
    chosen = []
    for cls in range(n_classes):
        members = np.flatnonzero(labels == cls)
        if members.size < per_class:
            raise SystemExit(f"class {cls} has only {members.size} images, need {per_class}")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as a compressed .npz (readable by np.load) with reproducible bytes.

    np.savez_compressed stamps each member with the current time; this writes the same .npy members
    with a fixed timestamp, in the given order, to a temporary file that then replaces ``path``.
    """
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            # np.ascontiguousarray would turn 0-d scalars into 1-d arrays; copy(order="C") keeps shape.
            np.lib.format.write_array(buffer, array.copy(order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compresslevel=9)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "idx_dir",
        nargs="?",
        type=Path,
        default=DEFAULT_IDX_DIR,
        help=f"directory with the Fashion-MNIST idx files (default {DEFAULT_IDX_DIR})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz path")
    args = parser.parse_args(argv)

    # Import from this checkout, not from whatever `core` an environment may have installed.
    sys.path.insert(0, str(REPO_ROOT))
    from core.data import DEMO_FORMAT_VERSION, load_demo, load_idx

    full = load_idx(args.idx_dir, kind="fashion")
    rng = np.random.default_rng(SEED)
    train_idx = stratified_indices(full.train_labels, TRAIN_PER_CLASS, rng, full.n_classes)
    test_idx = stratified_indices(full.test_labels, TEST_PER_CLASS, rng, full.n_classes)

    arrays = {
        "format_version": np.array(DEMO_FORMAT_VERSION, dtype=np.int32),
        "class_names": np.array(full.class_names),
        "train_images": full.train_images[train_idx],
        "train_labels": full.train_labels[train_idx].astype(np.uint8),
        "train_indices": train_idx.astype(np.int32),
        "test_images": full.test_images[test_idx],
        "test_labels": full.test_labels[test_idx].astype(np.uint8),
        "test_indices": test_idx.astype(np.int32),
        "seed": np.array(SEED, dtype=np.int64),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz_deterministic(args.out, arrays)

    size = args.out.stat().st_size
    if size > MAX_OUTPUT_BYTES:
        raise SystemExit(f"{args.out} is {size / 2**20:.1f} MiB, over the {MAX_OUTPUT_BYTES} limit")

    # Read it back the way the app will, which also validates it.
    demo = load_demo(args.out)
    print(
        f"wrote {args.out} ({size / 2**20:.2f} MiB): {demo.n_train} train + {demo.n_test} test "
        f"images from {args.idx_dir}, seed {SEED}, content hash {demo.content_hash}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
